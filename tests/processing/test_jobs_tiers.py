"""The periodic job over programs of one, two and many tier levels, with a windowed and a lifetime metric, on
SQLite and PostgreSQL: pending points activate, old ones expire, tiers are recalculated by the receipts' own
dates (SPEC 6). A program of a single level once broke the job's SQL (a CASE without a WHEN), so nothing ever
activated.

Numbers by hand: accrual 5% at every level unless said, activation 14 days, expiry 30 days, point = 1.00.
A receipt of 10 000.00 (1 000 000 kopecks) earns floor(1 000 000 x 5 / 100 / 100) = 500 points.
"""
from __future__ import annotations

import datetime as dt
import json

import pytest

from helpers.storage import Clock
from loyalty.server import jobs, ledger
from loyalty.server.processing import ProcessingService
from loyalty.server import db
from loyalty.v1 import admin_pb2, processing_pb2 as P, receipt_pb2 as R
from serverutil import cli

MSK = dt.timezone(dt.timedelta(hours=3))

LEVELS = {
    1: "    - {name: Only, from: 0, accrual_percent: 5}\n",
    2: "    - {name: Basic, from: 0, accrual_percent: 5}\n"
       "    - {name: Silver, from: 1500000, accrual_percent: 5}\n",
    4: "    - {name: Basic, from: 0, accrual_percent: 5}\n"
       "    - {name: Silver, from: 1500000, accrual_percent: 5}\n"
       "    - {name: Gold, from: 2500000, accrual_percent: 5}\n"
       "    - {name: Platinum, from: 9000000, accrual_percent: 5}\n",
}


def program(levels: int, window_days: int | None) -> str:
    window = f"  window_days: {window_days}\n" if window_days else ""
    return ("program: jobs\naccrual: {activation_days: 14, expiry_days: 30}\n"
            "tiers:\n  metric: purchases_sum\n" + window + "  levels:\n" + LEVELS[levels])


def receipt(number: str, at: dt.datetime, price: int = 1000000) -> R.Receipt:
    return R.Receipt(store="s1", terminal="t1", number=number, at=at.astimezone(MSK).isoformat(),
                     lines=[R.Line(sku="tv", quantity=1000, price=price)])


def balances(svc, card):
    m = svc.get_member(P.GetMemberRequest(member=R.MemberRef(card=card)))
    return m.active_points, m.pending_points, m.tier


@pytest.mark.parametrize("window_days", [None, 30])
@pytest.mark.parametrize("levels", [1, 2, 4])
def test_every_job_over_one_two_and_many_levels(database_url, levels, window_days):
    clock = Clock(dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.timezone.utc))
    db.upgrade(database_url)
    svc = ProcessingService.open(database_url, clock=clock)
    try:
        svc.publish_program(admin_pb2.PublishProgramRequest(yaml=program(levels, window_days)))
        svc.enroll_member(P.EnrollMemberRequest(card="c1", request_id="e1"))
        svc.enroll_member(P.EnrollMemberRequest(card="c2", request_id="e2"))
        # c1: today, 10 000.00 and 20 000.00 -> 500 + 1000 pending (the tier held before each receipt counts)
        svc.confirm_purchase(P.ConfirmPurchaseRequest(member=R.MemberRef(card="c1"), receipt=receipt("1", clock())))
        svc.confirm_purchase(P.ConfirmPurchaseRequest(member=R.MemberRef(card="c1"),
                                                      receipt=receipt("2", clock(), 2000000)))
        lowest = LEVELS[levels].split("name: ")[1].split(",")[0]
        top_today = {1: "Only", 2: "Silver", 4: "Gold"}[levels]     # metric 3 000 000
        assert balances(svc, "c1") == (0, 1500, top_today)
        # c2: a receipt of 40 days ago confirmed late: activated at once (its window is long past), and outside a
        # 30-day tier window
        svc.confirm_purchase(P.ConfirmPurchaseRequest(member=R.MemberRef(card="c2"),
                                                      receipt=receipt("3", clock() - dt.timedelta(days=40))))
        c2_tier = lowest        # 1 000 000 reaches no upper level, and is outside a 30-day window anyway
        assert balances(svc, "c2") == (500, 0, c2_tier)

        counts = jobs.run_once(svc.runtime)                 # nothing due yet: no failure on any shape
        assert (counts["activated_lots"], counts["expired_lots"], counts["tier_changes"]) == (0, 0, 0)

        clock.advance(days=14, minutes=1)           # c1's lots activate
        counts = jobs.run_once(svc.runtime)
        assert (counts["activated_lots"], counts["activated_points"]) == (2, 1500)
        assert balances(svc, "c1")[:2] == (1500, 0)

        clock.advance(days=17)                      # day 31: c1's receipts leave a 30-day window
        counts = jobs.run_once(svc.runtime)
        # c2's lot: activated on day 0 (receipt of day -40 + 14 is past), expires 30 days later
        assert (counts["expired_lots"], counts["expired_points"]) == (1, 500)
        expected = lowest if window_days else top_today
        assert balances(svc, "c1")[2] == expected
        assert counts["tier_downgrades"] == (1 if window_days and levels > 1 else 0)

        clock.advance(days=14)                      # day 45: c1's lots (activated day 14) expire on day 44
        counts = jobs.run_once(svc.runtime)
        assert (counts["expired_lots"], counts["expired_points"]) == (2, 1500)
        assert balances(svc, "c1")[:2] == (0, 0)
        assert ledger.check(svc.db) == []
    finally:
        svc.close()


def test_jobs_run_from_the_cli_on_a_single_level_program(tmp_path):
    """The reported case: one level, a member exists, ``loyalty jobs run --once`` must succeed."""
    url = f"sqlite:///{tmp_path / 'one.db'}"
    yaml_path = tmp_path / "one.yaml"
    yaml_path.write_text(program(1, 365))
    assert cli("db", "upgrade", "--database-url", url).returncode == 0
    published = cli("program", "publish", str(yaml_path), "--database-url", url)
    assert published.returncode == 0, published.stderr
    db_ = ProcessingService.open(url)
    try:
        db_.enroll_member(P.EnrollMemberRequest(card="c1", request_id="e1"))
    finally:
        db_.close()
    result = cli("jobs", "run", "--once", "--json", "--database-url", url)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["tier_changes"] == 0 and counts["activated_lots"] == 0
