"""Message events coming back from providers (SPEC 8) through the public API, on SQLite and PostgreSQL: a real
``loyalty serve`` on loopback, ``RecordMessageEvents`` through the Python client and ``loyalty messages
record`` through the CLI; the effects read back through GetMember, the Segments API and the welcome scenario of
the seeds (002) run by a worker.

Each test enrols its own members (cards 71xxxxx) on one server per backend, so they do not see each other's
events; the welcome scenario gets a server of its own (its triggers fire for every registration).
"""
from __future__ import annotations

import datetime as dt
import json
import pathlib
import subprocess
import sys
import threading
import uuid

import grpc
import pytest
from sqlalchemy import create_engine, func, select

from loyalty.clients.client import LoyaltyError
from loyalty.server.segments.models import message_events
from serverutil import BACKENDS, cli, fresh_postgres_database, server_on, start_server

UTC = dt.timezone.utc
MSK = dt.timezone(dt.timedelta(hours=3))
WELCOME = pathlib.Path(__file__).resolve().parents[2] / "server" / "scenarios" / "examples" / "welcome.yaml"


def iso(at: dt.datetime, tz=MSK) -> str:
    return at.astimezone(tz).isoformat(timespec="seconds")


def now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    with server_on(request.param, tmp_path_factory.mktemp(f"messages-{request.param}")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client(timeout=30.0) as c:
        yield c


def enrol(client, card: str, subs: dict, *, phone: str = "") -> int:
    m = client.enroll_member({"card": card, "source": "api", "phone": phone, "subscriptions": subs,
                              "profile": {"first_name": "Test", "email": f"{card}@example.com"}})
    return int(m.member_id)


def subscriptions(client, card: str) -> dict:
    return dict(client.get_member({"member": {"card": card}}).subscriptions)


def rows(server, *event_ids) -> list[tuple]:
    """(event_id, member_id, channel, kind, at, message_id, scenario_id) of the given ids, by id."""
    engine = create_engine(server.database_url)
    try:
        me = message_events.c
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(me.event_id, me.member_id, me.channel, me.kind, me.at, me.message_id, me.scenario_id)
                .where(me.event_id.in_(event_ids)).order_by(me.event_id))]
    finally:
        engine.dispose()


def record(client, *events):
    return client.record_message_events({"events": list(events)})


# ---- recording and idempotency --------------------------------------------------------------------------------

def test_events_are_recorded_once_and_a_retried_batch_reports_duplicates(server, client):
    anna = enrol(client, "7100001", {"email": True}, phone="+79100000001")
    t = now() - dt.timedelta(hours=1)
    batch = [
        {"id": "r1-open", "card": "7100001", "channel": "email", "kind": "opened", "at": iso(t)},
        {"id": "r1-dlv", "phone": "+7 (910) 000-00-01", "channel": "sms", "kind": "delivered", "at": iso(t, UTC)},
        {"id": "r1-click", "member_id": anna, "channel": "email", "kind": "clicked",
         "at": iso(t + dt.timedelta(minutes=5)), "message_id": "provider-msg-77", "scenario": "spring"},
        {"id": "r1-open", "card": "7100001", "channel": "email", "kind": "opened", "at": iso(t)},
    ]
    first = record(client, *batch)
    assert (first.recorded, first.duplicates, list(first.duplicate_indexes), list(first.rejected)) == (3, 1, [3], [])
    again = record(client, *batch)
    assert (again.recorded, again.duplicates, list(again.duplicate_indexes)) == (0, 4, [0, 1, 2, 3])
    assert rows(server, "r1-open", "r1-dlv", "r1-click") == [
        ("r1-click", anna, "email", "clicked", t + dt.timedelta(minutes=5), "provider-msg-77", "spring"),
        ("r1-dlv", anna, "sms", "delivered", t, None, None),       # the +03:00 and Z times are one instant
        ("r1-open", anna, "email", "opened", t, None, None),
    ]


