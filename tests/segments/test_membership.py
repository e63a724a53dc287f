"""Updatable runs with exact added / removed counts, static segments (untouched by recalculation, the
manual-change log, CSV import), audiences and tags, and a promotion for an audience that starts and stops
applying at the till after recalculations, seen through ``AudienceIndex`` by the receipt engine."""
from __future__ import annotations

import io

import pytest
from sqlalchemy import update

from helpers.segments import NOW, add_member
from helpers.storage import DEMO_PROGRAM
from loyalty.core import Engine, load_program_text
from loyalty.server.errors import FailedPrecondition
from loyalty.server.models import balances, subscriptions
from loyalty.server.segments.membership import AudienceIndex


def set_active(svc, **points):
    with svc.db.engine.begin() as c:
        for mid, value in points.items():
            c.execute(update(balances).where(balances.c.member_id == int(mid[1:])).values(active=value))


def test_updatable_runs_record_exact_added_and_removed(segsvc):
    with segsvc.db.engine.begin() as c:
        for mid, active in ((1, 150), (2, 50), (3, 100)):
            add_member(c, mid, active=active)
    segsvc.define_segment({"id": "rich", "type": "updatable", "conditions": {"points": {"active": {"gte": 100}}},
                           "schedule": "0 3 * * *"})
    run1 = segsvc.recalculate("rich")
    assert (run1["member_count"], run1["added"], run1["removed"]) == (2, 2, 0)      # {1, 3}
    set_active(segsvc, m1=10, m2=200)
    with segsvc.db.engine.begin() as c:
        add_member(c, 4, active=300)
    run2 = segsvc.recalculate("rich", source="cli")
    # {1, 3} -> {2, 3, 4}: 2 and 4 added, 1 removed
    assert (run2["member_count"], run2["added"], run2["removed"]) == (3, 2, 1)
    run3 = segsvc.recalculate("rich")
    assert (run3["member_count"], run3["added"], run3["removed"]) == (3, 0, 0)
    hist = segsvc.history("rich")
    assert [(h["source"], h["status"], h["added"], h["removed"]) for h in hist] == [
        ("api", "done", 0, 0), ("cli", "done", 2, 1), ("api", "done", 2, 0)]
    assert segsvc.count("rich") == 3
    # the schedule: next 03:00 after 2 March 12:00 is 3 March 03:00; nothing is due before it
    assert segsvc.get("rich")["next_run_at"].isoformat() == "2026-03-03T03:00:00+00:00"
    assert segsvc.run_due(NOW) == []
    due = segsvc.run_due(NOW.replace(day=3, hour=3))
    assert [r["source"] for r in due] == ["schedule"]


def test_static_segments_are_fixed_lists_with_a_change_log(segsvc):
    with segsvc.db.engine.begin() as c:
        for mid in (1, 2, 3):
            add_member(c, mid, active=500)
    segsvc.define_segment({"id": "vip-list", "type": "static"})
    r = segsvc.add_members("vip-list", ["C1", "+79000000002", "C1", "nobody"], actor="anna")
    assert (r["changed"], r["unknown"], r["member_count"]) == (2, 1, 2)
    assert r["unknown_refs"] == ["nobody"]
    r = segsvc.import_csv("vip-list", "card,name\nC2,x\nC3,y\n", actor="anna")
    assert (r["changed"], r["unchanged"], r["member_count"]) == (1, 1, 3)          # C2 was in already
    r = segsvc.remove_members("vip-list", ["id:1"], source="cli")
    assert (r["changed"], r["member_count"]) == (1, 2)
    log = segsvc.changes("vip-list")
    assert [(c["member_id"], c["action"], c["source"]) for c in reversed(log)] == [
        (1, "add", "api"), (2, "add", "api"), (3, "add", "csv"), (1, "remove", "cli")]
    with pytest.raises(FailedPrecondition):
        segsvc.recalculate("vip-list")
    segsvc.define_segment({"id": "u", "type": "updatable", "conditions": {"points": {"active": {"gte": 1}}},
                           "schedule": "* * * * *"})
    segsvc.run_due(NOW.replace(hour=13))
    assert set(segsvc.members_of("vip-list")) == {2, 3}          # untouched by the scheduled run
    with pytest.raises(FailedPrecondition):
        segsvc.add_members("u", ["C1"])                           # an updatable segment is not edited by hand
    out = io.StringIO()
    assert segsvc.export_csv("vip-list", out, ["member_id", "card"]) == 2
    assert out.getvalue().splitlines() == ["member_id,card", "2,C2", "3,C3"]
    assert [p["member_id"] for p in segsvc.preview("vip-list", ["member_id"], limit=1)] == [2]


