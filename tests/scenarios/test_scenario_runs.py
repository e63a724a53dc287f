"""Channels, retries and dead letters, the module's own events (birthday, segment entered), profile updates and
batch points actions, on SQLite and PostgreSQL with simulated time; the Admin gRPC API on loopback."""
from __future__ import annotations



import pytest

from helpers.scenarios import active_points, enroll, ledger_rows, outbox, runs
from loyalty.server import ledger
from loyalty.server.errors import AlreadyExists
from loyalty.server.scenarios import Channels, Worker
from loyalty.server.scenarios.outbox import MAX_ATTEMPTS


def test_email_goes_through_smtp_with_the_outbox_key_as_message_id(scn, smtp_sink, clock):
    service, sc, _ = scn
    worker = Worker(service.db, clock=clock, channels=Channels(email=f"smtp://127.0.0.1:{smtp_sink.port}?from=club@shop"))
    sc.define({"id": "hello", "triggers": ["member_registered"],
               "steps": [{"id": "mail", "send_email": {"subject": "Hi {first_name}", "body": "Card {card}",
                                                       "transactional": True}}]})
    enroll(service, "7000100", email="olga@example.com", first_name="Olga")
    worker.run_until_idle()
    [msg] = smtp_sink.messages
    assert msg["to"] == ["<olga@example.com>"] and msg["from"] == "<club@shop>"
    assert "Subject: Hi Olga" in msg["data"] and "Card 7000100" in msg["data"]
    run_id = runs(service.db)[0]["id"]
    assert f"Message-ID: <scenario.{run_id}.mail.1@loyalty>" in msg["data"]
    assert outbox(service.db)[0]["state"] == "sent"


def test_failing_webhook_backs_off_then_is_a_dead_letter_that_can_be_retried(scn, http_sink, clock):
    service, sc, worker = scn
    sc.define({"id": "hook", "triggers": ["member_registered"],
               "steps": [{"id": "call", "webhook": {"url": http_sink.url + "/x"}}]})
    enroll(service, "7000101")
    http_sink.status = 503
    worker.run_until_idle()
    assert len(http_sink.requests) == 1
    # backoff 10 s, 20 s, 40 s, 80 s, 160 s: the attempts 2..6 come only when their time has come
    waits = [10, 20, 40, 80, 160]
    for n, wait in enumerate(waits, start=2):
        clock.advance(seconds=wait - 1)
        worker.run_until_idle()
        assert len(http_sink.requests) == n - 1
        clock.advance(seconds=1)
        worker.run_until_idle()
        assert len(http_sink.requests) == n
    assert n == MAX_ATTEMPTS
    [dead] = sc.dead_letters()
    assert (dead["kind"], dead["channel"], dead["attempts"]) == ("message", "webhook", MAX_ATTEMPTS)
    assert "HTTP 503" in dead["error"]
    http_sink.status = 200
    sc.retry_dead_letter("message", dead["id"])
    worker.run_until_idle()
    assert outbox(service.db)[0]["state"] == "sent" and sc.dead_letters() == []
    assert len({r["key"] for r in http_sink.requests}) == 1      # one idempotency key for every attempt


def test_a_client_error_is_dead_at_once(scn, http_sink):
    service, sc, worker = scn
    sc.define({"id": "hook", "triggers": ["member_registered"],
               "steps": [{"id": "call", "webhook": {"url": http_sink.url}}]})
    enroll(service, "7000102")
    http_sink.status = 404
    worker.run_until_idle()
    assert [d["attempts"] for d in sc.dead_letters()] == [1]


def test_empty_promo_pool_fails_the_run_after_retries(scn, clock):
    service, sc, worker = scn
    sc.define({"id": "codes", "triggers": ["member_registered"], "steps": [{"id": "code", "issue_promo_code": "none"}]})
    enroll(service, "7000103")
    for _ in range(6):
        worker.run_until_idle()
        clock.advance(hours=1)                  # more than every backoff (30 s .. 8 min)
    [dead] = sc.dead_letters()
    assert dead["kind"] == "run" and "pool 'none' is empty" in dead["error"]
    assert sc.stats("codes")["steps"][0]["failed"] == 1


def test_birthday_trigger_fires_days_before_once_a_year(scn, clock):
    service, sc, worker = scn
    sc.define({"id": "bday", "reentry": "always", "triggers": [{"birthday": {"days_before": 3}}],
               "steps": [{"id": "gift", "award_points": {"points": 300, "reason": "birthday"}}]})
    # the clock is 2026-03-02: birthdays on 03-05 are 3 days ahead, 03-04 are not
    a = enroll(service, "7000104", birth_date="1990-03-05")
    b = enroll(service, "7000105", birth_date="1991-03-04")
    worker.run_until_idle()
    worker.run_until_idle()                     # the same day again: nothing new
    assert active_points(service.db, a) == 300 and active_points(service.db, b) == 0
    clock.advance(days=1)                       # 03-03: 3 days ahead is 03-06: nobody
    worker.run_until_idle()
    assert active_points(service.db, b) == 0
    clock.advance(days=364)                     # 2027-03-02: a's birthday is 3 days ahead again
    worker.run_until_idle()
    assert active_points(service.db, a) == 600


