"""Message events coming back from providers (SPEC 8): delivered, opened, clicked, bounced, unsubscribed, a
subscription confirmed by double opt-in, as batches of up to ``MAX_EVENTS``, each event with the provider's
own id. This module validates a batch, finds each event's member, writes ``message_events`` and applies the
two events that change a member's state (``unsubscribed`` and ``confirmed`` switch the channel's
subscription off and on); segments (``messages`` condition) and scenarios (``message`` condition) read the
rows. It writes nothing else: no outbox, no runs.

Three kinds of outcome, chosen for a provider's webhook bridge that must not stall on one bad card:

- a malformed event (no id, unknown kind, a time without an offset...) is ``InvalidArgument`` naming its
  field (``events[3].kind``) and nothing of the batch is written: the bridge has a bug to fix;
- an event whose member or delivery cannot be found is *rejected* (index, field, reason) and the rest of the
  batch is written; the id is not remembered, so sending it again later (the card now exists) records it;
- an event whose id was recorded before (an earlier batch, a retry, a concurrent copy of the same batch, or
  earlier in this batch) is a *duplicate*: skipped, counted once, its effect applied once.

Idempotency is the unique ``event_id``: ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` tells which events
this transaction wrote, and only those get their effect. Concurrent identical batches on PostgreSQL wait on
the unique index for the first one to commit and then find every id taken, so each event is written by
exactly one of them and the others answer "duplicate" (no error, nothing twice). Events are inserted in id
order and members locked in id order afterwards, so two different batches cannot deadlock.

Subscriptions follow the newest provider event: an ``unsubscribed`` or ``confirmed`` older than one already
recorded for the same member and channel (a late webhook) is recorded but changes nothing. A member whose
card has left ``active`` has its subscriptions held off by SetCardStatus (``saved_on`` remembers them); an
event then changes what will be restored, not ``on``.
"""
from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import and_, case, exists, or_, select, update

from loyalty.core.errors import quote
from loyalty.server.dialects import dialect_of
from loyalty.server.errors import InvalidArgument
from loyalty.server.limits import ID_LIMIT
from loyalty.server.members import check_text, validate_ref
from loyalty.server.models import CHANNELS, cards, members, subscriptions
from loyalty.server.segments.models import MESSAGE_KINDS, message_events

from .common import insert_ignore
from .models import scenario_outbox

__all__ = ["MAX_EVENTS", "EVENT_KEYS", "FUTURE_SLACK", "validate_event", "validate_batch", "record",
           "set_subscription", "message_key"]

MAX_EVENTS = 1000
EVENT_KEYS = ("id", "card", "phone", "member_id", "message_id", "channel", "kind", "at", "scenario")
# a provider's clock may run a little ahead; an event further in the future is a bug, not news
FUTURE_SLACK = dt.timedelta(days=1)
SUBSCRIPTION_KINDS = {"unsubscribed": False, "confirmed": True}
_SMTP_ID_RE = re.compile(r"^<?scenario\.(\d+)\.(.+)\.(\d+)@[^@>]+>?$")


def _text(raw: dict, key: str, path: str, limit: int) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{path}.{key}", f"text is expected, got {type(value).__name__}")
    return check_text(f"{path}.{key}", value.strip(), limit)


def _at(value: str, path: str) -> dt.datetime:
    example = "such as 2026-03-02T12:30:00+03:00 or 2026-03-02T09:30:00Z"
    if not value:
        raise InvalidArgument(path, f"required: when it happened, ISO 8601 with an offset {example}")
    try:
        at = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(path, f"expected ISO 8601 with an offset {example}, got {quote(value)}") from None
    if at.tzinfo is None:
        raise InvalidArgument(path, f"an offset is required (the provider's time zone), {example}")
    try:
        at = at.astimezone(dt.timezone.utc)
    except OverflowError:
        raise InvalidArgument(path, f"out of the range of dates: {quote(value)}") from None
    if at.year < 1900:
        raise InvalidArgument(path, f"before 1900: {quote(value)}")
    return at


class _Ref:
    """The ``card`` / ``phone`` pair ``members.validate_ref`` reads."""

    def __init__(self, card: str, phone: str):
        self.card, self.phone = card, phone