def test_an_unknown_member_is_rejected_by_index_and_the_rest_of_the_batch_is_written(server, client):
    enrol(client, "7100002", {"email": True})
    t = iso(now() - dt.timedelta(minutes=30))
    out = record(client,
                 {"id": "r2-a", "card": "7100002", "channel": "email", "kind": "opened", "at": t},
                 {"id": "r2-b", "card": "7199999", "channel": "email", "kind": "opened", "at": t},
                 {"id": "r2-c", "phone": "+79199999999", "channel": "sms", "kind": "delivered", "at": t},
                 {"id": "r2-d", "message_id": "<nothing@provider>", "channel": "email", "kind": "opened", "at": t},
                 {"id": "r2-e", "card": "7100002", "channel": "email", "kind": "opened",
                  "at": iso(now() + dt.timedelta(days=3))})
    assert out.recorded == 1 and out.duplicates == 0
    assert [(r.index, r.id, r.field) for r in out.rejected] == [
        (1, "r2-b", "events[1].card"), (2, "r2-c", "events[2].phone"), (3, "r2-d", "events[3].message_id"),
        (4, "r2-e", "events[4].at")]
    assert out.rejected[0].reason == "no member with this card"
    assert [r[0] for r in rows(server, "r2-a", "r2-b", "r2-c", "r2-d", "r2-e")] == ["r2-a"]
    # a rejected id is not remembered: once the card exists, the same event is recorded
    enrol(client, "7199999", {})
    assert record(client, {"id": "r2-b", "card": "7199999", "channel": "email", "kind": "opened",
                           "at": t}).recorded == 1


@pytest.mark.parametrize("bad, field", [
    ({"kind": "read"}, "events[3].kind"),
    ({"id": ""}, "events[3].id"),
    ({"id": "x" * 65}, "events[3].id"),
    ({"at": "2026-03-02T12:30:00"}, "events[3].at"),
    ({"at": "yesterday"}, "events[3].at"),
    ({"channel": "pigeon"}, "events[3].channel"),
    ({"channel": ""}, "events[3].channel"),
    ({"card": "", "phone": "call me"}, "events[3].phone"),
    ({"card": ""}, "events[3].card"),
])
def test_a_bad_event_is_invalid_argument_naming_its_field_and_nothing_of_the_batch_is_written(
        server, client, bad, field):
    enrol_once(client, "7100003")
    t = iso(now() - dt.timedelta(minutes=10))
    tag = uuid.uuid4().hex[:8]
    good = [{"id": f"r3-{tag}-{i}", "card": "7100003", "channel": "email", "kind": "opened", "at": t}
            for i in range(4)]
    good[3].update(bad)
    with pytest.raises(LoyaltyError) as exc:
        record(client, *good)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.field == field
    assert rows(server, *[e["id"] for e in good]) == []


def test_more_than_a_thousand_events_is_invalid_argument(server, client):
    t = iso(now())
    with pytest.raises(LoyaltyError) as exc:
        record(client, *[{"id": f"big-{i}", "card": "7100003", "channel": "email", "kind": "opened", "at": t}
                         for i in range(1001)])
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.field == "events"


_enrolled: set = set()


def enrol_once(client, card: str) -> None:
    key = (client.target, card)
    if key not in _enrolled:
        enrol(client, card, {"email": True})
        _enrolled.add(key)


