"""Helpers of the security tests (``tests/security/``): reading a server's database directly, the digest an
audit row must carry (worked out here, independently of the server's code), receipts and members to confirm
against operation limits."""
from __future__ import annotations

import hashlib
import uuid

from sqlalchemy import create_engine, text


def rows(url: str, sql: str, **params) -> list[dict]:
    """The rows of ``sql`` on the database at ``url``, as dicts."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def execute(url: str, sql: str, **params) -> None:
    """Run one statement in its own committed transaction (raises what the database raises)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def sha256_of(message) -> str:
    """sha256 of a request as the audit log must digest it: protobuf's deterministic encoding."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def new_card() -> str:
    """A card number no other test uses (digits, as tills send them)."""
    return str(90_000_000 + uuid.uuid4().int % 9_000_000)


def enroll_with_points(client, card: str, points: int = 0, **profile) -> int:
    """Enrol ``card`` (with ``profile`` fields) and credit it ``points`` active points; its member id."""
    member = client.enroll_member({"card": card, "profile": profile} if profile else {"card": card})
    if points:
        client.adjust_points({"member": {"card": card}, "kind": "credit", "points": points,
                              "reason": "test opening balance", "operation_id": f"open-{card}"})
    return int(member.member_id)


def receipt(store: str, terminal: str, number: str, at: str, *, redeem: int = 0, price: int = 100000) -> dict:
    """One line of ``price`` minor units (1000.00 RUB by default; the demo program lets points pay 20% of it)."""
    return {"store": store, "terminal": terminal, "number": number, "channel": "pos", "at": at,
            "redeem_points": redeem, "lines": [{"sku": "tea-green-100", "categories": ["tea"], "quantity": 1000,
                                                "price": price}]}
