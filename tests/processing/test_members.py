"""Member updates inside the processing service, on SQLite and PostgreSQL: a profile change reaches the till at
once (the member's cached context, which holds its audiences, is dropped), subscriptions chosen while the
card is blocked wait for its return, and the audit record of each change."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from helpers.storage import DEMO_PROGRAM
from loyalty.server.errors import InvalidArgument
from loyalty.server.models import member_updates
from loyalty.v1 import admin_pb2, processing_pb2 as P, receipt_pb2 as R

# A dynamic segment: evaluated for the member when its context is loaded, so only a stale cache could hide a
# profile change from the till.
SEGMENTS = """
segments:
  - id: women-q1
    type: dynamic
    conditions: {gender: female}
"""

# SPEC example C's receipt: Monday 2 March 2026 12:30 at msk-01, total 152880 >= 150000.
RECEIPT = R.Receipt(store="msk-01", terminal="pos-1", number="1", channel="pos", at="2026-03-02T12:30:00+03:00",
                    lines=[R.Line(sku="milk-1l", categories=["dairy"], quantity=2000, price=8990),
                           R.Line(sku="cheese-200", categories=["dairy"], quantity=1000, price=45000),
                           R.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=1000, price=89900)])


def discount(service, card: str) -> int:
    return service.calculate_receipt(P.CalculateReceiptRequest(member=R.MemberRef(card=card),
                                                               receipt=RECEIPT)).answer.totals.discount


def test_a_profile_update_reaches_the_till_at_once(service):
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM + SEGMENTS))
    service.enroll_member(P.EnrollMemberRequest(card="8200001", profile=P.Profile(gender="male")))
    assert discount(service, "8200001") == 0                  # and its context is now cached
    service.update_member(P.UpdateMemberRequest(member=R.MemberRef(card="8200001"), gender="female"))
    # 20% off every line: floor(17980 x 0.2) + floor(45000 x 0.2) + floor(89900 x 0.2) = 3596 + 9000 + 17980
    assert discount(service, "8200001") == 30576
    service.update_member(P.UpdateMemberRequest(member=R.MemberRef(card="8200001"), gender=""))
    assert discount(service, "8200001") == 0


def test_subscriptions_chosen_while_the_card_is_blocked_wait_for_its_return(service):
    card = R.MemberRef(card="8200002")
    service.enroll_member(P.EnrollMemberRequest(card="8200002", subscriptions={"email": True, "sms": True}))
    service.set_card_status(P.SetCardStatusRequest(card="8200002", status="blocked"))
    m = service.update_member(P.UpdateMemberRequest(member=card, subscriptions={"sms": False, "push": True}))
    assert dict(m.subscriptions) == {"email": False, "sms": False, "push": False}     # blocked: all off
    m = service.set_card_status(P.SetCardStatusRequest(card="8200002", status="active"))
    assert dict(m.subscriptions) == {"email": True, "sms": False, "push": True}       # what the member chose


def test_each_update_is_audited_with_what_it_changed(service, clock):
    service.enroll_member(P.EnrollMemberRequest(card="8200003", phone="+79008200003",
                                                profile=P.Profile(city="Moscow", custom={"pet": "cat"})))
    service.update_member(P.UpdateMemberRequest(member=R.MemberRef(card="8200003"), city="Kazan", phone="",
                                                birth_date="1990-05-01", clear_custom=["pet"],
                                                subscriptions={"email": True}, request_id="audit-1"))
    # a retry changes nothing more and records nothing more
    service.update_member(P.UpdateMemberRequest(member=R.MemberRef(card="8200003"), city="Kazan", phone="",
                                                birth_date="1990-05-01", clear_custom=["pet"],
                                                subscriptions={"email": True}, request_id="audit-1"))
    with service.db.read() as conn:
        rows = conn.execute(select(member_updates.c.request_id, member_updates.c.changes,
                                   member_updates.c.created_at)).all()
    assert [(r.request_id, r.changes, r.created_at) for r in rows] == [("audit-1", {
        "city": ["Moscow", "Kazan"], "phone": ["+79008200003", None], "birth_date": [None, "1990-05-01"],
        "custom.pet": ["cat", None], "subscriptions.email": [None, True]}, clock())]


def test_an_update_that_changes_nothing_is_refused(service):
    service.enroll_member(P.EnrollMemberRequest(card="8200004"))
    with pytest.raises(InvalidArgument, match="nothing to change"):
        service.update_member(P.UpdateMemberRequest(member=R.MemberRef(card="8200004"), request_id="x"))
