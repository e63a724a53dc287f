"""A promotion for an audience, end to end through the processing service: the program file defines the
segment, publishing calculates it, and a recalculation after a profile change reaches the till within a few
seconds with no restart (the audience index polls the membership version; the member context cache
expires)."""
from __future__ import annotations

import time

from sqlalchemy import update

from helpers.storage import DEMO_PROGRAM
from loyalty.server.models import members
from loyalty.server.segments.service import SegmentService
from loyalty.v1 import admin_pb2, processing_pb2, receipt_pb2

SEGMENTS = """
segments:
  - id: women-q1
    type: updatable
    conditions: {gender: female}
"""

# SPEC example C's receipt: Monday 2 March 2026 12:30 at msk-01, total 152880 >= 150000.
RECEIPT = receipt_pb2.Receipt(store="msk-01", terminal="pos-1", number="1", channel="pos",
                              at="2026-03-02T12:30:00+03:00", lines=[
    receipt_pb2.Line(sku="milk-1l", categories=["dairy"], quantity=2000, price=8990),
    receipt_pb2.Line(sku="cheese-200", categories=["dairy"], quantity=1000, price=45000),
    receipt_pb2.Line(sku="coffee-beans-1kg", categories=["coffee"], quantity=1000, price=89900)])


def enroll(service, card, gender):
    return service.enroll_member(processing_pb2.EnrollMemberRequest(
        card=card, phone="+7900" + card, source="api", profile=processing_pb2.Profile(gender=gender)))


def discount(service, card):
    answer = service.calculate_receipt(processing_pb2.CalculateReceiptRequest(
        member=receipt_pb2.MemberRef(card=card), receipt=RECEIPT)).answer
    return answer.totals.discount


def test_audience_promotion_follows_recalculations_at_the_till(service):
    enroll(service, "8000001", "female")
    enroll(service, "8000002", "male")
    # Publishing a program whose file defines the segment calculates it before the new version switches in.
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM + SEGMENTS))
    # Example C: 20% off every line, floor(17980 x 0.2) + floor(45000 x 0.2) + floor(89900 x 0.2)
    # = 3596 + 9000 + 17980 = 30576.
    assert discount(service, "8000001") == 30576
    assert discount(service, "8000002") == 0

    with service.db.engine.begin() as conn:       # the second member's profile changes...
        conn.execute(update(members).where(members.c.gender == "male").values(gender="female"))
    run = SegmentService(service.db).recalculate("women-q1")
    assert (run["added"], run["removed"]) == (1, 0)
    deadline = time.monotonic() + 5               # ... and the till sees it within a few seconds
    while discount(service, "8000002") != 30576:
        assert time.monotonic() < deadline, "the recalculated audience did not reach the till in 5 s"
        time.sleep(0.2)
