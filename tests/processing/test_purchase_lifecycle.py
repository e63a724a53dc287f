"""The whole life of purchases through ``ProcessingService`` on SQLite and PostgreSQL, with the demo program
(SPEC section 3) and numbers worked out by hand from SPEC 4-6 (arithmetic in the comments)."""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from helpers.purchases import KEY, balances_of, coffee, confirm, enroll, member, receipt_a
from loyalty.server import jobs, ledger
from loyalty.server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from loyalty.server.models import events, purchases
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R

def test_full_flow_confirm_activate_spend_refund_cancel(service, clock):
    enroll(service, "7100001", points=1000)
    calc = service.calculate_receipt(P.CalculateReceiptRequest(member=R.MemberRef(card="7100001"),
                                                               receipt=receipt_a()))
    # SPEC A: cap floor(152880 x 20%) = 30576 -> 305 points; allocation 3587 / 8978 / 17935; earns 36 (4/11/21).
    t = calc.answer.totals
    assert (t.max_points, t.redeemed_points, t.redeemed_amount, t.accrued_points) == (305, 305, 30500, 36)
    assert [ln.redeemed for ln in calc.answer.lines] == [3587, 8978, 17935]
    assert balances_of(service, "7100001") == (1000, 0)          # calculate has no side effects

    first = confirm(service, "7100001", receipt_a())
    assert not first.replayed and first.answer.totals.redeemed_points == 305
    assert balances_of(service, "7100001") == (1000 - 305, 36)   # 695 active, 36 pending

    again = confirm(service, "7100001", receipt_a())
    assert again.replayed and again.purchase_id == first.purchase_id and again.answer == first.answer
    with pytest.raises(AlreadyExists):
        confirm(service, "7100001", receipt_a(redeem=400))
    assert balances_of(service, "7100001") == (695, 36)          # retries never charge twice

    # Day 14: activation_days = 14 -> the 36 pending points become active: 695 + 36 = 731.
    clock.advance(days=14, minutes=1)
    counts = jobs.run_once(service.runtime)
    assert (counts["activated_lots"], counts["activated_points"]) == (1, 36)
    assert balances_of(service, "7100001") == (731, 0)

    # Spend 100 on coffee 89900: cap floor(89900 x 20%) = 17980 -> 179 >= 100; redeemed 10000;
    # earns floor((89900 - 10000) x 3%) / 100 = floor(2397 / 100) = 23 -> 631 active, 23 pending.
    # printed on day 14 (a receipt's points wait out the return window from the receipt's own time, SPEC 6)
    day14 = clock().astimezone(dt.timezone(dt.timedelta(hours=3))).isoformat()
    second = confirm(service, "7100001", coffee("000124", redeem=100, at=day14))
    assert (second.answer.totals.redeemed_points, second.answer.totals.accrued_points) == (100, 23)
    assert balances_of(service, "7100001") == (631, 23)

    # Return the cheese (line 1, payable 45000 of which 8978 paid with points): written-off points
    # floor(8978/100) = 89 come back, the rest is money: 45000 - 89 x 100 = 36100 (36022 paid in money + the
    # 78 of a point not made whole); its 11 accrued points are taken back (purchase 1's lot is active now):
    # 631 - 11 + 89 = 709.
    r1 = service.refund_purchase(P.RefundPurchaseRequest(refund_id="ret-1", purchase=KEY,
                                                         lines=[P.RefundLine(line=1, quantity=1000)]))
    assert (r1.refunded_amount, r1.returned_points, r1.taken_back_points, r1.final) == (36100, 89, 11, False)
    assert (r1.active_points, r1.pending_points) == (709, 23)

    # One of two milks: payable floor(17980/2) = 8990, redeemed floor(3587/2) = 1793, points floor(4/2) = 2;
    # points back: floor((8978 + 1793) / 100) = 107, minus 89 given = 18; money 8990 - 18 x 100 = 7190.
    # 709 - 2 + 18 = 725.
    r2 = service.refund_purchase(P.RefundPurchaseRequest(refund_id="ret-2", purchase=KEY,
                                                         lines=[P.RefundLine(line=0, quantity=1000)]))
    assert (r2.refunded_amount, r2.returned_points, r2.taken_back_points) == (7190, 18, 2)
    assert (r2.active_points, r2.pending_points) == (725, 23)
    replay = service.refund_purchase(P.RefundPurchaseRequest(refund_id="ret-2", purchase=KEY,
                                                             lines=[P.RefundLine(line=0, quantity=1000)]))
    assert replay.replayed and replay.refunded_amount == 7190
    with pytest.raises(AlreadyExists):
        service.refund_purchase(P.RefundPurchaseRequest(refund_id="ret-2", purchase=KEY, all_remaining=True))

    # Cancel reverses exactly what is left: payable of milk 8990 and coffee 89900 = 98890; points back
    # 305 - 89 - 18 = 198; money 98890 - 198 x 100 = 79090; taken back (4 - 2) + 21 = 23.
    # 725 - 23 + 198 = 900 = 1000 - the 100 of purchase 2; pending 23 is purchase 2's accrual.
    c = service.cancel_purchase(P.CancelPurchaseRequest(purchase=KEY, reason="customer"))
    assert (c.refunded_amount, c.returned_points, c.taken_back_points, c.replayed) == (79090, 198, 23, False)
    assert (c.active_points, c.pending_points) == (900, 23)
    assert 36100 + 7190 + 79090 == 152880 - 30500                 # all the money paid, nothing lost to rounding
    c2 = service.cancel_purchase(P.CancelPurchaseRequest(purchase=KEY))
    assert c2.replayed and c2.refunded_amount == 79090
    with pytest.raises(FailedPrecondition):
        service.refund_purchase(P.RefundPurchaseRequest(refund_id="ret-3", purchase=KEY, all_remaining=True))

    m = member(service, "7100001")
    # Tier metric net of refunds: 152880 + 89900 - (45000 + 8990 + 98890) = 89900.
    assert m.purchases_sum == 89900
    assert ledger.check(service.db) == []
    liab = ledger.liability(service.runtime)
    assert (liab["active_points"], liab["pending_points"]) == (900, 23)
    with service.db.read() as conn:
        kinds = dict(conn.execute(select(events.c.kind, func.count()).group_by(events.c.kind)).all())
    assert kinds["purchase_confirmed"] == 2 and kinds["refund"] == 3 and kinds["member_registered"] == 1