def message_key(message_id: str) -> str:
    """Our outbox key for an SMTP Message-ID we sent (``<scenario.12.hello.1@loyalty>`` ->
    ``scenario:12:hello:1``; step ids may contain dots, run and visit are numbers); anything else unchanged."""
    m = _SMTP_ID_RE.match(message_id)
    return f"scenario:{m.group(1)}:{m.group(2)}:{m.group(3)}" if m else message_id


def validate_event(raw, path: str) -> dict:
    """One event as a mapping of ``EVENT_KEYS`` (a JSON object, or a ``MessageEvent`` read field by field; an
    empty string or 0 is the same as missing) -> the normalized event. ``InvalidArgument`` names the field
    under ``path``."""
    if not isinstance(raw, dict):
        raise InvalidArgument(path, "an event is an object with id, kind, at, channel and a member reference")
    for key in raw:
        if key not in EVENT_KEYS:
            raise InvalidArgument(f"{path}.{key}", f"unknown key; expected {', '.join(EVENT_KEYS)}")
    event_id = _text(raw, "id", path, ID_LIMIT)
    if not event_id:
        raise InvalidArgument(f"{path}.id", "required: the provider's event id (the idempotency key)")
    kind = _text(raw, "kind", path, 16)
    if kind not in MESSAGE_KINDS:
        raise InvalidArgument(f"{path}.kind", f"expected one of {', '.join(MESSAGE_KINDS)}, got {kind!r}")
    at = _at(_text(raw, "at", path, 64), f"{path}.at")
    message_id = _text(raw, "message_id", path, 200)
    channel = _text(raw, "channel", path, 32)
    if channel and channel not in CHANNELS:
        raise InvalidArgument(f"{path}.channel", f"expected one of {', '.join(CHANNELS)}, got {channel!r}")
    if not channel and not message_id:
        raise InvalidArgument(f"{path}.channel", f"required: one of {', '.join(CHANNELS)} (it may be left out "
                                                 f"only when message_id names one of our deliveries)")
    member_id = raw.get("member_id") or 0
    if isinstance(member_id, bool) or not isinstance(member_id, int) or not 0 <= member_id < 2**63:
        raise InvalidArgument(f"{path}.member_id", f"a member id (a positive whole number), got {member_id!r}")
    ref = validate_ref(_Ref(_text(raw, "card", path, 64), _text(raw, "phone", path, 32)), path)
    if ref is None and member_id:
        ref = ("member_id", member_id)
    if ref is None and not message_id:
        raise InvalidArgument(f"{path}.card", "required: the member's card, phone or member_id, or the "
                                              "message_id of one of our deliveries")
    return {"id": event_id, "kind": kind, "at": at, "channel": channel, "ref": ref, "message_id": message_id,
            "scenario": _text(raw, "scenario", path, 100)}


def validate_batch(events) -> list[dict]:
    """The whole batch, or ``InvalidArgument`` for its first bad event (nothing is written then)."""
    if not isinstance(events, list):
        raise InvalidArgument("events", "a list of events is expected")
    if len(events) > MAX_EVENTS:
        raise InvalidArgument("events", f"at most {MAX_EVENTS} events per batch, got {len(events)}")
    return [validate_event(e, f"events[{i}]") for i, e in enumerate(events)]


# ---- writing ----------------------------------------------------------------------------------------------------

def _lookup(conn, events: list[dict]) -> tuple[dict, dict]:
    """Members by reference and our deliveries by key, one query per kind of reference."""
    refs: dict[str, set] = {"card": set(), "phone": set(), "member_id": set()}
    keys: set[str] = set()
    for e in events:
        if e["ref"] is not None:
            refs[e["ref"][0]].add(e["ref"][1])
            if len(e["ref"]) == 3:                      # a card and a phone: both are looked up
                refs["phone"].add(e["ref"][2])
        if e["message_id"]:
            keys.update({e["message_id"], message_key(e["message_id"])})
    found: dict[tuple, int] = {}
    if refs["card"]:
        found.update({("card", n): m for n, m in conn.execute(
            select(cards.c.number, cards.c.member_id).where(cards.c.number.in_(refs["card"])))})
    if refs["phone"]:
        found.update({("phone", p): m for p, m in conn.execute(
            select(members.c.phone, members.c.id).where(members.c.phone.in_(refs["phone"])))})
    if refs["member_id"]:
        found.update({("member_id", m): m for (m,) in conn.execute(
            select(members.c.id).where(members.c.id.in_(refs["member_id"])))})
    ob = scenario_outbox.c
    deliveries = {r.key: r for r in conn.execute(
        select(ob.key, ob.member_id, ob.channel, ob.scenario_id).where(ob.key.in_(keys)))} if keys else {}
    return found, deliveries


