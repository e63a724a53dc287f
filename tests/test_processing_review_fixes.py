"""Regressions of the processing code review, on SQLite and PostgreSQL, with the demo program (SPEC section 3):
cancel keys, take-backs after expiry, storage-safe validation, concurrent retries, budgets read in the
confirm's transaction, money for fractions of points, limits given back by cancels and final refunds, and
request hashes that ignore unknown protobuf fields. Numbers are worked out by hand in the comments."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DataError

from loyalty.server import jobs, ledger
from loyalty.server.errors import InvalidArgument
from loyalty.server.models import ledger as ledger_entries
from loyalty.server.models import members, promotion_budgets, promotion_usage, purchase_lines, purchases
from loyalty.v1 import admin_pb2
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R
from test_processing_flow import AT, KEY, balances_of, coffee, confirm, enroll, member, receipt_a
from test_storage_fixtures import DEMO_PROGRAM, clock, database_url, pg_url, service  # noqa: F401 - fixtures


def _concurrently(n, fn):
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


def _refund(service, refund_id, key=KEY, lines=None, all_remaining=False):
    req = P.RefundPurchaseRequest(refund_id=refund_id, purchase=key, all_remaining=all_remaining,
                                  lines=[P.RefundLine(line=ln, quantity=q) for ln, q in (lines or [])])
    return service.refund_purchase(req)


# ---- 1. cancel keyed by the purchase --------------------------------------------------------------------------

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
    assert ledger.check(service) == []


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


# ---- 2. refunds never take back what expired ------------------------------------------------------------------

def test_refund_after_the_purchase_points_expired_takes_nothing_back(service, clock):
    enroll(service, "7600003")
    confirm(service, "7600003", coffee("x-1"))      # earns floor(89900 x 3% / 100) = 26, pending 14 days
    clock.advance(days=15)
    jobs.run_once(service)                          # active
    clock.advance(days=366)
    assert jobs.run_once(service)["expired_points"] == 26      # expiry_days 365 after activation
    service.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card="7600003"), kind="credit", points=500,
                                                reason="x", operation_id="x-credit"))
    r = _refund(service, "x-r", key=P.PurchaseKey(store="msk-01", terminal="pos-3", number="x-1"),
                all_remaining=True)
    # the 26 expired already: nothing of the unrelated 500 credit is taken.
    assert (r.taken_back_points, r.active_points) == (0, 500)
    assert ledger.check(service) == []


def test_refund_after_partial_expiry_takes_back_only_what_did_not_expire(service, clock):
    enroll(service, "7600004")
    confirm(service, "7600004", coffee("x-2"))      # 26 points
    clock.advance(days=15)
    jobs.run_once(service)
    ref = R.MemberRef(card="7600004")
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="debit", points=20, operation_id="x-spend",
                                                reason="x"))
    clock.advance(days=366)
    assert jobs.run_once(service)["expired_points"] == 6       # 26 - 20 spent
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="credit", points=500, operation_id="x-credit2",
                                                reason="x"))
    r = _refund(service, "x-r2", key=P.PurchaseKey(store="msk-01", terminal="pos-3", number="x-2"),
                all_remaining=True)
    # at most 26 - 6 expired = 20 (the ones the member spent) come back out: 500 - 20 = 480.
    assert (r.taken_back_points, r.active_points) == (20, 480)
    assert ledger.check(service) == []


# ---- 3. values storage cannot hold are INVALID_ARGUMENT before any write -----------------------------------------

def _line(**kw):
    d = dict(sku="milk-1l", categories=["dairy"], quantity=2000, price=8990)
    d.update(kw)
    return R.Line(**d)


def _receipt(number="v-1", **kw):
    d = dict(store="msk-01", terminal="pos-3", number=number, at=AT, lines=[_line()])
    d.update(kw)
    return R.Receipt(**d)


BAD_REQUESTS = [
    ("confirm", lambda: P.ConfirmPurchaseRequest(member=R.MemberRef(card="7600005"),
                                                 receipt=_receipt(lines=[_line(sku="x" * 65)])),
     "receipt.lines[0].sku"),
    ("confirm", lambda: P.ConfirmPurchaseRequest(member=R.MemberRef(card="7600005"),
                                                 receipt=_receipt(lines=[_line(sku="a\x00b")])),
     "receipt.lines[0].sku"),
    ("confirm", lambda: P.ConfirmPurchaseRequest(member=R.MemberRef(card="7600005"),
                                                 receipt=_receipt(store="a\x00b")), "receipt.store"),
    ("confirm", lambda: P.ConfirmPurchaseRequest(member=R.MemberRef(card="76\x0005"), receipt=_receipt()),
     "member.card"),
    ("confirm", lambda: P.ConfirmPurchaseRequest(receipt=_receipt(lines=[_line(categories=["da\x00iry"])])),
     "receipt.lines[0].categories[0]"),
    ("calculate", lambda: P.CalculateReceiptRequest(member=R.MemberRef(card="76\x0005"), receipt=_receipt()),
     "member.card"),
    ("calculate", lambda: P.CalculateReceiptRequest(receipt=_receipt(coupons=["W\x00"])), "receipt.coupons[0]"),
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
    confirm(service, "7600005", _receipt(number="v-ok"))
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
    assert ledger.check(service) == []


def test_a_value_storage_refuses_is_invalid_argument_without_driver_text(service, monkeypatch):
    enroll(service, "7600007")

    def refuse(*_args, **_kw):
        raise DataError("INSERT ...", {}, Exception("driver says: value too long for type character varying(64)"))

    monkeypatch.setattr(service, "_adjust_tx", refuse)
    with pytest.raises(InvalidArgument) as info:
        service.adjust_points(P.AdjustPointsRequest(member=R.MemberRef(card="7600007"), kind="credit", points=1,
                                                    reason="x", operation_id="d-1"))
    assert "driver" not in info.value.message and "varying" not in info.value.message


# ---- 4. concurrent retries replay ----------------------------------------------------------------------------

def test_concurrent_adjustments_with_one_operation_id_replay(service):
    enroll(service, "7600008", points=1000)
    adj = P.AdjustPointsRequest(member=R.MemberRef(card="7600008"), kind="credit", points=7, reason="t",
                                operation_id="c-op")
    got = _concurrently(6, lambda _: service.adjust_points(adj))
    assert all(isinstance(g, P.AdjustPointsResponse) for g in got), got
    assert sum(not g.replayed for g in got) == 1 and {g.active_points for g in got} == {1007}   # 1000 + 7 once
    assert ledger.check(service) == []


def test_concurrent_refunds_with_one_refund_id_replay(service):
    enroll(service, "7600015")
    confirm(service, "7600015", coffee("c-1"))       # 26 pending (floor(89900 x 3% / 100))
    rf = P.RefundPurchaseRequest(refund_id="c-rf", purchase=P.PurchaseKey(store="msk-01", terminal="pos-3",
                                                                          number="c-1"), all_remaining=True)
    got = _concurrently(6, lambda _: service.refund_purchase(rf))
    assert all(isinstance(g, P.RefundPurchaseResponse) for g in got), got
    assert sum(not g.replayed for g in got) == 1 and {g.taken_back_points for g in got} == {26}
    assert balances_of(service, "7600015") == (0, 0)
    assert ledger.check(service) == []


def test_concurrent_cancels_replay(service):
    enroll(service, "7600016")
    confirm(service, "7600016", coffee("c-2"))       # 26 pending
    cancel = P.CancelPurchaseRequest(purchase=P.PurchaseKey(store="msk-01", terminal="pos-3", number="c-2"))
    got = _concurrently(4, lambda _: service.cancel_purchase(cancel))
    assert all(isinstance(g, P.CancelPurchaseResponse) for g in got), got
    assert sum(not g.replayed for g in got) == 1 and {g.taken_back_points for g in got} == {26}
    assert balances_of(service, "7600016") == (0, 0)
    assert ledger.check(service) == []


def test_concurrent_enrollments_with_one_request_id_return_the_same_member(service, clock, monkeypatch):
    def slow_clock():           # read between the duplicate checks and the inserts: widens the race
        time.sleep(0.2)
        return clock()

    monkeypatch.setattr(service, "clock", slow_clock)
    enr = P.EnrollMemberRequest(card="7600009", request_id="c-enroll", source="pos")
    got = _concurrently(6, lambda _: service.enroll_member(enr))
    assert all(isinstance(g, P.Member) for g in got), got
    assert len({g.member_id for g in got}) == 1
    with service.db.read() as conn:
        assert len(conn.execute(select(members.c.id)).scalars().all()) == 1


# ---- 5. budgets are read inside the confirm's transaction -----------------------------------------------------

BUDGET_PROGRAM = DEMO_PROGRAM.replace("promotions:\n", """promotions:
  - id: budget-10
    priority: 99
    scope: all
    effect: {percent_off: 10}
    limits: {discount_budget: 100}
