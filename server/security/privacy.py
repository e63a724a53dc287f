"""Personal data: erase a member on request, export everything held about one member (issue 13).

Decided here:

- **What an erasure removes.** The profile (names, gender, birth date, email, city, custom fields) and the
  phone; every card number, replaced by the marker ``erased:<card id>`` wherever it is kept (cards,
  purchases, the payloads of domain events), so no lookup finds the member again; the subscriptions (off, and
  nothing saved to restore); the before / after values of the profile change log (the field names stay); the
  addresses and texts of the scenario messages (pending ones are skipped) and the context of the scenario runs
  (active ones end).
- **What it keeps.** The member row and its id, the ledger, lots, balances, purchases with their lines,
  operations, segment memberships and tags: they name the member by id only, so balances and liability still
  add up (``loyalty ledger check``) and reports stay whole.
- **Idempotent.** Each erased card leaves a sha256 digest of its number in ``member_erasures``; the same
  request again (a retry, or a second request for that card) answers the recorded erasure with
  ``replayed=True`` and changes nothing. The digest lets a card be recognised as erased by whoever already
  has its number; it names nobody by itself.
- **One transaction**, under the member's lock (the ``balances`` row every points write takes), with its
  audit row (``audit.record``): an erasure happens entirely or not at all.
"""
from __future__ import annotations

import datetime as dt
import hashlib

import orjson
from sqlalchemy import insert, select, update

from ..errors import InvalidArgument, NotFound
from ..limits import ID_LIMIT, REASON_LIMIT
from ..members import ERASED_PREFIX, check_card, check_text, find_member
from ..models import (
    balances, cards, events, ledger, member_updates, members, operations, point_lots, purchase_lines, purchases,
    refunds, subscriptions,
)
from ..scenarios.models import scenario_outbox, scenario_runs
from ..segments.models import member_tags, message_events, segment_changes, segment_members
from . import audit
from .models import limit_breaches, member_erasures

__all__ = ["erase", "export", "erased_marker"]

PROFILE_ERASED = {"phone": None, "first_name": "", "last_name": "", "gender": "", "birth_date": None, "email": "",
                  "city": "", "custom": {}, "enroll_request_id": None}


def erased_marker(card_id: int) -> str:
    """What an erased card's number becomes: unique (the card's id), and no card a till could present: every
    card a request carries is refused with this prefix (``members.check_card``), so no lookup finds it."""
    return f"{ERASED_PREFIX}{card_id}"


def _replaced(value, numbers: dict[str, str], phone: str | None):
    """``value`` (a stored answer or response) with every erased card number replaced by its marker and the
    erased phone emptied, at any depth."""
    if isinstance(value, dict):
        return {k: _replaced(v, numbers, phone) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced(v, numbers, phone) for v in value]
    if isinstance(value, str):
        return numbers.get(value, "" if phone and value == phone else value)
    return value


def _card_digest(number: str) -> str:
    return hashlib.sha256(f"card:{number}".encode()).hexdigest()


def erase(db, card: str, reason: str, now: dt.datetime) -> dict:
    """Erase the member holding ``card``: ``{"member_id", "erased_at", "replayed", "cards"}``; ``NotFound`` when
    no member holds it and it was never erased."""
    card = card.strip()
    if not card:
        raise InvalidArgument("card", "required")
    check_card("card", card)
    check_text("reason", reason, REASON_LIMIT)
    if not reason.strip():
        raise InvalidArgument("reason", "required: the request this erasure answers, kept with it")
    return db.run_write(_erase_tx, card, reason.strip(), now, idempotent=True)


def _erase_tx(conn, card: str, reason: str, now: dt.datetime) -> dict:
    ctx = find_member(conn, ("card", card), lock=True)
    if ctx is None:
        done = conn.execute(select(member_erasures).where(member_erasures.c.card_digest == _card_digest(card))).first()
        if done is None:
            raise NotFound(f"card {card} was not found")
        held = conn.execute(select(member_erasures.c.card_digest)
                            .where(member_erasures.c.member_id == done.member_id)).all()
        return {"member_id": done.member_id, "erased_at": done.erased_at, "replayed": True, "cards": len(held)}
    member_id = ctx.member_id
    numbers = {row.number: erased_marker(row.id)
               for row in conn.execute(select(cards.c.id, cards.c.number).where(cards.c.member_id == member_id))}
    # purchases by the card number, not the member: a suspended or blocked card's purchases are anonymous
    # (no member) but keep the card they were made with, and so do their events
    bought = conn.execute(select(purchases.c.id).where(purchases.c.card.in_(list(numbers)))).scalars().all()
    phone = conn.execute(select(members.c.phone).where(members.c.id == member_id)).scalar()
    conn.execute(update(members).where(members.c.id == member_id).values(**PROFILE_ERASED))
    for number, marker in numbers.items():
        conn.execute(update(cards).where(cards.c.number == number).values(number=marker))
        conn.execute(update(purchases).where(purchases.c.card == number).values(card=marker))
    conn.execute(insert(member_erasures), [{"card_digest": _card_digest(n), "member_id": member_id,
                                            "reason": reason, "erased_at": now} for n in numbers])
    conn.execute(update(subscriptions).where(subscriptions.c.member_id == member_id)
                 .values(on=False, saved_on=None, updated_at=now))
    _erase_history(conn, member_id, numbers, bought)
    _erase_answers(conn, member_id, numbers, phone, bought)
    _erase_messages(conn, member_id, now)
    audit.record(conn, "EraseMember", f"member:{member_id}", now)
    return {"member_id": member_id, "erased_at": now, "replayed": False, "cards": len(numbers)}


