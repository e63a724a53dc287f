"""The demo shop: the SPEC section 3 program (``program.yaml``, also the example program of
``loyalty calc`` in the README) and five members to try it with, created idempotently by ``seed_demo``.

| card    | who                     | state                                                      |
| ------- | ----------------------- | ---------------------------------------------------------- |
| 7000001 | Anna Ivanova, Moscow    | active, Basic, 1000 active points (SPEC worked examples)    |
| 7000002 | Boris Petrov, Moscow    | active, Basic, 250 active points                            |
| 7000003 | Vera Sokolova, Kazan    | restricted (earns only), 400 active points                  |
| 7000004 | Gleb Orlov, St Petersburg | blocked (served as anonymous)                             |
| 7000005 | Daria Smirnova, Moscow  | active, Gold (one purchase of 52,000.00), 3000 active points |
"""
from __future__ import annotations

import pathlib

from sqlalchemy import select

from loyalty.v1 import admin_pb2, processing_pb2, receipt_pb2

from ..errors import AlreadyExists
from ..models import cards, program_versions
from ..security import audit

__all__ = ["seed_demo", "DEMO_PROGRAM_PATH", "DEMO_CARDS"]

DEMO_PROGRAM_PATH = pathlib.Path(__file__).with_name("program.yaml")

# card, phone, first, last, gender, birth date, city, subscriptions, status, active points, purchases_sum
_MEMBERS = [
    ("7000001", "+79000000001", "Anna", "Ivanova", "female", "1990-05-14", "Moscow",
     {"email": True, "sms": True, "push": False}, "active", 1000, 0),
    ("7000002", "+79000000002", "Boris", "Petrov", "male", "1985-11-02", "Moscow",
     {"email": True, "sms": False}, "active", 250, 0),
    ("7000003", "+79000000003", "Vera", "Sokolova", "female", "1978-02-20", "Kazan",
     {"email": True, "sms": True}, "restricted", 400, 0),
    ("7000004", "+79000000004", "Gleb", "Orlov", "male", "2000-07-30", "Saint Petersburg",
     {"email": False, "sms": True}, "blocked", 0, 0),
    ("7000005", "+79000000005", "Daria", "Smirnova", "female", "1995-09-09", "Moscow",
     {"email": True, "sms": True, "push": True}, "active", 3000, 5_200_000),
]
DEMO_CARDS = tuple(m[0] for m in _MEMBERS)


def _as_asked(method, rpc: str, request):
    """``method(request)`` as a server serves ``rpc``: its audit row carries the request's digest."""
    with audit.calling(rpc, request):
        return method(request)


def seed_demo(service) -> dict:
    """Publish the demo program when no program has been published yet (a live program, the operator's, is
    never replaced by the demo's) and create the demo members (skipping those that exist). Safe to run any
    number of times. Returns what it did: ``program_version`` (published now, or None), ``members_created``
    and, when another program is live, its version as ``program_live``."""
    text = DEMO_PROGRAM_PATH.read_text(encoding="utf-8")
    published = live = None
    with service.db.read() as conn:
        current = conn.execute(select(program_versions.c.version, program_versions.c.yaml)
                               .order_by(program_versions.c.version.desc()).limit(1)).first()
    if current is None:
        published = _as_asked(service.publish_program, "PublishProgram",
                              admin_pb2.PublishProgramRequest(yaml=text, comment="demo program")).version
    elif current.yaml != text:
        live = current.version
    created = []
    for (card, phone, first, last, gender, birth, city, subs, status, points, purchases_sum) in _MEMBERS:
        with service.db.read() as conn:
            if conn.execute(select(cards.c.id).where(cards.c.number == card)).first() is not None:
                continue
        try:
            service.enroll_member(processing_pb2.EnrollMemberRequest(
                card=card, phone=phone, source="import", subscriptions=subs, request_id=f"demo:{card}",
                profile=processing_pb2.Profile(first_name=first, last_name=last, gender=gender,
                                               birth_date=birth, email=f"{first.lower()}@example.com",
                                               city=city)))
        except AlreadyExists:
            continue
        member = receipt_pb2.MemberRef(card=card)
        if points:
            _as_asked(service.adjust_points, "AdjustPoints", processing_pb2.AdjustPointsRequest(
                member=member, kind="credit", points=points, reason="demo opening balance",
                operation_id=f"demo:{card}:opening"))
        if purchases_sum:
            # A long-standing customer: one big purchase puts her over the Gold threshold (upgrade at confirm).
            service.confirm_purchase(processing_pb2.ConfirmPurchaseRequest(member=member, receipt=receipt_pb2.Receipt(
                store="msk-01", terminal="demo", number=f"seed-{card}", channel="pos",
                at=service.clock().strftime("%Y-%m-%dT%H:%M:%S"),
                lines=[receipt_pb2.Line(sku="tv-65-oled", categories=["electronics"], quantity=1000,
                                        price=purchases_sum)])))
        if status != "active":
            _as_asked(service.set_card_status, "SetCardStatus",
                      processing_pb2.SetCardStatusRequest(card=card, status=status, reason="demo"))
        created.append(card)
    service.contexts.clear()
    done = {"program_version": published, "members_created": created}
    return done if live is None else {**done, "program_live": live}