def test_ten_identical_concurrent_batches_write_each_event_once(server):
    with server.client(timeout=30.0) as c:
        for k in range(5):
            enrol(c, f"710001{k}", {"email": True})
    t = now() - dt.timedelta(hours=2)
    batch = [{"id": f"r4-{k}-{n}", "card": f"710001{k}", "channel": "email",
              "kind": ("opened", "clicked", "delivered")[n % 3], "at": iso(t + dt.timedelta(minutes=n))}
             for k in range(5) for n in range(40)]
    batch += [{"id": f"r4-unsub-{k}", "card": f"710001{k}", "channel": "email", "kind": "unsubscribed",
               "at": iso(t + dt.timedelta(hours=1))} for k in range(5)]
    barrier = threading.Barrier(10)
    answers, errors = [], []

    def send():
        try:
            with server.client(timeout=60.0) as c:
                barrier.wait()
                answers.append(c.record_message_events({"events": batch}))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=send) for _ in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert all(a.recorded + a.duplicates == len(batch) and not a.rejected for a in answers)
    assert sum(a.recorded for a in answers) == len(batch)
    assert sum(a.subscriptions_changed for a in answers) == 5
    engine = create_engine(server.database_url)
    try:
        me = message_events.c
        with engine.connect() as conn:
            counts = conn.execute(select(me.event_id, func.count()).where(me.event_id.like("r4-%"))
                                  .group_by(me.event_id)).all()
    finally:
        engine.dispose()
    assert len(counts) == len(batch) and {n for _, n in counts} == {1}
    with server.client() as c:
        assert all(subscriptions(c, f"710001{k}")["email"] is False for k in range(5))


# ---- effects --------------------------------------------------------------------------------------------------

def test_unsubscribed_and_confirmed_switch_the_subscription_and_a_late_older_event_changes_nothing(server, client):
    enrol(client, "7100020", {"email": True, "sms": True})
    t = now() - dt.timedelta(hours=3)
    out = record(client, {"id": "r5-u", "card": "7100020", "channel": "email", "kind": "unsubscribed", "at": iso(t)})
    assert out.subscriptions_changed == 1
    assert subscriptions(client, "7100020") == {"email": False, "sms": True}
    record(client, {"id": "r5-c", "card": "7100020", "channel": "email", "kind": "confirmed",
                    "at": iso(t + dt.timedelta(hours=1))},
           {"id": "r5-p", "card": "7100020", "channel": "push", "kind": "confirmed", "at": iso(t)})
    assert subscriptions(client, "7100020") == {"email": True, "sms": True, "push": True}
    # a webhook that arrives late, about an unsubscribe before the confirmation: recorded, changes nothing
    late = record(client, {"id": "r5-late", "card": "7100020", "channel": "email", "kind": "unsubscribed",
                           "at": iso(t + dt.timedelta(minutes=30))})
    assert (late.recorded, late.subscriptions_changed) == (1, 0)
    assert subscriptions(client, "7100020")["email"] is True
    # within one batch the newest event wins, whatever the order of the lines
    record(client, {"id": "r5-b2", "card": "7100020", "channel": "sms", "kind": "confirmed",
                    "at": iso(t + dt.timedelta(hours=2))},
           {"id": "r5-b1", "card": "7100020", "channel": "sms", "kind": "unsubscribed",
            "at": iso(t + dt.timedelta(hours=2, minutes=1))})
    assert subscriptions(client, "7100020")["sms"] is False


def test_while_a_card_is_suspended_events_change_what_is_restored_on_return(server, client):
    enrol(client, "7100021", {"email": True, "sms": True})
    client.set_card_status({"card": "7100021", "status": "suspended", "reason": "test"})
    assert subscriptions(client, "7100021") == {"email": False, "sms": False}
    t = now() - dt.timedelta(minutes=20)
    record(client, {"id": "r6-u", "card": "7100021", "channel": "email", "kind": "unsubscribed", "at": iso(t)},
           {"id": "r6-c", "card": "7100021", "channel": "push", "kind": "confirmed", "at": iso(t)})
    assert subscriptions(client, "7100021") == {"email": False, "sms": False, "push": False}
    client.set_card_status({"card": "7100021", "status": "active", "reason": "test"})
    assert subscriptions(client, "7100021") == {"email": False, "sms": True, "push": True}