def _erase_history(conn, member_id: int, numbers: dict[str, str], bought: list[int]) -> None:
    """The card numbers in the domain events of the member and of its cards' purchases, the values of its
    profile change log, the card of its soft limit breaches."""
    keys = [f"purchase_confirmed:{purchase_id}" for purchase_id in bought]
    for row in conn.execute(select(events.c.id, events.c.payload)
                            .where((events.c.member_id == member_id) | events.c.key.in_(keys))).all():
        if row.payload.get("card") in numbers:
            conn.execute(update(events).where(events.c.id == row.id)
                         .values(payload={**row.payload, "card": numbers[row.payload["card"]]}))
    for row in conn.execute(select(member_updates.c.id, member_updates.c.changes)
                            .where(member_updates.c.member_id == member_id)).all():
        conn.execute(update(member_updates).where(member_updates.c.id == row.id)
                     .values(changes={name: None for name in row.changes}))
    conn.execute(update(limit_breaches).where(limit_breaches.c.card.in_(list(numbers))).values(card=None))


def _erase_answers(conn, member_id: int, numbers: dict[str, str], phone: str | None, bought: list[int]) -> None:
    """The stored answers a retry replays (purchases, their refunds, manual operations) name the card by its
    marker and no phone: a retry after the erasure gets the books, not the person."""
    stored = ((purchases, purchases.c.answer, purchases.c.id.in_(bought)),
              (refunds, refunds.c.response, refunds.c.purchase_id.in_(bought)),
              (operations, operations.c.response, operations.c.member_id == member_id))
    for table, column, which in stored:
        for row in conn.execute(select(table.c.id, column).where(which)).all():
            kept = _replaced(row[1], numbers, phone)
            if kept != row[1]:
                conn.execute(update(table).where(table.c.id == row[0]).values({column.key: kept}))


def _erase_messages(conn, member_id: int, now: dt.datetime) -> None:
    """Scenario messages lose their address and text (pending ones are not sent); runs lose their context and
    those still active end."""
    out = scenario_outbox.c
    conn.execute(update(scenario_outbox).where(out.member_id == member_id, out.state == "pending")
                 .values(state="skipped"))
    conn.execute(update(scenario_outbox).where(out.member_id == member_id).values(recipient="", body="", payload={}))
    runs = scenario_runs.c
    conn.execute(update(scenario_runs).where(runs.member_id == member_id, runs.state == "active")
                 .values(state="done", finished_at=now, updated_at=now))
    conn.execute(update(scenario_runs).where(runs.member_id == member_id).values(context={}))


# ---- export -------------------------------------------------------------------------------------------------

# (section, table, its member column, its order): every table that holds rows of one member.
_SECTIONS = (
    ("cards", cards, cards.c.member_id, cards.c.id),
    ("subscriptions", subscriptions, subscriptions.c.member_id, subscriptions.c.channel),
    ("balance", balances, balances.c.member_id, balances.c.member_id),
    ("ledger", ledger, ledger.c.member_id, ledger.c.id),
    ("point_lots", point_lots, point_lots.c.member_id, point_lots.c.id),
    ("operations", operations, operations.c.member_id, operations.c.id),
    ("profile_changes", member_updates, member_updates.c.member_id, member_updates.c.id),
    ("segments", segment_members, segment_members.c.member_id, segment_members.c.segment_id),
    ("segment_changes", segment_changes, segment_changes.c.member_id, segment_changes.c.id),
    ("tags", member_tags, member_tags.c.member_id, member_tags.c.tag),
    ("scenario_runs", scenario_runs, scenario_runs.c.member_id, scenario_runs.c.id),
    ("scenario_messages", scenario_outbox, scenario_outbox.c.member_id, scenario_outbox.c.id),
    ("message_events", message_events, message_events.c.member_id, message_events.c.id),
    ("events", events, events.c.member_id, events.c.id),
    ("limit_breaches", limit_breaches, limit_breaches.c.member_id, limit_breaches.c.id),
)


def export(db, card: str) -> tuple[int, bytes]:
    """``(member_id, JSON document)`` of everything held about the member holding ``card``: the profile, then
    one list per table of ``_SECTIONS``, and the purchases with their lines and refunds. ``NotFound`` when no
    member holds it."""
    card = card.strip()
    if not card:
        raise InvalidArgument("card", "required")
    check_card("card", card)
    with db.read() as conn:
        ctx = find_member(conn, ("card", card))
        if ctx is None:
            raise NotFound(f"card {card} was not found")
        member_id = ctx.member_id
        document = {"member_id": member_id,
                    "profile": _rows(conn, select(members).where(members.c.id == member_id))[0]}
        for section, table, column, order in _SECTIONS:
            document[section] = _rows(conn, select(table).where(column == member_id).order_by(order))
        document["balance"] = document["balance"][0] if document["balance"] else None
        document["purchases"] = _purchases(conn, member_id)
    # moments as everywhere else in the CLI's JSON: RFC 3339 UTC, whole seconds (2026-03-02T09:30:00Z)
    return member_id, orjson.dumps(document, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
                                   | orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_OMIT_MICROSECONDS)


def _purchases(conn, member_id: int) -> list[dict]:
    out = _rows(conn, select(purchases).where(purchases.c.member_id == member_id).order_by(purchases.c.id))
    for purchase in out:
        purchase["lines"] = _rows(conn, select(purchase_lines).where(purchase_lines.c.purchase_id == purchase["id"])
                                  .order_by(purchase_lines.c.line))
        purchase["refunds"] = _rows(conn, select(refunds).where(refunds.c.purchase_id == purchase["id"])
                                    .order_by(refunds.c.id))
    return out


def _rows(conn, stmt) -> list[dict]:
    return [{k: (bytes(v).hex() if isinstance(v, (bytes, memoryview)) else v) for k, v in r._mapping.items()}
            for r in conn.execute(stmt)]