def _resolve(e: dict, path: str, found: dict, deliveries: dict) -> tuple[dict | None, tuple | None]:
    """(the row to write, None) or (None, (field, reason)) for an event that cannot be placed."""
    member_id = None
    if e["ref"] is not None:
        member_id = found.get(e["ref"][:2])
        if member_id is None:
            field = e["ref"][0]
            return None, (f"{path}.{field}", f"no member with this {field.replace('_', ' ')}")
        if len(e["ref"]) == 3 and found.get(("phone", e["ref"][2])) != member_id:
            return None, (f"{path}.card", f"{path}.card and {path}.phone name two different members (or the "
                                          f"phone is nobody's)")
    channel, scenario, message_id = e["channel"], e["scenario"], e["message_id"]
    delivery = (deliveries.get(message_id) or deliveries.get(message_key(message_id))) if message_id else None
    if delivery is not None:
        message_id = delivery.key
        if delivery.channel not in CHANNELS:
            return None, (f"{path}.message_id", f"delivery {delivery.key} is a {delivery.channel} call, "
                                                f"not a message")
        if channel and channel != delivery.channel:
            return None, (f"{path}.channel", f"delivery {delivery.key} went by {delivery.channel}, not {channel}")
        if member_id is not None and delivery.member_id != member_id:
            return None, (f"{path}.message_id", f"delivery {delivery.key} was to another member")
        member_id = delivery.member_id if member_id is None else member_id
        channel = delivery.channel
        scenario = scenario or delivery.scenario_id or ""
    elif member_id is None:
        return None, (f"{path}.message_id", "no delivery with this message id; give the member's card, phone "
                                            "or member_id with a provider's own message id")
    if member_id is None:
        return None, (f"{path}.message_id", f"delivery {delivery.key} has no member")
    if not channel:
        return None, (f"{path}.channel", "required: the message id is not one of our deliveries")
    return {"event_id": e["id"], "member_id": member_id, "channel": channel, "kind": e["kind"], "at": e["at"],
            "message_id": message_id or None, "scenario_id": scenario or None,
            "own_sent": delivery is not None and e["kind"] == "sent"}, None


def record(conn, events: list[dict], now: dt.datetime) -> dict:
    """Write a validated batch (``validate_batch``) in the caller's write transaction; returns the counts
    (``recorded``, ``duplicates``, ``duplicate_indexes``, ``rejected``, ``subscriptions_changed``)."""
    found, deliveries = _lookup(conn, events)
    rows: dict[str, tuple[int, dict]] = {}
    duplicates: list[int] = []
    rejected: list[dict] = []
    seen: set[str] = set()
    for i, e in enumerate(events):
        if e["id"] in seen:
            duplicates.append(i)
            continue
        seen.add(e["id"])
        if e["at"] > now + FUTURE_SLACK:
            row, problem = None, (f"events[{i}].at", f"{e['at'].isoformat()} is more than a day ahead of the "
                                                     f"server's clock")
        else:
            row, problem = _resolve(e, f"events[{i}]", found, deliveries)
        if problem is not None:
            rejected.append({"index": i, "id": e["id"], "field": problem[0], "reason": problem[1]})
        elif row.pop("own_sent"):
            # the outbox wrote its own ``sent`` when it handed this delivery over: the provider's is a repeat
            duplicates.append(i)
        else:
            rows[e["id"]] = (i, row)
    written = _insert(conn, [rows[k][1] for k in sorted(rows)], now)
    # Rows stored at this very ``now`` are this call's own: a run again after a lost COMMIT reply
    # (``Database.run_write``) answers them as recorded, as the first run would have (their effects are in).
    earlier = sorted(k for k in rows if k not in written)
    ours = set(conn.execute(select(message_events.c.event_id).where(
        message_events.c.event_id.in_(earlier), message_events.c.recorded_at == now)).scalars()) if earlier else set()
    duplicates += [i for k, (i, _row) in rows.items() if k not in written and k not in ours]
    new = sorted((rows[k] for k in written), key=lambda x: x[0])
    changed = _apply_subscriptions(conn, [row for _i, row in new], now)
    return {"recorded": len(written) + len(ours), "duplicates": len(duplicates),
            "duplicate_indexes": sorted(duplicates), "rejected": rejected, "subscriptions_changed": changed}