def test_a_segment_on_opened_counts_provider_events_once(server, client):
    from loyalty.v1 import segments_pb2 as S
    from loyalty.v1 import segments_pb2_grpc
    for card in ("7100030", "7100031", "7100032"):
        enrol(client, card, {"email": True})
    t = now() - dt.timedelta(days=2)
    batch = [{"id": "r7-a1", "card": "7100030", "channel": "email", "kind": "opened", "at": iso(t)},
             {"id": "r7-a2", "card": "7100030", "channel": "email", "kind": "opened", "at": iso(t)},
             {"id": "r7-b1", "card": "7100031", "channel": "email", "kind": "opened", "at": iso(t)},
             {"id": "r7-c1", "card": "7100032", "channel": "email", "kind": "opened",
              "at": iso(now() - dt.timedelta(days=40))},
             {"id": "r7-c2", "card": "7100032", "channel": "email", "kind": "confirmed", "at": iso(t)}]
    record(client, *batch)
    record(client, *batch)                                  # a retry counts nothing twice
    record(client, {"id": "r7-b1", "card": "7100031", "channel": "email", "kind": "opened", "at": iso(t)})
    channel = grpc.insecure_channel(server.target)
    try:
        stub = segments_pb2_grpc.SegmentsStub(channel)
        ids = {}
        for sid, cond in (("opened-twice", {"messages": {"kind": "opened", "channel": "email", "window_days": 30,
                                                          "count": {"gte": 2}}}),
                          ("opened-once", {"messages": {"kind": "opened", "window_days": 30, "count": {"eq": 1}}}),
                          ("doi-confirmed", {"messages": {"kind": "confirmed", "channel": "email"}})):
            stub.CreateSegment(S.DefineSegmentRequest(id=sid, type="updatable", conditions_json=json.dumps(cond)))
            stub.RecalculateSegment(S.RecalculateSegmentRequest(id=sid))
            prev = stub.PreviewMembers(S.PreviewRequest(id=sid, columns=["card"], limit=100))
            ids[sid] = sorted(r.values[0] for r in prev.rows if r.values[0] in ("7100030", "7100031", "7100032"))
    finally:
        channel.close()
    assert ids == {"opened-twice": ["7100030"], "opened-once": ["7100031"], "doi-confirmed": ["7100032"]}


# ---- the CLI --------------------------------------------------------------------------------------------------

def test_cli_records_a_jsonl_file_through_the_server_and_a_rerun_records_nothing_twice(server, client, tmp_path):
    enrol(client, "7100040", {"email": True})
    t = now() - dt.timedelta(minutes=15)
    lines = [{"id": "r8-1", "card": "7100040", "channel": "email", "kind": "delivered", "at": iso(t)},
             {"id": "r8-2", "card": "7100040", "channel": "email", "kind": "unsubscribed", "at": iso(t)},
             {"id": "r8-3", "card": "7109999", "channel": "email", "kind": "opened", "at": iso(t)}]
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]) + "\n")
    out = cli("messages", "record", str(path), "--server", server.target)
    assert out.returncode == 1, out.stderr                  # one event could not be placed
    assert out.stdout.strip() == "3 events: 2 recorded, 0 duplicates, 1 rejected; 1 subscriptions changed"
    assert "rejected: line 4 (id r8-3): card: no member with this card" in out.stderr
    assert subscriptions(client, "7100040")["email"] is False
    again = cli("messages", "record", str(path), "--server", server.target, "--json", "--batch-size", "2")
    assert again.returncode == 1
    doc = json.loads(again.stdout)
    assert (doc["recorded"], doc["duplicates"], [r["line"] for r in doc["rejected"]]) == (0, 2, [4])
    # stdin
    enrol(client, "7109999", {})
    proc = subprocess.run([sys.executable, "-c", "from loyalty.cli.main import main; main()", "messages", "record",
                           "-", "--server", server.target], input=path.read_text(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3 events: 1 recorded, 2 duplicates, 0 rejected; 0 subscriptions changed"


def test_cli_names_the_bad_line_and_field_and_sends_nothing(server, tmp_path):
    t = iso(now())
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "r9-1", "card": "7100040", "channel": "email", "kind": "opened", "at": t})
                    + "\n" + json.dumps({"id": "r9-2", "card": "7100040", "channel": "email", "kind": "seen",
                                         "at": t}) + "\n")
    out = cli("messages", "record", str(path), "--server", server.target)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {path}:2: kind: expected one of sent, delivered, opened")
    assert "Traceback" not in out.stderr
    path.write_text('{"id": "r9-3", "card": "7100040"\n')
    out = cli("messages", "record", str(path), "--server", server.target)
    assert out.returncode == 2 and f"{path}:1: invalid JSON" in out.stderr
    path.write_text(json.dumps({"id": "r9-4", "card": "7100040", "channel": "email", "kind": "opened", "at": t,
                                "colour": "red"}) + "\n")
    out = cli("messages", "record", str(path), "--server", server.target)
    assert out.returncode == 2 and f"{path}:1: colour: unknown key" in out.stderr
    assert rows(server, "r9-1", "r9-2", "r9-3", "r9-4") == []


