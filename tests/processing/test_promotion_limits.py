"""Promotion budgets and usage limits: budgets are read inside the confirm's transaction (never exceeded by
more than one receipt, spent once by concurrent confirms), and cancels and final refunds give back the
coupon use and the budget while a partial refund keeps them. On SQLite and PostgreSQL, with the
demo program (SPEC section 3); numbers worked out by hand in the comments."""
from __future__ import annotations

from sqlalchemy import select

from helpers.purchases import AT, BUDGET_PROGRAM, concurrently, confirm, enroll, milk_receipt, refund, spent
from loyalty.server import ledger
from loyalty.server.models import promotion_usage
from loyalty.v1 import admin_pb2
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R


def test_discount_budget_is_never_exceeded_by_more_than_one_receipt(service):
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=BUDGET_PROGRAM))
    # 10% of milk 17980 = 1798; the budget of 100 is spent by the first receipt (eligible while spent < 100).
    first = service.confirm_purchase(P.ConfirmPurchaseRequest(receipt=milk_receipt(number="b-0")))
    assert first.answer.totals.discount == 1798
    later = [service.confirm_purchase(P.ConfirmPurchaseRequest(receipt=milk_receipt(number=f"b-{i}")))
             for i in (1, 2, 3)]
    assert [r.answer.totals.discount for r in later] == [0, 0, 0]
    assert spent(service, "budget-10") == 1798


def test_concurrent_confirms_spend_a_budget_once(service):
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=BUDGET_PROGRAM))
    got = concurrently(8, lambda i: service.confirm_purchase(
        P.ConfirmPurchaseRequest(receipt=milk_receipt(number=f"bc-{i}"))))
    assert all(isinstance(g, P.ConfirmPurchaseResponse) for g in got), got
    # exactly one receipt gets the 1798 discount, whatever the interleaving
    assert sorted(g.answer.totals.discount for g in got) == [0] * 7 + [1798]
    assert spent(service, "budget-10") == 1798


def _welcome(number):
    # 3 coffees 269700 >= 200000 with the WELCOME500 coupon: 50000 off the receipt (welcome-500, once per
    # member, from a discount budget).
    return R.Receipt(store="msk-01", terminal="pos-3", number=number, at=AT, coupons=["WELCOME500"],
                     lines=[R.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=3000, price=89900)])


def _uses(service, promotion="welcome-500"):
    with service.db.read() as conn:
        return sum(conn.execute(select(promotion_usage.c.uses)
                                .where(promotion_usage.c.promotion == promotion)).scalars())


def test_cancel_gives_back_the_coupon_use_and_the_budget(service):
    enroll(service, "7600012")
    assert confirm(service, "7600012", _welcome("w-1")).answer.totals.discount == 50000
    assert (_uses(service), spent(service, "welcome-500")) == (1, 50000)
    assert confirm(service, "7600012", _welcome("w-2")).answer.totals.discount == 0   # used once already
    service.cancel_purchase(P.CancelPurchaseRequest(purchase=P.PurchaseKey(store="msk-01", terminal="pos-3",
                                                                           number="w-1")))
    assert (_uses(service), spent(service, "welcome-500")) == (0, 0)
    assert confirm(service, "7600012", _welcome("w-3")).answer.totals.discount == 50000
    assert (_uses(service), spent(service, "welcome-500")) == (1, 50000)
    assert ledger.check(service.db) == []


def test_final_refund_gives_back_the_use_a_partial_one_keeps_it(service):
    enroll(service, "7600013")
    assert confirm(service, "7600013", _welcome("f-1")).answer.totals.discount == 50000
    refund(service, "f-r1", key=P.PurchaseKey(store="msk-01", terminal="pos-3", number="f-1"),
            lines=[(0, 1000)])
    assert (_uses(service), spent(service, "welcome-500")) == (1, 50000)       # partial: the use stays
    final = refund(service, "f-r2", key=P.PurchaseKey(store="msk-01", terminal="pos-3", number="f-1"),
                    all_remaining=True)
    assert final.final
    assert (_uses(service), spent(service, "welcome-500")) == (0, 0)
    assert confirm(service, "7600013", _welcome("f-2")).answer.totals.discount == 50000
