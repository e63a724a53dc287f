"""Small helpers every part of the scenario module shares: the clock, ``INSERT ... ON CONFLICT DO NOTHING``
on both backends, row claiming, and the member snapshot that conditions and templates read."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from loyalty.server.models import balances, cards, members, subscriptions
from loyalty.server.dialects import dialect_of, insert_ignore
from loyalty.server.timeutil import utcnow

__all__ = ["utcnow", "insert_ignore", "claim", "load_member", "member_values", "backoff"]


def claim(conn, stmt):
    """Row claiming: on PostgreSQL ``FOR UPDATE SKIP LOCKED`` (several workers take disjoint rows, nobody
    waits); SQLite has a single writer and the caller's transaction is already ``BEGIN IMMEDIATE``."""
    return dialect_of(conn).claim(stmt)


def backoff(attempts: int, base: float, cap: float) -> dt.timedelta:
    """Exponential backoff after ``attempts`` failures: base, 2 base, 4 base ... at most ``cap`` seconds."""
    return dt.timedelta(seconds=min(cap, base * (2 ** max(attempts - 1, 0))))


_card = (select(cards.c.number, cards.c.status).where(cards.c.member_id == members.c.id)
         .order_by((cards.c.status == "active").desc(), cards.c.id.desc()).limit(1))


def load_member(conn, member_id: int) -> dict | None:
    """Everything a condition or a template may read of one member, in two queries."""
    row = conn.execute(
        select(members, balances.c.active, balances.c.pending, balances.c.tier, balances.c.purchases_sum,
               _card.with_only_columns(cards.c.number).scalar_subquery().label("card"),
               _card.with_only_columns(cards.c.status).scalar_subquery().label("card_status"))
        .select_from(members.outerjoin(balances, balances.c.member_id == members.c.id))
        .where(members.c.id == member_id)).first()
    if row is None:
        return None
    m = dict(row._mapping)
    out = {"member_id": m["id"], "first_name": m["first_name"], "last_name": m["last_name"], "gender": m["gender"],
           "birth_date": m["birth_date"].isoformat() if m["birth_date"] else None, "email": m["email"],
           "phone": m["phone"], "city": m["city"], "source": m["source"],
           "registered_at": m["registered_at"].isoformat() if m["registered_at"] else None,
           "card": m["card"], "card_status": m["card_status"], "tier": m["tier"],
           "active_points": m["active"] or 0, "pending_points": m["pending"] or 0,
           "purchases_sum": m["purchases_sum"] or 0, "custom": dict(m["custom"] or {})}
    out["subscriptions"] = dict(conn.execute(select(subscriptions.c.channel, subscriptions.c.on)
                                             .where(subscriptions.c.member_id == member_id)).all())
    return out


def member_values(member: dict, context: dict, scenario_id: str) -> dict:
    """The ``{placeholder}`` values of templates for one member in one run."""
    values = {k: v for k, v in member.items() if k not in ("custom", "subscriptions")}
    for k, v in member["custom"].items():
        values[f"custom.{k}"] = v
    for k, v in (context.get("event") or {}).items():
        values[f"event.{k}"] = v
    values["promo_code"] = context.get("promo_code", "")
    values["scenario"] = scenario_id
    return values