def test_audiences_tags_and_the_index(segsvc):
    with segsvc.db.engine.begin() as c:
        add_member(c, 1, subs=["email"], active=500)
        add_member(c, 2, subs=["email"], active=5, tags=["staff"])
        add_member(c, 3, active=700)
    segsvc.define_segment({"id": "emailable", "type": "updatable", "conditions": {"subscribed": "email"}})
    segsvc.define_segment({"id": "staff", "type": "updatable", "conditions": {"tag": "staff"}})
    segsvc.recalculate("emailable")
    segsvc.recalculate("staff")
    segsvc.define_audience({"id": "mailing", "include": ["emailable"], "exclude": ["staff"]})
    assert segsvc.count("mailing") == 1                             # {1, 2} minus {2}
    r = segsvc.set_tag("emailable", "spring-promo", external=True)
    assert (r["tagged"], r["member_count"]) == (2, 2)
    index = AudienceIndex(segsvc.db, poll_interval=0)
    assert index.audiences_of(1) == {"emailable", "mailing", "spring-promo"}
    assert index.audiences_of(2) == {"emailable", "staff", "spring-promo"}
    assert index.audiences_of(3) == frozenset()
    # a dynamic segment is evaluated for one member at calculation time when a connection is given
    segsvc.define_segment({"id": "big-balance", "type": "dynamic", "conditions": {"points": {"active": {"gte": 600}}}})
    index.refresh()
    with segsvc.db.read() as conn:
        assert index.audiences_of(3, conn=conn) == {"big-balance"}
        assert index.audiences_of(1, conn=conn) == {"emailable", "mailing", "spring-promo"}


RECEIPT = {"store": "msk-01", "terminal": "pos-3", "number": "1", "channel": "pos", "at": "2026-03-02T12:30:00+03:00",
           "coupons": [], "redeem_points": 0, "lines": [{"sku": "milk-1l", "quantity": 2000, "price": 100000}]}


def test_a_promotion_starts_and_stops_applying_at_the_till_after_recalculations(segsvc):
    # The demo program's women-q1-20: 20% off receipts from 1,500.00 for audience women-q1 (SPEC 3).
    # The receipt is 2 x 1,000.00 = 2,000.00 on Monday 2 March 12:30 at msk-01: 20% is 400.00 off.
    engine = Engine(load_program_text(DEMO_PROGRAM))
    with segsvc.db.engine.begin() as c:
        add_member(c, 1, subs=["email"], accrued=[1500], purchases_=[("2026-02-10", 200000)])
    segsvc.define_segment({"id": "women-q1", "type": "updatable", "conditions": {"all": [
        {"gender": "female"}, {"purchases": {"last_date": {"between": ["2026-01-01", "2026-04-01"]}}},
        {"subscribed": "email"}, {"points": {"accrued_total": {"gt": 1000}}}]}})
    other_process = AudienceIndex(segsvc.db, poll_interval=0)

    def discount():
        member = {"card": "C1", "status": "active", "active_points": 0, "pending_points": 0,
                  "audiences": sorted(other_process.audiences_of(1))}
        return engine.calculate(RECEIPT, member, {})["totals"]["discount"]

    assert discount() == 0                               # not calculated yet: in no audience
    segsvc.recalculate("women-q1")
    assert discount() == 40000
    with segsvc.db.engine.begin() as c:                 # she switches email off ...
        c.execute(update(subscriptions).where(subscriptions.c.member_id == 1).values(on=False))
    assert discount() == 40000                           # ... nothing changes until the next recalculation
    run = segsvc.recalculate("women-q1")
    assert (run["added"], run["removed"]) == (0, 1)
    assert discount() == 0


@pytest.mark.redis
def test_a_recalculation_reaches_another_process_at_once_over_redis(tmp_path):
    import os
    import time

    import redis

    from loyalty.server import db
    from loyalty.server.segments.service import SegmentService

    url = os.environ.get("LOYALTY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {url} is unreachable: {exc}")
        pytest.skip(f"Redis at {url} is unreachable: {exc}")
    sqlite_url = f"sqlite:///{tmp_path / 'loyalty.db'}"
    db.upgrade(sqlite_url)
    writer = SegmentService.open(sqlite_url, redis_url=url, clock=lambda: NOW)
    with writer.db.engine.begin() as c:
        add_member(c, 1, active=150)
    writer.define_segment({"id": "rich", "type": "updatable", "conditions": {"points": {"active": {"gte": 100}}}})
    # The other process polls only once a minute: seeing the change within a second proves Redis told it.
    other = AudienceIndex(writer.db, redis_url=url, poll_interval=60)
    try:
        assert other.audiences_of(1) == frozenset()     # loads membership version 0: nothing calculated
        time.sleep(0.3)                                   # its listener is subscribed
        writer.recalculate("rich")
        deadline = time.monotonic() + 1.0
        while "rich" not in other.audiences_of(1):
            assert time.monotonic() < deadline, "the recalculation did not reach the other process in 1 s"
            time.sleep(0.05)
    finally:
        other.close()
        writer.close()
