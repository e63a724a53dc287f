"""Cancels keyed by the purchase: keys with slashes or of the full 64 characters reverse exactly their
purchase. On SQLite and PostgreSQL, with the demo program (SPEC section 3); numbers worked out by hand in
the comments."""
from __future__ import annotations

from sqlalchemy import select

from helpers.purchases import AT, balances_of, confirm, enroll
from loyalty.server import ledger
from loyalty.server.models import purchases
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R


def test_cancel_of_keys_containing_slashes_reverses_each_purchase(service):
    enroll(service, "7600001", points=1000)
    # "a/b" + "c" and "a" + "b/c" joined with "/" were the same cancel key: the second cancel replayed the first.
    first = R.Receipt(store="a/b", terminal="c", number="n1", at=AT, redeem_points=30,
                      lines=[R.Line(sku="milk-1l", categories=["dairy"], quantity=2000, price=8990)])
    second = R.Receipt(store="a", terminal="b/c", number="n1", at=AT, redeem_points=30,
                       lines=[R.Line(sku="milk-1l", categories=["dairy"], quantity=2000, price=8990)])
    confirm(service, "7600001", first)
    confirm(service, "7600001", second)
    # each: milk 17980, cap floor(17980 x 20%) = 3596 -> 35 >= 30 redeemed; earns
    # floor((17980 - 3000) x 3% / 100) = floor(4.494) = 4 pending. 1000 - 2 x 30 = 940 active, 8 pending.
    assert balances_of(service, "7600001") == (940, 8)
    c1 = service.cancel_purchase(P.CancelPurchaseRequest(purchase=P.PurchaseKey(store="a/b", terminal="c",
                                                                                number="n1")))
    c2 = service.cancel_purchase(P.CancelPurchaseRequest(purchase=P.PurchaseKey(store="a", terminal="b/c",
                                                                                number="n1")))
    assert not c1.replayed and not c2.replayed and c1.purchase_id != c2.purchase_id
    assert (c2.returned_points, c2.taken_back_points) == (30, 4)
    assert balances_of(service, "7600001") == (1000, 0)       # both reversed: 940 + 60, 8 - 8
    with service.db.read() as conn:
        assert set(conn.execute(select(purchases.c.status)).scalars()) == {"cancelled"}
    assert ledger.check(service.db) == []


def test_purchase_with_64_character_key_can_be_cancelled(service):
    enroll(service, "7600002")
    long_key = dict(store="s" * 64, terminal="t" * 64, number="n" * 64)
    rec = R.Receipt(**long_key, at=AT, lines=[R.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=1000,
                                                     price=89900)])
    assert confirm(service, "7600002", rec).answer.totals.accrued_points == 26   # floor(89900 x 3% / 100)
    c = service.cancel_purchase(P.CancelPurchaseRequest(purchase=P.PurchaseKey(**long_key)))
    assert (c.taken_back_points, c.pending_points, c.replayed) == (26, 0, False)
    again = service.cancel_purchase(P.CancelPurchaseRequest(purchase=P.PurchaseKey(**long_key)))
    assert again.replayed and again.taken_back_points == 26
