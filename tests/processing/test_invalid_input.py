"""Values storage cannot hold are INVALID_ARGUMENT naming the field, before any write, and never with the
driver's text; a value of exactly the limit is kept whole. On SQLite and PostgreSQL, with the
demo program (SPEC section 3); numbers worked out by hand in the comments."""
from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DataError

from helpers.purchases import balances_of, confirm, enroll, member, milk_line, milk_receipt
from loyalty.server import ledger
from loyalty.server.errors import InvalidArgument
from loyalty.server.models import ledger as ledger_entries
from loyalty.server.models import members, purchases
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R



BAD_REQUESTS = [
    ("confirm", lambda: P.ConfirmPurchaseRequest(member=R.MemberRef(card="7600005"),
                                                 receipt=milk_receipt(lines=[milk_line(sku="x" * 65)])),
     "receipt.lines[0].sku"),
    ("confirm", lambda: P.ConfirmPurchaseRequest(member=R.MemberRef(card="7600005"),
                                                 receipt=milk_receipt(lines=[milk_line(sku="a\x00b")])),
     "receipt.lines[0].sku"),
    ("confirm", lambda: P.ConfirmPurchaseRequest(member=R.MemberRef(card="7600005"),
                                                 receipt=milk_receipt(store="a\x00b")), "receipt.store"),
    ("confirm", lambda: P.ConfirmPurchaseRequest(member=R.MemberRef(card="76\x0005"), receipt=milk_receipt()),
     "member.card"),
    ("confirm", lambda: P.ConfirmPurchaseRequest(receipt=milk_receipt(lines=[milk_line(categories=["da\x00iry"])])),
     "receipt.lines[0].categories[0]"),
    ("calculate", lambda: P.CalculateReceiptRequest(member=R.MemberRef(card="76\x0005"), receipt=milk_receipt()),
     "member.card"),
    ("calculate", lambda: P.CalculateReceiptRequest(receipt=milk_receipt(coupons=["W\x00"])), "receipt.coupons[0]"),
    ("get", lambda: P.GetMemberRequest(member=R.MemberRef(card="76\x0005")), "member.card"),
    ("adjust", lambda: P.AdjustPointsRequest(member=R.MemberRef(card="7600005"), kind="credit", points=1,
                                             reason="a\x00", operation_id="v-op1"), "reason"),
    ("adjust", lambda: P.AdjustPointsRequest(member=R.MemberRef(card="7600005"), kind="credit", points=1,
                                             operation_id="v-\x00"), "operation_id"),
    ("refund", lambda: P.RefundPurchaseRequest(refund_id="a\x00b", purchase=P.PurchaseKey(
        store="msk-01", terminal="pos-3", number="v-ok"), all_remaining=True), "refund_id"),
    ("refund", lambda: P.RefundPurchaseRequest(refund_id="v-r", purchase=P.PurchaseKey(
        store="msk-01", terminal="pos-3", number="v-ok"), all_remaining=True, reason="\x00"), "reason"),
    ("refund", lambda: P.RefundPurchaseRequest(refund_id="v-r", purchase=P.PurchaseKey(
        store="m" * 65, terminal="pos-3", number="v-ok"), all_remaining=True), "purchase.store"),
    ("cancel", lambda: P.CancelPurchaseRequest(purchase=P.PurchaseKey(store="msk-01", terminal="pos-3",
                                                                      number="v-\x00")), "purchase.number"),
    ("enroll", lambda: P.EnrollMemberRequest(card="7600006", profile=P.Profile(first_name="a\x00")),
     "profile.first_name"),
    ("enroll", lambda: P.EnrollMemberRequest(card="7600006", profile=P.Profile(custom={"k": "a\x00"})),
     "profile.custom['k']"),
    ("enroll", lambda: P.EnrollMemberRequest(card="7600006", request_id="r\x00"), "request_id"),
    ("status", lambda: P.SetCardStatusRequest(card="7600005", status="blocked", reason="\x00"), "reason"),
    ("status", lambda: P.SetCardStatusRequest(card="7600005", status="blocked", reason="r" * 501), "reason"),
    ("adjust", lambda: P.AdjustPointsRequest(member=R.MemberRef(card="7600005"), kind="credit", points=1,
                                             reason="я" * 501, operation_id="v-op2"), "reason"),
    ("refund", lambda: P.RefundPurchaseRequest(refund_id="v-r2", purchase=P.PurchaseKey(
        store="msk-01", terminal="pos-3", number="v-ok"), all_remaining=True, reason="r" * 501), "reason"),
    ("cancel", lambda: P.CancelPurchaseRequest(purchase=P.PurchaseKey(store="msk-01", terminal="pos-3",
                                                                      number="v-ok"), reason="r" * 501), "reason"),
]


CALLS = {"confirm": "confirm_purchase", "calculate": "calculate_receipt", "get": "get_member",
         "adjust": "adjust_points", "refund": "refund_purchase", "cancel": "cancel_purchase",
         "enroll": "enroll_member", "status": "set_card_status"}


def test_nul_characters_and_overlong_values_are_invalid_argument_naming_the_field(service):
    enroll(service, "7600005", points=100)
    confirm(service, "7600005", milk_receipt(number="v-ok"))
    # milk 17980 earns floor(17980 x 3% / 100) = floor(5.394) = 5 pending.
    assert balances_of(service, "7600005") == (100, 5)
    for what, make, path in BAD_REQUESTS:
        with pytest.raises(InvalidArgument) as info:
            getattr(service, CALLS[what])(make())
        assert info.value.path == path, (what, path, info.value.message)
    # nothing was written by any of them
    assert balances_of(service, "7600005") == (100, 5)
    assert member(service, "7600005").status == "active"
    with service.db.read() as conn:
        assert conn.execute(select(purchases.c.number)).scalars().all() == ["v-ok"]
        assert len(conn.execute(select(members.c.id)).scalars().all()) == 1
    assert ledger.check(service.db) == []


def test_a_value_storage_refuses_is_invalid_argument_without_driver_text(service, monkeypatch):
    enroll(service, "7600007")

    def refuse(*_args, **_kw):
        raise DataError("INSERT ...", {}, Exception("driver says: value too long for type character varying(64)"))

    monkeypatch.setattr(service.accounts, "_adjust_tx", refuse)
    with pytest.raises(InvalidArgument) as info:
        service.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card="7600007"), kind="credit", points=1,
                                                    reason="x", operation_id="d-1"))
    assert "driver" not in info.value.message and "varying" not in info.value.message


def test_a_reason_of_exactly_the_limit_is_kept_whole(service):
    enroll(service, "7600008")
    reason = "я" * 500                     # characters, not bytes: 1,000 bytes of UTF-8
    service.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card="7600008"), kind="credit", points=7,
                                                reason=reason, operation_id="v-limit"))
    assert balances_of(service, "7600008")[0] == 7
    with service.db.read() as conn:
        kept = conn.execute(select(ledger_entries.c.reason)
                            .where(ledger_entries.c.operation_id == "v-limit")).scalars().all()
    assert kept == [reason]