def test_status_change_switches_subscriptions_off_and_restores_exactly_them(service):
    service.enroll_member(P.EnrollMemberRequest(card="7100004", subscriptions={"email": True, "sms": False,
                                                                                "push": True}))
    m = service.set_card_status(P.SetCardStatusRequest(card="7100004", status="blocked", reason="fraud check"))
    assert m.status == "blocked" and dict(m.subscriptions) == {"email": False, "sms": False, "push": False}
    m = service.set_card_status(P.SetCardStatusRequest(card="7100004", status="suspended"))
    assert dict(m.subscriptions) == {"email": False, "sms": False, "push": False}
    m = service.set_card_status(P.SetCardStatusRequest(card="7100004", status="active"))
    assert dict(m.subscriptions) == {"email": True, "sms": False, "push": True}
    with service.db.read() as conn:
        n = conn.execute(select(func.count()).where(events.c.kind == "card_status_changed")).scalar()
    assert n == 3
    with pytest.raises(InvalidArgument) as e:
        service.set_card_status(P.SetCardStatusRequest(card="7100004", status="frozen"))
    assert e.value.path == "status"
    with pytest.raises(NotFound):
        service.set_card_status(P.SetCardStatusRequest(card="0000000", status="active"))


def test_blocked_card_is_served_anonymous_and_earns_nothing(service):
    enroll(service, "7100005", points=500)
    service.set_card_status(P.SetCardStatusRequest(card="7100005", status="blocked"))
    res = confirm(service, "7100005", receipt_a(redeem=0))
    assert res.answer.member.anonymous and res.answer.totals.accrued_points == 0
    assert balances_of(service, "7100005") == (500, 0)
    assert member(service, "7100005").purchases_sum == 0


def test_bad_input_names_the_field_and_writes_nothing(service):
    enroll(service, "7100006", points=1000)
    bad = receipt_a()
    bad.lines[2].quantity = 0
    with pytest.raises(InvalidArgument) as e:
        confirm(service, "7100006", bad)
    assert e.value.path == "receipt.lines[2].quantity"
    no_number = receipt_a(number="")
    with pytest.raises(InvalidArgument) as e:
        confirm(service, "7100006", no_number)
    assert e.value.path == "receipt.number"
    with pytest.raises(NotFound):
        confirm(service, "0000001", receipt_a())
    with pytest.raises(InvalidArgument) as e:
        service.calculate_receipt(P.CalculateReceiptRequest(member=R.MemberRef(phone="call me"), receipt=receipt_a()))
    assert e.value.path == "member.phone"
    with service.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(purchases)).scalar() == 0
    confirm(service, "7100006", receipt_a())
    with pytest.raises(InvalidArgument) as e:
        service.refund_purchase(P.RefundPurchaseRequest(refund_id="x", purchase=KEY,
                                                        lines=[P.RefundLine(line=0, quantity=2001)]))
    assert e.value.path == "lines[0].quantity"
    with pytest.raises(InvalidArgument) as e:
        service.refund_purchase(P.RefundPurchaseRequest(refund_id="x", purchase=KEY,
                                                        lines=[P.RefundLine(line=7, quantity=1)]))
    assert e.value.path == "lines[0].line"
    with pytest.raises(NotFound):
        service.refund_purchase(P.RefundPurchaseRequest(refund_id="y", purchase=P.PurchaseKey(
            store="msk-01", terminal="pos-3", number="nope"), all_remaining=True))


