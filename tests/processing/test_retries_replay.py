"""Retries of one request replay its first answer: concurrent adjustments, refunds, cancels and enrollments
with one id, and retries that carry unknown protobuf fields (not part of the payload's hash). On SQLite and
PostgreSQL, with the demo program (SPEC section 3); numbers worked out by hand in the comments."""
from __future__ import annotations

import time

from sqlalchemy import select

from helpers.purchases import KEY, balances_of, coffee, concurrently, confirm, enroll, receipt_a
from loyalty.server import ledger
from loyalty.server.models import members
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R


def test_concurrent_adjustments_with_one_operation_id_replay(service):
    enroll(service, "7600008", points=1000)
    adj = P.AdjustPointsRequest(member=R.MemberRef(card="7600008"), kind="credit", points=7, reason="t",
                                operation_id="c-op")
    got = concurrently(6, lambda _: service.adjust_points(adj))
    assert all(isinstance(g, P.AdjustPointsResponse) for g in got), got
    assert sum(not g.replayed for g in got) == 1 and {g.active_points for g in got} == {1007}   # 1000 + 7 once
    assert ledger.check(service.db) == []


def test_concurrent_refunds_with_one_refund_id_replay(service):
    enroll(service, "7600015")
    confirm(service, "7600015", coffee("c-1"))       # 26 pending (floor(89900 x 3% / 100))
    rf = P.RefundPurchaseRequest(refund_id="c-rf", purchase=P.PurchaseKey(store="msk-01", terminal="pos-3",
                                                                          number="c-1"), all_remaining=True)
    got = concurrently(6, lambda _: service.refund_purchase(rf))
    assert all(isinstance(g, P.RefundPurchaseResponse) for g in got), got
    assert sum(not g.replayed for g in got) == 1 and {g.taken_back_points for g in got} == {26}
    assert balances_of(service, "7600015") == (0, 0)
    assert ledger.check(service.db) == []


def test_concurrent_cancels_replay(service):
    enroll(service, "7600016")
    confirm(service, "7600016", coffee("c-2"))       # 26 pending
    cancel = P.CancelPurchaseRequest(purchase=P.PurchaseKey(store="msk-01", terminal="pos-3", number="c-2"))
    got = concurrently(4, lambda _: service.cancel_purchase(cancel))
    assert all(isinstance(g, P.CancelPurchaseResponse) for g in got), got
    assert sum(not g.replayed for g in got) == 1 and {g.taken_back_points for g in got} == {26}
    assert balances_of(service, "7600016") == (0, 0)
    assert ledger.check(service.db) == []


def test_concurrent_enrollments_with_one_request_id_return_the_same_member(service, clock, monkeypatch):
    def slow_clock():           # read between the duplicate checks and the inserts: widens the race
        time.sleep(0.2)
        return clock()

    monkeypatch.setattr(service.runtime, "clock", slow_clock)
    enr = P.EnrollMemberRequest(card="7600009", request_id="c-enroll", source="pos")
    got = concurrently(6, lambda _: service.enroll_member(enr))
    assert all(isinstance(g, P.Member) for g in got), got
    assert len({g.member_id for g in got}) == 1
    with service.db.read() as conn:
        assert len(conn.execute(select(members.c.id)).scalars().all()) == 1


UNKNOWN_FIELD = bytes([0x98, 0x06, 0x01])      # field 99, varint 1: tag (99 << 3) | 0 = 792 = 0x98 0x06


def _with_unknown(message):
    out = type(message)()
    out.ParseFromString(message.SerializeToString() + UNKNOWN_FIELD)
    assert out.SerializeToString() != message.SerializeToString()      # the unknown field survived parsing
    return out


def test_retries_carrying_unknown_fields_replay(service):
    enroll(service, "7600014", points=1000)
    req = P.ConfirmPurchaseRequest(member=R.MemberRef(card="7600014"), receipt=receipt_a())
    first = service.confirm_purchase(req)
    again = service.confirm_purchase(_with_unknown(req))
    assert again.replayed and again.purchase_id == first.purchase_id
    rf = P.RefundPurchaseRequest(refund_id="u-1", purchase=KEY, lines=[P.RefundLine(line=1, quantity=1000)])
    r1 = service.refund_purchase(rf)
    r2 = service.refund_purchase(_with_unknown(rf))
    assert r2.replayed and r2.returned_points == r1.returned_points == 89      # floor(8978 / 100)
    adj = P.AdjustPointsRequest(member=R.MemberRef(card="7600014"), kind="credit", points=5, reason="x",
                                operation_id="u-op")
    service.adjust_points(adj)
    assert service.adjust_points(_with_unknown(adj)).replayed
