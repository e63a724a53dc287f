"""Whatever a cached member context holds that another process changes reaches this process's till within the
bound a program publication promises (a second by polling, at once with Redis), on both backends: a manual
change of a static segment, a card status, a tier moved by the periodic job. Two ``ProcessingService``s over
one database stand for two server processes; the till's context is cached a moment before each change (under
the defect it was served, stale, for the rest of ``CONTEXT_TTL``)."""
from __future__ import annotations

import time

import pytest

from helpers.storage import DEMO_PROGRAM, REDIS_URL, require_redis
from loyalty.server import jobs
from loyalty.server.processing import ProcessingService
from loyalty.server.programs import ProgramRegistry
from loyalty.server.segments.membership import AudienceIndex
from loyalty.server.segments.service import SegmentService
from loyalty.v1 import admin_pb2, processing_pb2, receipt_pb2

BOUND = 1.0

PROGRAM = DEMO_PROGRAM + """
  - id: vip-10
    audience: {include: [vip]}
    scope: all
    effect: {percent_off: 10}
"""

# One line of 100.00 on the (simulated) Monday evening: no demo promotion applies, vip-10 takes 10.00 off.
RECEIPT = receipt_pb2.Receipt(store="msk-01", terminal="pos-2", number="1", channel="pos",
                              at="2026-03-02T20:00:00+03:00",
                              lines=[receipt_pb2.Line(sku="till-sku", categories=["misc"], quantity=1000, price=10000)])
CARD = "9100001"


def answer(service, card=CARD):
    return service.calculate_receipt(processing_pb2.CalculateReceiptRequest(
        member=receipt_pb2.MemberRef(card=card), receipt=RECEIPT)).answer


def seconds_until(till, check) -> float:
    """Seconds from now until ``check(answer(till))`` holds; fails past twice the bound."""
    t0 = time.monotonic()
    while not check(answer(till)):
        assert time.monotonic() - t0 < 2 * BOUND, "the change did not reach the other process's till"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture
def vip(service):
    """The writer process (``service``) with member ``CARD``, a static segment ``vip`` and the program whose
    vip-10 is for it."""
    service.enroll_member(processing_pb2.EnrollMemberRequest(card=CARD, source="api"))
    segments = SegmentService(service.db, clock=service.clock)
    segments.define_segment({"id": "vip", "type": "static"})
    service.publish_program(admin_pb2.PublishProgramRequest(yaml=PROGRAM))
    return segments


@pytest.fixture
def till(service, clock):
    """Another process over the same database, polling as a server without Redis does."""
    other = ProcessingService.open(service.db.url, clock=clock)
    try:
        yield other
    finally:
        other.close()


def test_a_manual_change_of_a_static_segment_reaches_a_cached_context(service, vip, till):
    assert answer(till).totals.discount == 0                  # cached: in no audience
    vip.add_members("vip", [CARD])
    assert seconds_until(till, lambda a: a.totals.discount == 1000) <= BOUND
    assert answer(till).totals.discount == 1000               # cached again, in the audience
    vip.remove_members("vip", [CARD])
    assert seconds_until(till, lambda a: a.totals.discount == 0) <= BOUND


def test_a_card_status_change_reaches_a_cached_context(service, vip, till):
    vip.add_members("vip", [CARD])
    assert seconds_until(till, lambda a: a.totals.discount == 1000) <= BOUND
    assert answer(till).member.status == "active"              # cached
    service.set_card_status(processing_pb2.SetCardStatusRequest(card=CARD, status="blocked", reason="lost"))
    # A blocked card is served as anonymous: no audience, no discount.
    assert seconds_until(till, lambda a: a.member.status == "blocked" and a.totals.discount == 0) <= BOUND
    service.set_card_status(processing_pb2.SetCardStatusRequest(card=CARD, status="active", reason="found"))
    assert seconds_until(till, lambda a: a.member.status == "active" and a.totals.discount == 1000) <= BOUND


def test_a_downgrade_by_the_periodic_job_reaches_a_cached_context(service, vip, till, clock):
    # 25,000.00 confirmed on 2 March 2026 puts the member over Silver's 20,000.00 (an upgrade at confirm).
    service.confirm_purchase(processing_pb2.ConfirmPurchaseRequest(
        member=receipt_pb2.MemberRef(card=CARD), receipt=receipt_pb2.Receipt(
            store="msk-01", terminal="pos-2", number="big", channel="pos", at="2026-03-02T12:30:00+03:00",
            lines=[receipt_pb2.Line(sku="tv", categories=["electronics"], quantity=1000, price=2500000)])))
    assert answer(till).member.tier == "Silver"                # cached
    # A year and more later the 365-day window holds no purchase: the job's recalculation downgrades her.
    clock.advance(days=400)
    counts = jobs.run_once(service.runtime)
    assert counts["tier_downgrades"] == 1
    assert seconds_until(till, lambda a: a.member.tier == "Basic") <= BOUND


@pytest.mark.redis
def test_a_card_status_change_reaches_a_cached_context_at_once_over_redis(sqlite_url, clock):
    require_redis()
    from loyalty.server import db
    db.upgrade(sqlite_url)
    writer = ProcessingService.open(sqlite_url, redis_url=REDIS_URL, clock=clock)
    # The till checks the membership version only once a minute: seeing the change within the bound proves
    # the message did it.
    tdb = db.Database(sqlite_url)
    till = ProcessingService(tdb, ProgramRegistry(tdb, redis_url=REDIS_URL, clock=clock), clock=clock,
                             audience_index=AudienceIndex(tdb, redis_url=REDIS_URL, poll_interval=60))
    try:
        writer.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM))
        writer.enroll_member(processing_pb2.EnrollMemberRequest(card=CARD, source="api"))
        assert answer(till).member.status == "active"
        time.sleep(0.3)                                        # the till's listeners are subscribed
        writer.set_card_status(processing_pb2.SetCardStatusRequest(card=CARD, status="blocked", reason="lost"))
        assert seconds_until(till, lambda a: a.member.status == "blocked") <= BOUND
    finally:
        till.close()
        writer.close()
