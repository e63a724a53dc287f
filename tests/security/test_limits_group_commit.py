"""Operation limits inside one group-commit batch (PostgreSQL): the batch reads each member's and terminal's
figures once, after its member locks, and every confirm of it is checked against the figures as the batch's
earlier confirms leave them; a refused confirm writes nothing while the rest of its batch commits, and the soft
breaches are written with the batch, each naming its own purchase.

Program: the demo program with ``card_daily_confirms`` soft 1, hard 2 and ``card_daily_writeoff_points`` hard 150.
All receipts are of one day (``helpers.purchases.AT``); a batch decides its confirms in receipt-key order (the
order it inserts them in), so the numbers below are chosen to sort in the order the comments count.
"""
from __future__ import annotations

import logging

import pytest
from sqlalchemy import func, select

from helpers.purchases import coffee, enroll, together
from helpers.storage import DEMO_PROGRAM
from loyalty.server import db
from loyalty.server.models import purchases
from loyalty.server.processing import ProcessingService
from loyalty.server.security.limits import LimitExceeded
from loyalty.server.security.models import limit_breaches
from loyalty.v1 import admin_pb2
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R

pytestmark = pytest.mark.postgres

LIMITS = """
operation_limits:
  card_daily_confirms: {soft: 1, hard: 2}
  card_daily_writeoff_points: {hard: 150}
"""


@pytest.fixture
def batched(pg_url, clock, monkeypatch):
    """A service whose confirms wait up to 600 ms for a batch of up to 8 (staggered requests share one)."""
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH", "8")
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH_WINDOW_MS", "600")
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH_THREADS", "1")
    db.upgrade(pg_url)
    svc = ProcessingService.open(pg_url, clock=clock)
    svc.confirmation.batcher.idle_wait = True
    svc.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM + LIMITS, comment="limits"))
    try:
        yield svc
    finally:
        svc.close()


def _req(card, number, redeem=0):
    return P.ConfirmPurchaseRequest(member=R.MemberRef(card=card), receipt=coffee(number, redeem=redeem))


def test_one_batch_counts_its_own_confirms_against_the_limits(batched, caplog):
    caplog.set_level(logging.INFO, logger="loyalty")
    enroll(batched, "7400001", points=500)
    enroll(batched, "7400002", points=500)
    before = batched.confirmation.batcher.batches
    r = together(batched, [
        _req("7400001", "l-1"),                 # 7400001: 1st confirm of the day
        _req("7400001", "l-2", redeem=100),     # 2nd: past soft 1 (recorded), at hard 2; 100 written off
        _req("7400001", "l-3"),                 # 3rd: past hard 2: refused
        _req("7400002", "l-4", redeem=100),     # 7400002: 1st; 100 written off
        _req("7400002", "l-5", redeem=60),      # 2nd (soft: recorded); 160 > 150 written off: refused
        _req("7400002", "l-6"),                 # 2nd confirm (the refused one wrote nothing): allowed, recorded
    ])
    assert batched.confirmation.batcher.batches - before == 1          # all six in one transaction
    assert "rolled back" not in caplog.text                # decided in the batch, not each alone after it
    assert isinstance(r[2], LimitExceeded) and r[2].details["limit"] == "card_daily_confirms"
    assert isinstance(r[4], LimitExceeded) and r[4].details["limit"] == "card_daily_writeoff_points"
    assert r[4].details["value"] == 160
    ok = {i: int(r[i].purchase_id) for i in (0, 1, 3, 5)}
    with batched.db.read() as conn:
        numbers = set(conn.execute(select(purchases.c.number)).scalars())
        recorded = sorted(conn.execute(select(limit_breaches.c.number, limit_breaches.c.limit,
                                              limit_breaches.c.value, limit_breaches.c.purchase_id)).all())
    assert numbers == {"l-1", "l-2", "l-4", "l-6"}
    assert recorded == [("l-2", "card_daily_confirms", 2, ok[1]), ("l-6", "card_daily_confirms", 2, ok[5])]
    assert batched.get_member(P.GetMemberRequest(member=R.MemberRef(card="7400002"))).active_points == 400