""", 1)


def _spent(service, promotion):
    with service.db.read() as conn:
        return conn.execute(select(promotion_budgets.c.spent)
                            .where(promotion_budgets.c.promotion == promotion)).scalar_one()


def test_discount_budget_is_never_exceeded_by_more_than_one_receipt(service):
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=BUDGET_PROGRAM))
    # 10% of milk 17980 = 1798; the budget of 100 is spent by the first receipt (eligible while spent < 100).
    first = service.confirm_purchase(P.ConfirmPurchaseRequest(receipt=_receipt(number="b-0")))
    assert first.answer.totals.discount == 1798
    later = [service.confirm_purchase(P.ConfirmPurchaseRequest(receipt=_receipt(number=f"b-{i}")))
             for i in (1, 2, 3)]
    assert [r.answer.totals.discount for r in later] == [0, 0, 0]
    assert _spent(service, "budget-10") == 1798


def test_concurrent_confirms_spend_a_budget_once(service):
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=BUDGET_PROGRAM))
    got = _concurrently(8, lambda i: service.confirm_purchase(
        P.ConfirmPurchaseRequest(receipt=_receipt(number=f"bc-{i}"))))
    assert all(isinstance(g, P.ConfirmPurchaseResponse) for g in got), got
    # exactly one receipt gets the 1798 discount, whatever the interleaving
    assert sorted(g.answer.totals.discount for g in got) == [0] * 7 + [1798]
    assert _spent(service, "budget-10") == 1798


# ---- 6. partial refunds return exactly what was paid -----------------------------------------------------------

def test_partial_refunds_return_money_plus_points_equal_to_what_was_paid(service):
    enroll(service, "7600010", points=1000)
    confirm(service, "7600010", receipt_a())        # SPEC A: 305 points redeemed: 3587 / 8978 / 17935 per line

    # The milk line (2 x 89.90 = 17980, 3587 of it paid with points): floor(3587 / 100) = 35 points back and
    # 17980 - 3500 = 14480 money: 14480 + 35 x 100 = 17980, the whole line.
    milk = _refund(service, "p-1", lines=[(0, 2000)])
    assert (milk.refunded_amount, milk.returned_points) == (14480, 35)
    assert milk.refunded_amount + milk.returned_points * 100 == 17980

    # The cheese (45000, 8978 with points): cumulatively floor((3587 + 8978) / 100) = 125 points, minus 35
    # given = 90; money 45000 - 9000 = 36000 (the 87 of a point the milk left as money now completes one).
    cheese = _refund(service, "p-2", lines=[(1, 1000)])
    assert (cheese.refunded_amount, cheese.returned_points) == (36000, 90)

    # The coffee, the final return (89900, 17935 with points): what is left of 305 = 305 - 125 = 180 points;
    # money 89900 - 18000 = 71900.
    rest = _refund(service, "p-3", all_remaining=True)
    assert (rest.refunded_amount, rest.returned_points, rest.final) == (71900, 180, True)

    # Together: all 305 points and all the money paid, 152880 - 30500 = 122380.
    assert 35 + 90 + 180 == 305 and 14480 + 36000 + 71900 == 122380
    with service.db.read() as conn:
        row = conn.execute(select(purchases.c.refunded_amount, purchases.c.returned_points)).one()
    assert tuple(row) == (122380, 305)
    # pending 36 taken back in full (4 + 11 + 21); active 1000 - 305 + 305.
    assert balances_of(service, "7600010") == (1000, 0)
    assert ledger.check(service) == []


def test_half_lines_return_the_fraction_as_money(service):
    enroll(service, "7600011", points=1000)
    confirm(service, "7600011", receipt_a())
    # one milk of two: payable 17980 x 1/2 = 8990, redeemed floor(3587 / 2) = 1793 -> 17 points, money
    # 8990 - 1700 = 7290; the second milk: redeemed 3587 cumulatively -> 35 - 17 = 18 points, money
    # 8990 - 1800 = 7190. Together 7290 + 7190 + (17 + 18) x 100 = 17980.
    a = _refund(service, "h-1", lines=[(0, 1000)])
    b = _refund(service, "h-2", lines=[(0, 1000)])
    assert (a.refunded_amount, a.returned_points, b.refunded_amount, b.returned_points) == (7290, 17, 7190, 18)
    with service.db.read() as conn:
        assert conn.execute(select(purchase_lines.c.refunded_redeemed)
                            .where(purchase_lines.c.line == 0)).scalar_one() == 3587


# ---- 7. cancels and final refunds give back promotion usage and budgets ---------------------------------------

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
    assert (_uses(service), _spent(service, "welcome-500")) == (1, 50000)
    assert confirm(service, "7600012", _welcome("w-2")).answer.totals.discount == 0   # used once already
    service.cancel_purchase(P.CancelPurchaseRequest(purchase=P.PurchaseKey(store="msk-01", terminal="pos-3",
                                                                           number="w-1")))
    assert (_uses(service), _spent(service, "welcome-500")) == (0, 0)
    assert confirm(service, "7600012", _welcome("w-3")).answer.totals.discount == 50000
    assert (_uses(service), _spent(service, "welcome-500")) == (1, 50000)
    assert ledger.check(service) == []


def test_final_refund_gives_back_the_use_a_partial_one_keeps_it(service):
    enroll(service, "7600013")
    assert confirm(service, "7600013", _welcome("f-1")).answer.totals.discount == 50000
    _refund(service, "f-r1", key=P.PurchaseKey(store="msk-01", terminal="pos-3", number="f-1"),
            lines=[(0, 1000)])
    assert (_uses(service), _spent(service, "welcome-500")) == (1, 50000)       # partial: the use stays
    final = _refund(service, "f-r2", key=P.PurchaseKey(store="msk-01", terminal="pos-3", number="f-1"),
                    all_remaining=True)
    assert final.final
    assert (_uses(service), _spent(service, "welcome-500")) == (0, 0)
    assert confirm(service, "7600013", _welcome("f-2")).answer.totals.discount == 50000


# ---- 8. unknown protobuf fields are not part of the payload ---------------------------------------------------

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
