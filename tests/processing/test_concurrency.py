"""Concurrent spends of one card never take more than the balance (SPEC 5): the losers get
FAILED_PRECONDITION with the available balance and nothing of their receipt is written; storage failures
are UNAVAILABLE with nothing half-written."""
from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from helpers.purchases import coffee, enroll, receipt_a
from loyalty.server import db, ledger
from loyalty.server.errors import FailedPrecondition, Unavailable
from loyalty.server.models import purchases
from loyalty.server.processing import ProcessingService
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R


def test_fifty_threads_spending_one_card_never_exceed_the_balance(service):
    enroll(service, "7200001", points=1000)
    barrier = threading.Barrier(50)

    def spend(i):
        # coffee 89900: cap 17980 -> up to 179 points; each receipt asks for 100.
        req = P.ConfirmPurchaseRequest(member=R.MemberRef(card="7200001"), receipt=coffee(f"c-{i}", redeem=100))
        barrier.wait()
        try:
            return service.confirm_purchase(req)
        except FailedPrecondition as exc:
            return exc

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(spend, range(50)))
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, FailedPrecondition)]
    # 1000 points / 100 per receipt = exactly 10 winners; every loser saw less than 100 available.
    assert (len(won), len(lost)) == (10, 40)
    assert all(exc.details["available_points"] < 100 for exc in lost)
    m = service.get_member(P.GetMemberRequest(member=R.MemberRef(card="7200001")))
    # each winner earns floor((89900 - 10000) x 3% / 100) = 23 pending
    assert (m.active_points, m.pending_points) == (0, 10 * 23)
    with service.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(purchases)).scalar() == 10
    assert ledger.check(service.db) == []


def test_same_receipt_from_many_threads_is_written_once(service):
    enroll(service, "7200002", points=1000)
    req = P.ConfirmPurchaseRequest(member=R.MemberRef(card="7200002"), receipt=receipt_a())
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: service.confirm_purchase(req), range(8)))
    assert len({r.purchase_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    m = service.get_member(P.GetMemberRequest(member=R.MemberRef(card="7200002")))
    assert (m.active_points, m.pending_points) == (695, 36)     # SPEC A once: 1000 - 305, +36
    assert ledger.check(service.db) == []


def test_sqlite_locked_past_the_timeout_is_unavailable_and_writes_nothing(tmp_path, monkeypatch, clock):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    db.upgrade(url)
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    from helpers.storage import DEMO_PROGRAM
    from loyalty.v1 import admin_pb2
    svc = ProcessingService.open(url, clock=clock)
    try:
        svc.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM))
        enroll(svc, "7200003", points=1000)
        blocker = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(Unavailable):
                svc.confirm_purchase(P.ConfirmPurchaseRequest(member=R.MemberRef(card="7200003"),
                                                              receipt=receipt_a()))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        m = svc.get_member(P.GetMemberRequest(member=R.MemberRef(card="7200003")))
        assert (m.active_points, m.pending_points) == (1000, 0)
        with svc.db.read() as conn:
            assert conn.execute(select(func.count()).select_from(purchases)).scalar() == 0
    finally:
        svc.close()


def test_postgresql_refusing_connections_is_unavailable():
    svc = ProcessingService.open("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    try:
        assert svc.check_ready() is False
        with pytest.raises(Unavailable) as e:
            svc.calculate_receipt(P.CalculateReceiptRequest(receipt=receipt_a()))
        assert "127.0.0.1" not in e.value.message          # the client never sees driver text
    finally:
        svc.close()


def test_confirm_spends_the_earliest_expiring_lots_first_and_writes_every_row_once(service):
    """The confirm's write (one statement on PostgreSQL) consumes lots in write-off order and writes the
    purchase, its lines, two ledger entries, the pending lot, the balance and the event exactly once."""
    from loyalty.server.models import events, ledger as ledger_t, point_lots, purchase_lines

    enroll(service, "7200010")
    ref = R.MemberRef(card="7200010")
    for op, points, days in (("late", 50, 400), ("soon", 30, 10), ("mid", 40, 100)):
        service.adjust_points(P.AdjustPointsRequest(member=ref, kind="credit", points=points, expiry_days=days,
                                                    reason="x", operation_id=f"lot-{op}"))
    # coffee 89900: cap floor(89900 x 20%) = 17980 -> at most 179 points; 60 asked, 120 held.
    r = service.confirm_purchase(P.ConfirmPurchaseRequest(member=ref, receipt=coffee("lots-1", redeem=60)))
    assert r.answer.totals.redeemed_points == 60
    # earns floor((89900 - 6000) x 3% / 100) = floor(25.17) = 25, pending for 14 days
    assert r.answer.totals.accrued_points == 25
    with service.db.read() as conn:
        lots = conn.execute(select(point_lots.c.points, point_lots.c.remaining, point_lots.c.state)
                            .order_by(point_lots.c.id)).all()
        # write-off order: "soon" (10 days) 30 -> 0, then "mid" (100 days) 40 -> 10; "late" untouched
        assert [tuple(x) for x in lots] == [(50, 50, "active"), (30, 0, "active"), (40, 10, "active"),
                                            (25, 25, "pending")]
        pid = int(r.purchase_id)
        kinds = conn.execute(select(ledger_t.c.kind, ledger_t.c.active_delta, ledger_t.c.pending_delta)
                             .where(ledger_t.c.purchase_id == pid).order_by(ledger_t.c.id)).all()
        assert [tuple(x) for x in kinds] == [("redemption", -60, 0), ("accrual", 0, 25)]
        assert conn.execute(select(func.count()).select_from(purchase_lines)
                            .where(purchase_lines.c.purchase_id == pid)).scalar() == 1
        payload = conn.execute(select(events.c.payload).where(events.c.key == f"purchase_confirmed:{pid}")).scalar()
        assert (payload["purchase_id"], payload["redeemed_points"], payload["accrued_points"]) == (str(pid), 60, 25)
    m = service.get_member(P.GetMemberRequest(member=ref))
    assert (m.active_points, m.pending_points) == (120 - 60, 25)
    assert ledger.check(service.db) == []
    again = service.confirm_purchase(P.ConfirmPurchaseRequest(member=ref, receipt=coffee("lots-1", redeem=60)))
    assert (again.replayed, again.purchase_id, again.answer) == (True, r.purchase_id, r.answer)


def test_many_members_confirming_at_once_keep_the_ledger_exact(service):
    """Eight threads, four members, receipts with and without points: every balance is the hand-worked sum."""
    cards = [f"72001{i:02d}" for i in range(4)]
    for card in cards:
        enroll(service, card, points=500)

    def work(i):
        card = cards[i % 4]
        # odd receipts spend 50 points: coffee 89900 - 5000 = 84900 -> floor(25.47) = 25 earned;
        # even ones spend none: floor(26.97) = 26 earned
        redeem = 50 if i % 2 else 0
        return service.confirm_purchase(P.ConfirmPurchaseRequest(member=R.MemberRef(card=card),
                                                                 receipt=coffee(f"many-{i}", redeem=redeem)))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(40)))
    assert len({r.purchase_id for r in results}) == 40
    # member k gets receipts i = k, k+4, ..., 10 of them, all of the same parity as k
    for k, card in enumerate(cards):
        m = service.get_member(P.GetMemberRequest(member=R.MemberRef(card=card)))
        expected = (500 - 10 * 50, 10 * 25) if k % 2 else (500, 10 * 26)
        assert (m.active_points, m.pending_points) == expected
    assert ledger.check(service.db) == []