# ---- the welcome scenario of the seeds --------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def welcome_server(request, tmp_path):
    if request.param == "sqlite":
        srv = start_server(tmp_path)
        yield srv
        srv.stop()
        return
    with fresh_postgres_database() as url:
        srv = start_server(tmp_path, database_url=url)
        yield srv
        srv.stop()


def test_welcome_scenario_takes_its_confirmed_branch_after_a_double_opt_in_confirmation(welcome_server, tmp_path):
    """Anna confirms her e-mail (the provider reports ``confirmed`` about our welcome e-mail by its
    Message-ID); Boris does not. After the day's pause Anna gets the reward, Boris the SMS reminder."""
    from loyalty.server.scenarios import Worker
    from loyalty.v1 import scenarios_pb2 as S
    from loyalty.v1 import scenarios_pb2_grpc
    from helpers.storage import Clock

    srv = welcome_server
    channel = grpc.insecure_channel(srv.target)
    stub = scenarios_pb2_grpc.ScenariosStub(channel)
    stub.CreateScenario(S.ScenarioDefinition(yaml=WELCOME.read_text(encoding="utf-8").replace(
        "http://127.0.0.1:8089", "http://127.0.0.1:9")))
    codes = tmp_path / "codes.txt"
    codes.write_text("WELCOME-1\nWELCOME-2\n")
    assert cli("scenarios", "codes", "welcome", str(codes), "--database-url", srv.database_url).returncode == 0
    with srv.client(timeout=30.0) as client:
        anna = enrol(client, "7100050", {"email": True, "sms": True}, phone="+79100000050")
        enrol(client, "7100051", {"email": True, "sms": True}, phone="+79100000051")
    clock = Clock(now() + dt.timedelta(seconds=1))
    worker = Worker(srv.database_url, clock=clock)
    try:
        worker.run_until_idle()                                 # runs created, welcome e-mails sent, pause
        run = _run_of(srv, anna)
        with srv.client(timeout=30.0) as client:
            out = client.record_message_events({"events": [
                {"id": "esp-1", "message_id": f"<scenario.{run}.welcome_email.1@loyalty>", "kind": "sent",
                 "at": iso(clock() + dt.timedelta(minutes=1))},
                {"id": "esp-2", "message_id": f"<scenario.{run}.welcome_email.1@loyalty>", "kind": "confirmed",
                 "at": iso(clock() + dt.timedelta(hours=2))}]})
            assert (out.recorded, out.duplicates, out.subscriptions_changed) == (1, 1, 0)   # our own sent
        assert rows(srv, "esp-2")[0][1:4] == (anna, "email", "confirmed")
        assert rows(srv, "esp-2")[0][5:] == (f"scenario:{run}:welcome_email:1", "welcome")
        clock.advance(days=1)
        worker.run_until_idle()                                 # "confirmed within a day?"
    finally:
        worker.close()
    stats = stub.GetScenarioStats(S.ScenarioRef(id="welcome"))
    steps = {s.step: s for s in stats.steps}
    assert (steps["confirmed"].entered, steps["confirmed"].yes, steps["confirmed"].no) == (2, 1, 1)
    assert steps["reward"].completed == 1 and steps["sms_reminder"].completed == 1
    channel.close()
    with srv.client(timeout=30.0) as client:
        assert client.get_member({"member": {"card": "7100050"}}).active_points == 500
        assert client.get_member({"member": {"card": "7100051"}}).active_points == 0