def test_segment_entered_fires_for_members_added_after_the_first_look(scn):
    from loyalty.server.segments.service import SegmentService
    service, sc, worker = scn
    seg = SegmentService(service.db, clock=service.clock)
    seg.define_segment({"id": "vip", "type": "static"})
    first = enroll(service, "7000106")
    seg.add_members("vip", ["7000106"])
    sc.define({"id": "vip-welcome", "triggers": [{"segment_entered": {"segment": "vip"}}],
               "steps": [{"id": "t", "update_profile": {"field": "custom.vip_bonus", "increment": 5}},
                         {"id": "t2", "update_profile": {"field": "custom.vip_bonus", "increment": 2}},
                         {"id": "city", "update_profile": {"field": "city", "set": "Kazan"}}]})
    worker.run_until_idle()                     # first look: 7000106 was already inside
    second = enroll(service, "7000107")
    seg.add_members("vip", ["7000107"])
    worker.run_until_idle()
    assert [r["member_id"] for r in runs(service.db, "vip-welcome")] == [second]
    from loyalty.server.scenarios.common import load_member
    with service.db.read() as conn:
        m = load_member(conn, second)
        assert m["custom"] == {"vip_bonus": 7} and m["city"] == "Kazan"          # 0 + 5 + 2
        assert load_member(conn, first)["custom"] == {}


def test_add_to_static_segment_and_tag_steps(scn):
    from loyalty.server.segments.service import SegmentService
    service, sc, worker = scn
    seg = SegmentService(service.db, clock=service.clock)
    seg.define_segment({"id": "newcomers", "type": "static"})
    sc.define({"id": "mark", "triggers": ["member_registered"],
               "steps": [{"id": "seg", "add_to_segment": "newcomers"}, {"id": "tag", "add_tag": "new"}]})
    m = enroll(service, "7000108")
    worker.run_until_idle()
    assert m in seg.members_of("newcomers")
    assert seg.changes("newcomers")[0]["source"] == "scenario"


# ---- batch points actions ---------------------------------------------------------------------------------------

def test_batch_award_then_deduct_by_hand(scn):
    from loyalty.v1 import processing_pb2 as P
    from loyalty.v1 import receipt_pb2 as R
    service, sc, _ = scn
    a, b, c = (enroll(service, card) for card in ("7000201", "7000202", "7000203"))
    service.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card="7000202"), kind="credit", points=200,
                                                reason="opening", operation_id="open-b"))
    out = sc.start_batch("spring", "award", 100, reason="spring", expiry_days=30, members=["7000201", "7000202"])
    assert (out["state"], out["total"]) == ("running", 2)
    done = sc.run_batch("spring", chunk=1)
    # a: 0 + 100, b: 200 + 100, c: not in the list
    assert (done["state"], done["processed"], done["written"], done["points_moved"]) == ("done", 2, 2, 200)
    assert [active_points(service.db, m) for m in (a, b, c)] == [100, 300, 0]
    # the same request again: nothing more; another request under that id: refused
    assert sc.start_batch("spring", "award", 100, reason="spring", expiry_days=30,
                          members=["7000201", "7000202"])["state"] == "done"
    with pytest.raises(AlreadyExists):
        sc.start_batch("spring", "award", 101, reason="spring", members=["7000201"])
    # deduct 150 from everybody: a gives its 100, b 150 (300 -> 150), c has nothing
    sc.start_batch("fine", "deduct", 150, reason="fine", all_members=True)
    done = sc.run_batch("fine", chunk=2)
    assert (done["processed"], done["written"], done["points_moved"]) == (3, 2, 250)
    assert [active_points(service.db, m) for m in (a, b, c)] == [0, 150, 0]
    assert ledger.check(service.db) == []
    keys = [k for k, _, _ in ledger_rows(service.db) if k.startswith("batch:")]
    assert keys == [f"batch:spring:{a}", f"batch:spring:{b}", f"batch:fine:{a}", f"batch:fine:{b}"]


def test_batch_for_a_segment(scn):
    from loyalty.server.segments.service import SegmentService
    service, sc, _ = scn
    seg = SegmentService(service.db, clock=service.clock)
    seg.define_segment({"id": "gold-list", "type": "static"})
    ids = [enroll(service, f"70003{i:02d}") for i in range(5)]
    seg.add_members("gold-list", ["70003" + f"{i:02d}" for i in (1, 3)])
    sc.start_batch("gold", "award", 40, reason="gold", segment="gold-list")
    assert sc.run_batch("gold")["written"] == 2
    assert [active_points(service.db, m) for m in ids] == [0, 40, 0, 40, 0]


# ---- Admin gRPC -------------------------------------------------------------------------------------------------

def test_admin_grpc_define_stats_and_batch(scn):
    from concurrent import futures

    import grpc

    from loyalty.server.scenarios.grpc_service import add_scenarios_service
    from loyalty.v1 import scenarios_pb2 as S
    from loyalty.v1 import scenarios_pb2_grpc
    service, _, worker = scn
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_scenarios_service(server, service.runtime)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        stub = scenarios_pb2_grpc.ScenariosStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        created = stub.CreateScenario(S.ScenarioDefinition(yaml="id: g\ntriggers: [member_registered]\n"
                                                                "steps: [{id: a, award_points: 5}]\n"))
        assert (created.id, created.version, created.triggers, created.steps) == ("g", 1, 1, 1)
        with pytest.raises(grpc.RpcError) as exc:
            stub.UpdateScenario(S.ScenarioDefinition(yaml="id: g\ntriggers: [member_registered]\n"
                                                          "steps: [{id: a, fly: 5}]\n"))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "scenario.steps[0]" in exc.value.details()
        enroll(service, "7000400")
        worker.run_until_idle()
        stats = stub.GetScenarioStats(S.ScenarioRef(id="g"))
        assert (stats.steps[0].entered, stats.steps[0].completed, stats.runs_done) == (1, 1, 1)
        progress = stub.StartBatch(S.StartBatchRequest(batch_id="b", kind="award", points=3, reason="b",
                                                       all_members=True))
        assert (progress.state, progress.total) == ("running", 1)
        worker.run_until_idle()
        assert stub.GetBatchProgress(S.BatchRef(batch_id="b")).points_moved == 3
    finally:
        server.stop(0)
