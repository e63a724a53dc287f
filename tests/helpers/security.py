"""Helpers of the security tests: the status a refused call must get, row counts to show it wrote nothing,
reading a server's database directly, the digest an audit row must carry (worked out here, independently of the
server's code), receipts and members to confirm against operation limits."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import uuid

import pytest
from sqlalchemy import create_engine, func, select, text

__all__ = ["expect_status", "count_rows", "utc_in", "rows", "execute", "sha256_of", "new_card", "enroll_with_points",
           "receipt"]


def count_rows(url: str, table: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(text(table))).scalar_one()
    finally:
        engine.dispose()


@contextlib.contextmanager
def expect_status(code: str, *words: str):
    """The block raises ``LoyaltyError`` with ``code`` and a message containing each of ``words``."""
    from loyalty.clients.client import LoyaltyError
    with pytest.raises(LoyaltyError) as info:
        yield info
    assert info.value.code.name == code, info.value.one_line()
    for word in words:
        assert word in info.value.message, info.value.one_line()


def utc_in(**delta) -> int:
    return int((dt.datetime.now(dt.timezone.utc) + dt.timedelta(**delta)).timestamp())


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
