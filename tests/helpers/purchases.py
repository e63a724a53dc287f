"""Purchase helpers of the processing tests: the SPEC's receipts as protobuf messages, enrolment with an
opening balance, confirms, balances, a program with a discount budget, and ways to send requests together
(threads released at once, or spaced inside a group-commit window)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from helpers.storage import DEMO_PROGRAM
from loyalty.server.models import promotion_budgets
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R

AT = "2026-03-02T12:30:00+03:00"
KEY = P.PurchaseKey(store="msk-01", terminal="pos-3", number="000123")


def receipt_a(number="000123", redeem=500):
    """SPEC example A: milk 2 x 89.90, cheese 450.00, coffee 899.00 = 152880."""
    return R.Receipt(store="msk-01", terminal="pos-3", number=number, channel="pos", at=AT, redeem_points=redeem,
                     lines=[R.Line(sku="milk-1l", categories=["dairy"], quantity=2000, price=8990),
                            R.Line(sku="cheese-200", categories=["dairy"], quantity=1000, price=45000),
                            R.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=1000, price=89900)])


def coffee(number, redeem=0, price=89900, at=AT):
    return R.Receipt(store="msk-01", terminal="pos-3", number=number, at=at, redeem_points=redeem,
                     lines=[R.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=1000, price=price)])


def enroll(service, card, points=0, **kw):
    service.enroll_member(P.EnrollMemberRequest(card=card, source="pos", **kw))
    if points:
        service.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card=card), kind="credit", points=points,
                                                    reason="opening", operation_id=f"open:{card}"))


def member(service, card):
    return service.get_member(P.GetMemberRequest(member=R.MemberRef(card=card)))


def confirm(service, card, receipt):
    return service.confirm_purchase(P.ConfirmPurchaseRequest(member=R.MemberRef(card=card), receipt=receipt))


def balances_of(service, card):
    m = member(service, card)
    return m.active_points, m.pending_points


def concurrently(n, fn):
    """``fn(i)`` for i in range(n) from n threads released together; results or exceptions, in order."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            return fn(i)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def refund(service, refund_id, key=KEY, lines=None, all_remaining=False):
    req = P.RefundPurchaseRequest(refund_id=refund_id, purchase=key, all_remaining=all_remaining,
                                  lines=[P.RefundLine(line=ln, quantity=q) for ln, q in (lines or [])])
    return service.refund_purchase(req)


def milk_line(**kw):
    d = dict(sku="milk-1l", categories=["dairy"], quantity=2000, price=8990)
    d.update(kw)
    return R.Line(**d)


def milk_receipt(number="v-1", **kw):
    d = dict(store="msk-01", terminal="pos-3", number=number, at=AT, lines=[milk_line()])
    d.update(kw)
    return R.Receipt(**d)


BUDGET_PROGRAM = DEMO_PROGRAM.replace("promotions:\n", """promotions:
  - id: budget-10
    priority: 99
    scope: all
    effect: {percent_off: 10}
    limits: {discount_budget: 100}
""", 1)


def spent(service, promotion):
    with service.db.read() as conn:
        return conn.execute(select(promotion_budgets.c.spent)
                            .where(promotion_budgets.c.promotion == promotion)).scalar_one()


def together(svc, requests, gap=0.02):
    """Submit ``requests`` in this order (``gap`` seconds apart, well inside the batch window); each result
    is the response or the ServiceError raised."""
    def one(i):
        time.sleep(i * gap)
        try:
            return svc.confirm_purchase(requests[i])
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return exc
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, range(len(requests))))
