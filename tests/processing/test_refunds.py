"""Refunds on SQLite and PostgreSQL with the demo program (SPEC section 3): what a refund takes back before
activation and after expiry, partial refunds of weight lines and of halves, money plus points equal to what
was paid. Numbers worked out by hand in the comments."""
from __future__ import annotations

from sqlalchemy import select

from helpers.purchases import AT, KEY, balances_of, coffee, confirm, enroll, member, receipt_a, refund
from loyalty.server import jobs, ledger
from loyalty.server.models import purchase_lines, purchases
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R


def test_refund_before_activation_takes_back_from_pending(service):
    enroll(service, "7100002", points=1000)
    confirm(service, "7100002", receipt_a())                    # 695 active, 36 pending
    r = service.refund_purchase(P.RefundPurchaseRequest(refund_id="p-1", purchase=KEY,
                                                        lines=[P.RefundLine(line=1, quantity=1000)]))
    # cheese: 11 points taken from the pending lot (36 -> 25), 89 written-off points back (695 -> 784).
    assert (r.active_points, r.pending_points) == (784, 25)
    assert ledger.check(service.db) == []


def test_weight_line_partial_refunds_sum_to_exactly_the_line(service):
    enroll(service, "7100003", points=0)
    # 2.5 kg at 333.33: amount round-half-up(2500 x 33333 / 1000) = round(83332.5) = 83333; 3% -> 2499.99 -> 2499/100 = 24.
    rec = R.Receipt(store="s", terminal="t", number="w1", at=AT,
                    lines=[R.Line(sku="cheese-kg", quantity=2500, price=33333)])
    res = confirm(service, "7100003", rec)
    assert (res.answer.lines[0].payable, res.answer.totals.accrued_points) == (83333, 24)
    key = P.PurchaseKey(store="s", terminal="t", number="w1")
    got = [service.refund_purchase(P.RefundPurchaseRequest(refund_id=f"w{i}", purchase=key,
                                                           lines=[P.RefundLine(line=0, quantity=q)]))
           for i, q in enumerate((700, 900, 900))]
    # cumulative floors: 83333 x 700/2500 = 23333.24 -> 23333; x 1600/2500 = 53333.12 -> 53333 (+30000);
    # the last takes what is left: 83333 - 53333 = 30000. Points: floor(24 x .28) = 6, floor(24 x .64) = 15 (+9), 9.
    assert [g.refunded_amount for g in got] == [23333, 30000, 30000]
    assert [g.taken_back_points for g in got] == [6, 9, 9]
    assert got[-1].final
    assert member(service, "7100003").purchases_sum == 0
    assert ledger.check(service.db) == []


def test_refund_after_the_purchase_points_expired_takes_nothing_back(service, clock):
    enroll(service, "7600003")
    confirm(service, "7600003", coffee("x-1"))      # earns floor(89900 x 3% / 100) = 26, pending 14 days
    clock.advance(days=15)
    jobs.run_once(service.runtime)                          # active
    clock.advance(days=366)
    assert jobs.run_once(service.runtime)["expired_points"] == 26      # expiry_days 365 after activation
    service.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card="7600003"), kind="credit", points=500,
                                                reason="x", operation_id="x-credit"))
    r = refund(service, "x-r", key=P.PurchaseKey(store="msk-01", terminal="pos-3", number="x-1"),
                all_remaining=True)
    # the 26 expired already: nothing of the unrelated 500 credit is taken.
    assert (r.taken_back_points, r.active_points) == (0, 500)
    assert ledger.check(service.db) == []


def test_refund_after_partial_expiry_takes_back_only_what_did_not_expire(service, clock):
    enroll(service, "7600004")
    confirm(service, "7600004", coffee("x-2"))      # 26 points
    clock.advance(days=15)
    jobs.run_once(service.runtime)
    ref = R.MemberRef(card="7600004")
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="debit", points=20, operation_id="x-spend",
                                                reason="x"))
    clock.advance(days=366)
    assert jobs.run_once(service.runtime)["expired_points"] == 6       # 26 - 20 spent
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="credit", points=500, operation_id="x-credit2",
                                                reason="x"))
    r = refund(service, "x-r2", key=P.PurchaseKey(store="msk-01", terminal="pos-3", number="x-2"),
                all_remaining=True)
    # at most 26 - 6 expired = 20 (the ones the member spent) come back out: 500 - 20 = 480.
    assert (r.taken_back_points, r.active_points) == (20, 480)
    assert ledger.check(service.db) == []


def test_partial_refunds_return_money_plus_points_equal_to_what_was_paid(service):
    enroll(service, "7600010", points=1000)
    confirm(service, "7600010", receipt_a())        # SPEC A: 305 points redeemed: 3587 / 8978 / 17935 per line

    # The milk line (2 x 89.90 = 17980, 3587 of it paid with points): floor(3587 / 100) = 35 points back and
    # 17980 - 3500 = 14480 money: 14480 + 35 x 100 = 17980, the whole line.
    milk = refund(service, "p-1", lines=[(0, 2000)])
    assert (milk.refunded_amount, milk.returned_points) == (14480, 35)
    assert milk.refunded_amount + milk.returned_points * 100 == 17980

    # The cheese (45000, 8978 with points): cumulatively floor((3587 + 8978) / 100) = 125 points, minus 35
    # given = 90; money 45000 - 9000 = 36000 (the 87 of a point the milk left as money now completes one).
    cheese = refund(service, "p-2", lines=[(1, 1000)])
    assert (cheese.refunded_amount, cheese.returned_points) == (36000, 90)

    # The coffee, the final return (89900, 17935 with points): what is left of 305 = 305 - 125 = 180 points;
    # money 89900 - 18000 = 71900.
    rest = refund(service, "p-3", all_remaining=True)
    assert (rest.refunded_amount, rest.returned_points, rest.final) == (71900, 180, True)

    # Together: all 305 points and all the money paid, 152880 - 30500 = 122380.
    assert 35 + 90 + 180 == 305 and 14480 + 36000 + 71900 == 122380
    with service.db.read() as conn:
        row = conn.execute(select(purchases.c.refunded_amount, purchases.c.returned_points)).one()
    assert tuple(row) == (122380, 305)
    # pending 36 taken back in full (4 + 11 + 21); active 1000 - 305 + 305.
    assert balances_of(service, "7600010") == (1000, 0)
    assert ledger.check(service.db) == []


def test_half_lines_return_the_fraction_as_money(service):
    enroll(service, "7600011", points=1000)
    confirm(service, "7600011", receipt_a())
    # one milk of two: payable 17980 x 1/2 = 8990, redeemed floor(3587 / 2) = 1793 -> 17 points, money
    # 8990 - 1700 = 7290; the second milk: redeemed 3587 cumulatively -> 35 - 17 = 18 points, money
    # 8990 - 1800 = 7190. Together 7290 + 7190 + (17 + 18) x 100 = 17980.
    a = refund(service, "h-1", lines=[(0, 1000)])
    b = refund(service, "h-2", lines=[(0, 1000)])
    assert (a.refunded_amount, a.returned_points, b.refunded_amount, b.returned_points) == (7290, 17, 7190, 18)
    with service.db.read() as conn:
        assert conn.execute(select(purchase_lines.c.refunded_redeemed)
                            .where(purchase_lines.c.line == 0)).scalar_one() == 3587