def _insert(conn, rows: list[dict], now: dt.datetime) -> set[str]:
    """Insert what is not there yet (in event id order); the ids this transaction wrote."""
    written: set[str] = set()
    for k in range(0, len(rows), 500):
        chunk = [{**r, "recorded_at": now} for r in rows[k:k + 500]]
        stmt = insert_ignore(conn, message_events).values(chunk).returning(message_events.c.event_id)
        written.update(conn.execute(stmt).scalars())
    return written


def _apply_subscriptions(conn, rows: list[dict], now: dt.datetime) -> int:
    """``unsubscribed`` / ``confirmed`` among the rows just written: per member and channel the newest one
    wins, unless a newer one was recorded before."""
    latest: dict[tuple[int, str], dict] = {}
    for r in rows:
        if r["kind"] in SUBSCRIPTION_KINDS:
            key = (r["member_id"], r["channel"])
            if key not in latest or r["at"] >= latest[key]["at"]:
                latest[key] = r
    if not latest:
        return 0
    ids = sorted({m for m, _c in latest})
    lock = dialect_of(conn).lock(select(members.c.id).where(members.c.id.in_(ids)).order_by(members.c.id))
    conn.execute(lock).all()           # serialises this with any other batch about the same members
    me = message_events.c
    changed = 0
    for (member_id, channel), r in sorted(latest.items()):
        newer = conn.execute(select(exists().where(
            me.member_id == member_id, me.channel == channel, me.kind.in_(tuple(SUBSCRIPTION_KINDS)),
            me.event_id.is_not(None), me.event_id != r["event_id"], me.at > r["at"]))).scalar()
        if not newer:
            changed += set_subscription(conn, member_id, channel, SUBSCRIPTION_KINDS[r["kind"]], now)
    return changed


def set_subscription(conn, member_id: int, channel: str, on: bool, now: dt.datetime) -> int:
    """Switch one subscription on or off; 1 when that changed a row, else 0. While the member's card is
    not ``active`` (SetCardStatus keeps ``on`` off and what to restore in ``saved_on``), the change goes to
    ``saved_on``, so that returning to ``active`` restores what the member chose last."""
    s = subscriptions.c
    held = conn.execute(select(or_(
        exists().where(s.member_id == member_id, s.saved_on.is_not(None)),
        ~exists().where(cards.c.member_id == member_id, cards.c.status == "active")))).scalar()
    # RETURNING rather than rowcount: through SQLAlchemy, psycopg gives -1 (unknown) for INSERT ... ON CONFLICT
    created = conn.execute(insert_ignore(conn, subscriptions).values(
        member_id=member_id, channel=channel, on=on and not held, saved_on=on if held else None,
        updated_at=now).returning(s.member_id)).first()
    if created is not None:
        return 1
    # one statement, so it is right whatever SetCardStatus committed meanwhile (PostgreSQL re-reads the row)
    return len(conn.execute(update(subscriptions).where(
        s.member_id == member_id, s.channel == channel,
        or_(and_(s.saved_on.is_(None), s.on != on), and_(s.saved_on.is_not(None), s.saved_on != on)))
        .values(on=case((s.saved_on.is_(None), on), else_=s.on),
                saved_on=case((s.saved_on.is_(None), None), else_=on), updated_at=now)
        .returning(s.member_id)).all())