def test_enroll_is_unique_by_card_and_phone_and_idempotent_by_request_id(service):
    a = service.enroll_member(P.EnrollMemberRequest(card="7100007", phone="+7 900 111-22-33", request_id="r1",
                                                    source="form", profile=P.Profile(gender="female")))
    assert a.phone == "+79001112233" and a.source == "form" and a.tier == "Basic"
    b = service.enroll_member(P.EnrollMemberRequest(card="7100007", phone="+7 900 111-22-33", request_id="r1"))
    assert b.member_id == a.member_id
    with pytest.raises(AlreadyExists):
        service.enroll_member(P.EnrollMemberRequest(card="7100007"))
    with pytest.raises(AlreadyExists):
        service.enroll_member(P.EnrollMemberRequest(card="7100008", phone="+79001112233"))
    with pytest.raises(InvalidArgument) as e:
        service.enroll_member(P.EnrollMemberRequest(card="7100009", source="fax"))
    assert e.value.path == "source"
    with pytest.raises(InvalidArgument) as e:
        service.enroll_member(P.EnrollMemberRequest(card="7100009", profile=P.Profile(birth_date="1990-13-01")))
    assert e.value.path == "profile.birth_date"
    by_phone = service.get_member(P.GetMemberRequest(member=R.MemberRef(phone="+79001112233")))
    assert by_phone.card == "7100007"
    with service.db.read() as conn:
        row = conn.execute(select(events.c.payload).where(events.c.kind == "member_registered")).scalar_one()
    assert row["source"] == "form"


def test_adjust_points_credit_debit_top_up(service):
    enroll(service, "7100010")
    ref = R.MemberRef(card="7100010")
    r = service.adjust_points(P.AdjustPointsRequest(member=ref, kind="top_up", points=300, reason="promo",
                                                    operation_id="op-1"))
    assert (r.active_points, r.replayed) == (300, False)
    assert service.adjust_points(P.AdjustPointsRequest(member=ref, kind="top_up", points=300, reason="promo",
                                                       operation_id="op-1")).replayed
    with pytest.raises(AlreadyExists):
        service.adjust_points(P.AdjustPointsRequest(member=ref, kind="credit", points=5, reason="x",
                                                    operation_id="op-1"))
    with pytest.raises(FailedPrecondition) as e:
        service.adjust_points(P.AdjustPointsRequest(member=ref, kind="debit", points=301, reason="x",
                                                    operation_id="op-2"))
    assert e.value.details["available_points"] == 300
    r = service.adjust_points(P.AdjustPointsRequest(member=ref, kind="debit", points=120, reason="x",
                                                    operation_id="op-3"))
    assert r.active_points == 180
    with pytest.raises(InvalidArgument) as e:
        service.adjust_points(P.AdjustPointsRequest(member=ref, kind="gift", points=1, reason="x",
                                                    operation_id="op-4"))
    assert e.value.path == "kind"
    assert ledger.check(service.db) == []


def test_tier_upgrades_at_confirm_and_downgrades_only_in_the_job(service):
    enroll(service, "7100011")
    # 20000.00 payable reaches Silver (from 2000000): upgrade at confirm.
    confirm(service, "7100011", coffee("big-1", price=2_000_000))
    assert member(service, "7100011").tier == "Silver"
    service.refund_purchase(P.RefundPurchaseRequest(refund_id="big-r", purchase=P.PurchaseKey(
        store="msk-01", terminal="pos-3", number="big-1"), all_remaining=True))
    m = member(service, "7100011")
    assert (m.tier, m.purchases_sum) == ("Silver", 0)               # no downgrade at refund time
    counts = jobs.run_once(service.runtime)
    assert counts["tier_downgrades"] == 1
    assert member(service, "7100011").tier == "Basic"
    with service.db.read() as conn:
        moves = [r["tier"] for r in conn.execute(select(events.c.payload).where(events.c.kind == "tier_changed")
                                                 .order_by(events.c.id)).scalars()]
    assert moves == ["Silver", "Basic"]


def test_expiry_and_expiring_notice_once_per_lot(service, clock):
    enroll(service, "7100012")
    ref = R.MemberRef(card="7100012")
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="credit", points=50, operation_id="e-1",
                                                expiry_days=10, reason="x"))
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="credit", points=70, operation_id="e-2",
                                                reason="x"))
    clock.advance(days=5)                                           # lot 1 expires in 5 days: within the 7-day notice
    assert jobs.run_once(service.runtime)["expiring_notices"] == 1
    assert jobs.run_once(service.runtime)["expiring_notices"] == 0
    # a debit takes the earliest-expiring lot first: 30 of the 50
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="debit", points=30, operation_id="e-3",
                                                reason="x"))
    clock.advance(days=6)
    counts = jobs.run_once(service.runtime)
    assert (counts["expired_lots"], counts["expired_points"]) == (1, 20)   # 50 - 30 left on lot 1
    assert member(service, "7100012").active_points == 70
    assert ledger.check(service.db) == []
