"""Helpers of the segment tests: a fixed clock (2 March 2026, 12:00 UTC) and ``add_member`` to build hand-made
populations row by row, so that each test's expected members are worked out by reading it. The ``segsvc``
fixture is in ``tests/segments/conftest.py``."""
from __future__ import annotations

import datetime as dt
import pathlib

from sqlalchemy import insert

from loyalty.server import db
from loyalty.server.models import (
    balances, cards, ledger, members, purchase_lines, purchases, subscriptions,
)
from loyalty.server.segments.models import member_tags, message_events

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
DEMO_PROGRAM = (pathlib.Path(db.__file__).parent / "demo" / "program.yaml").read_text(encoding="utf-8")


def at(day: str, hour: int = 12) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


_counter = {"purchase": 0, "ledger": 0}


def add_member(conn, mid: int, *, gender="female", birth=None, city="Moscow", source="pos",
               registered="2025-01-10", custom=None, subs=(), subs_off=(), tags=(), card_status="active",
               tier="Basic", active=0, pending=0, accrued=(), purchases_=(), messages=()):
    """One member with everything a condition can read. ``purchases_``: (day, payable, status, skus,
    refunded_payable); ``accrued``: points of each accrual ledger entry; ``messages``: (channel, kind, day)."""
    conn.execute(insert(members).values(
        id=mid, phone=f"+7900{mid:07d}", gender=gender, first_name=f"M{mid}", last_name="Test",
        birth_date=dt.date.fromisoformat(birth) if birth else None, email=f"m{mid}@example.com", city=city,
        custom=custom or {}, source=source, registered_at=at(registered)))
    conn.execute(insert(cards).values(id=mid, number=f"C{mid}", member_id=mid, status=card_status,
                                      status_changed_at=NOW))
    for ch in subs:
        conn.execute(insert(subscriptions).values(member_id=mid, channel=ch, on=True, updated_at=NOW))
    for ch in subs_off:
        conn.execute(insert(subscriptions).values(member_id=mid, channel=ch, on=False, updated_at=NOW))
    for tag in tags:
        conn.execute(insert(member_tags).values(member_id=mid, tag=tag, created_at=NOW))
    conn.execute(insert(balances).values(member_id=mid, active=active, pending=pending, purchases_sum=0,
                                         tier=tier, updated_at=NOW))
    for points in accrued:
        _counter["ledger"] += 1
        conn.execute(insert(ledger).values(key=f"k{mid}-{_counter['ledger']}", member_id=mid, kind="accrual",
                                           points=points, active_delta=points, pending_delta=0, created_at=NOW))
    for item in purchases_:
        day, payable, status, skus, refunded = tuple(item) + ("", 0, "confirmed", (), 0)[len(item):]
        _counter["purchase"] += 1
        n = _counter["purchase"]
        pid = conn.execute(insert(purchases).values(
            store="s", terminal="t", number=f"N{mid}-{n}", member_id=mid, card=f"C{mid}", program_version=1,
            request_hash="", answer={}, receipt_at=at(day).isoformat(), receipt_time=at(day),
            receipt_date=at(day).date(), amount=payable, discount=0, payable=payable,
            redeemed_points=0, redeemed_amount=0, accrued_points=0, refunded_payable=refunded,
            status=status, created_at=at(day)).returning(purchases.c.id)).scalar_one()
        for i, sku in enumerate(skus):
            conn.execute(insert(purchase_lines).values(purchase_id=pid, line=i, sku=sku, quantity=1000,
                                                       amount=100, payable=100, redeemed=0, points=0))
    for channel, kind, day in messages:
        conn.execute(insert(message_events).values(member_id=mid, channel=channel, kind=kind, at=at(day)))