def _run_of(server, member_id: int) -> int:
    from loyalty.server.scenarios.models import scenario_runs
    engine = create_engine(server.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(scenario_runs.c.id).where(scenario_runs.c.member_id == member_id)).scalar_one()
    finally:
        engine.dispose()


# ---- the migration --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_0006_keeps_earlier_rows_takes_the_new_kinds_and_downgrades(tmp_path, backend):
    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from loyalty.server import db

    def run(url):
        db.upgrade(url, "0004")
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO message_events (member_id, channel, kind, at) "
                                  "VALUES (1, 'email', 'opened', CURRENT_TIMESTAMP)"))
            db.upgrade(url, "0006")
            with engine.begin() as conn:
                assert conn.execute(text("SELECT kind, event_id FROM message_events")).all() == [("opened", None)]
                conn.execute(text("INSERT INTO message_events (member_id, channel, kind, at, event_id) "
                                  "VALUES (1, 'email', 'unsubscribed', CURRENT_TIMESTAMP, 'p-1')"))
            for kind, event_id in (("unsubscribed", "p-1"), ("read", "p-2")):   # a repeated id, a bad kind
                with pytest.raises(IntegrityError), engine.begin() as conn:
                    conn.execute(text("INSERT INTO message_events (member_id, channel, kind, at, event_id) "
                                      f"VALUES (1, 'email', '{kind}', CURRENT_TIMESTAMP, '{event_id}')"))
            command.downgrade(db.alembic_config(url), "0004")
            with engine.begin() as conn:
                assert conn.execute(text("SELECT kind FROM message_events")).scalars().all() == ["opened"]
        finally:
            engine.dispose()

    if backend == "sqlite":
        run(f"sqlite:///{tmp_path / 'm.db'}")
    else:
        with fresh_postgres_database() as url:
            run(url)


def test_the_api_and_the_validator_name_the_same_event_fields():
    from loyalty.server.scenarios.message_events import EVENT_KEYS
    from loyalty.v1 import scenarios_pb2
    assert tuple(f.name for f in scenarios_pb2.MessageEvent.DESCRIPTOR.fields) == EVENT_KEYS


def test_segment_sql_and_the_python_evaluator_agree_on_the_provider_kinds(segsvc):
    """Every kind a provider may report, by SQL (one query) and by the per-member evaluator."""
    from loyalty.server.segments import conditions as cond
    from loyalty.server.segments.models import MESSAGE_KINDS
    from helpers.segments import add_member
    kinds = MESSAGE_KINDS
    with segsvc.db.engine.begin() as c:
        for mid in range(1, len(kinds) + 2):
            # member m has one event of each of the first m-1 kinds (member 1: none), and a second of kind m-2
            msgs = [("email", k, "2026-02-25") for k in kinds[:mid - 1]]
            msgs += [("sms", kinds[mid - 2], "2026-03-01")] if mid > 1 else []
            add_member(c, mid, messages=msgs)
    with segsvc.db.read() as conn:
        facts = cond.load_facts(conn)
        ctx = segsvc._context(conn)
    for i, kind in enumerate(kinds):
        for leaf in ({"kind": kind}, {"kind": kind, "channel": "email", "window_days": 30},
                     {"kind": kind, "count": {"gte": 2}}, {"kind": kind, "channel": "sms"}):
            tree = cond.validate({"messages": leaf})
            expected = {mid for mid, f in facts.items() if cond.evaluate(tree, f, ctx)}
            segsvc.define_segment({"id": "k", "type": "dynamic", "conditions": tree})
            assert set(segsvc.members_of("k")) == expected, leaf
        assert expected == {i + 2}                            # the sms leaf: only the member whose pair it is
