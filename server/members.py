"""Members, cards and subscriptions: finding a member by card or phone, the member context the core needs,
enrollment, card status changes and the ``Member`` message.

The member context (status, tier, balances, audiences, promotion usage, tier metric) is read with one
joined query; ``ContextCache`` keeps it per process for ``CONTEXT_TTL`` seconds for ``CalculateReceipt``,
stamped with what it was built for (the program version, whose promotions decide which usage is read, and the
membership version, which the audiences come from and which other processes' card status and job writes move
too): a context is not used once either moved. The service also drops a member's entry whenever this process
writes to it. Confirm never uses the cache: it re-reads the context under the member's lock.
"""
from __future__ import annotations

import datetime as dt
import re
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import and_, bindparam, func, insert, select, update

from loyalty.core.errors import quote
from loyalty.core.model import CARD_STATUSES, Program

from .dialects import dialect_of
from .errors import InvalidArgument
from .limits import (AT_LIMIT, CUSTOM_NAME_LIMIT, CUSTOM_VALUE_LIMIT, DATE_LIMIT, EMAIL_LIMIT, ID_LIMIT, KEY_LIMIT,
                     NAME_LIMIT)
from .models import CHANNELS, SOURCES, balances, cards, members, point_lots, promotion_usage, subscriptions

__all__ = ["MemberContext", "ContextCache", "find_member", "load_usage", "tier_for",
           "effective_tier", "period_key", "validate_ref",
           "check_card", "ERASED_PREFIX", "check_pair", "normalize_phone", "check_phone",
           "validate_enroll", "validate_update", "check_text", "CONTEXT_TTL"]

CONTEXT_TTL = 2.0
_PHONE_RE = re.compile(r"^\+?\d{5,20}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass(slots=True)
class MemberContext:
    member_id: int
    card: str
    status: str
    tier: str
    active_points: int
    pending_points: int
    purchases_sum: int
    audiences: tuple[str, ...] = ()
    usage: dict = field(default_factory=dict)     # (promotion, period_key) -> uses

    def as_core(self, program: Program, at: dt.datetime | None) -> dict:
        """The ``member`` object of SPEC 4 for the core."""
        usage = {}
        if self.usage and at is not None:
            for p in program.promotions:
                if p.limits.uses_per_member is not None:
                    usage[p.id] = self.usage.get((p.id, period_key(p.limits.period, at)), 0)
        return {"card": self.card, "status": self.status, "tier": effective_tier(program, self.tier,
                                                                                   self.purchases_sum),
                "active_points": max(self.active_points, 0), "pending_points": self.pending_points,
                "audiences": list(self.audiences), "usage": usage, "purchases_sum": self.purchases_sum}


# ---- references and validation ------------------------------------------------------------------------------

# Subscription channels are ``models.CHANNELS``; the length of every field is in ``limits``.
GENDERS = ("female", "male")


def check_text(path: str, value: str, limit: int | None = None) -> str:
    """``value`` unchanged when storage can hold it: no NUL character (PostgreSQL text cannot contain one)
    and, with ``limit``, at most that many characters (the column's length); else ``InvalidArgument``
    naming ``path``. Every string the service stores or looks up passes through here before any write."""
    if "\x00" in value:
        raise InvalidArgument(path, "must not contain NUL characters")
    if limit is not None and len(value) > limit:
        raise InvalidArgument(path, f"at most {limit} characters, got {len(value)}")
    return value


def normalize_phone(phone: str) -> str:
    return re.sub(r"[\s\-()]", "", phone)


def check_phone(path: str, raw: str) -> str:
    """The normalized phone of ``raw`` (spaces, dashes and brackets dropped); ``InvalidArgument`` naming
    ``path`` when it is not one."""
    phone = normalize_phone(raw)
    if not _PHONE_RE.fullmatch(phone):
        raise InvalidArgument(path, f"expected a phone number such as +79001234567, got {quote(raw)}")
    return phone


# The card number an erasure leaves (``security.privacy.erased_marker``): no request may name a card so.
ERASED_PREFIX = "erased:"


def check_card(path: str, card: str) -> str:
    """A card number a request carries (already stripped): its length and characters as any identifier, and
    not an erased card's marker."""
    check_text(path, card, ID_LIMIT)
    if card[:len(ERASED_PREFIX)].lower() == ERASED_PREFIX:
        raise InvalidArgument(path, f"{ERASED_PREFIX!r} marks an erased card: no card is numbered so")
    return card


def validate_ref(ref, path: str = "member", *, required: bool = False) -> tuple | None:
    """The member reference of a ``MemberRef``: ``("card", number)``, ``("phone", normalized)``, or with both
    ``("card", number, phone)``, which the lookup (``find_member``, ``check_pair``) accepts only when the phone
    is that card's member's; None when both are empty (anonymous)."""
    card = ref.card.strip() if ref is not None else ""
    phone = normalize_phone(ref.phone) if ref is not None else ""
    if card:
        check_card(f"{path}.card", card)
    if phone:
        phone = check_phone(f"{path}.phone", ref.phone)
    if card:
        return ("card", card, phone) if phone else ("card", card)
    if phone:
        return ("phone", phone)
    if required:
        raise InvalidArgument(f"{path}.card", "required: a card number or a phone")
    return None


def check_pair(ref: tuple, card_member: int, phone_member: int | None) -> None:
    """A reference with both a card and a phone names one member: the card's (``card_member``) must be the
    phone's (``phone_member``, None when no member has that phone); else ``InvalidArgument`` naming both."""
    if len(ref) > 2 and phone_member != card_member:
        hint = "give one of the two, or both of the same member"
        raise InvalidArgument("member.card", f"names another member than member.phone: {hint}",
                              also=(("member.phone", f"names another member than member.card: {hint}"),))


def _profile(prefix: str, fields: dict) -> dict:
    """The ``members`` columns of the profile fields given (``{name: text}``; ``""`` clears): gender, birth
    date, email checked; every text fits its column. ``InvalidArgument`` names ``prefix + name``."""
    out = {}
    for name, value in fields.items():
        path = prefix + name
        if name == "gender":
            if value not in ("",) + GENDERS:
                raise InvalidArgument(path, f"expected female, male or empty, got {quote(value)}")
            out[name] = value
        elif name == "birth_date":
            out[name] = None
            if value:
                try:
                    out[name] = dt.date.fromisoformat(check_text(path, value, DATE_LIMIT))
                except (ValueError, InvalidArgument):
                    raise InvalidArgument(path, f"expected a date YYYY-MM-DD, got {quote(value)}") from None
        elif name == "email":
            check_text(path, value, EMAIL_LIMIT)
            if value and not _EMAIL_RE.match(value):
                raise InvalidArgument(path, f"not an email address: {quote(value)}")
            out[name] = value
        else:                                   # first_name, last_name, city
            out[name] = check_text(path, value, NAME_LIMIT)
    return out


def _custom_name(path: str, name: str) -> str:
    if not name or len(name) > CUSTOM_NAME_LIMIT:
        raise InvalidArgument(path, f"a custom field name has 1 to {CUSTOM_NAME_LIMIT} characters, got "
                                    f"{quote(name)}")
    return check_text(path, name)


def _custom(path: str, custom) -> dict:
    for name, value in custom.items():
        _custom_name(path, name)
        check_text(f"{path}[{name!r}]", value, CUSTOM_VALUE_LIMIT)
    return dict(custom)


def _subscriptions(path: str, subs) -> dict:
    for channel in subs:
        if channel not in CHANNELS:
            raise InvalidArgument(path, f"a channel is one of {', '.join(CHANNELS)}, got {quote(channel)}")
    return dict(subs)


def _registered_at(value: str) -> dt.datetime | None:
    """An import's registration time: a date (midnight UTC) or an ISO 8601 time (UTC without an offset)."""
    if not value:
        return None
    try:
        at = dt.datetime.fromisoformat(check_text("registered_at", value, AT_LIMIT))
        at = at.astimezone(dt.timezone.utc) if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)
    except (ValueError, OverflowError, InvalidArgument):
        raise InvalidArgument("registered_at", f"expected a date YYYY-MM-DD or a time such as "
                                               f"2024-05-01T10:00:00+03:00, got {quote(value)}") from None
    if at.year < 1900:
        raise InvalidArgument("registered_at", f"before 1900: {quote(value)}")
    return at


def validate_enroll(request) -> dict:
    """The member row's values from an ``EnrollMemberRequest``; ``InvalidArgument`` on the first bad field."""
    card = request.card.strip()
    if not card:
        raise InvalidArgument("card", "required")
    check_card("card", card)
    phone = check_phone("phone", request.phone) if normalize_phone(request.phone) else None
    source = request.source or "api"
    if source not in SOURCES:
        raise InvalidArgument("source", f"expected one of {', '.join(SOURCES)}, got {quote(request.source)}")
    p = request.profile
    values = _profile("profile.", {"first_name": p.first_name, "last_name": p.last_name, "gender": p.gender,
                                   "birth_date": p.birth_date, "email": p.email, "city": p.city})
    values.update(card=card, phone=phone, source=source, custom=_custom("profile.custom", p.custom),
                  registered_at=_registered_at(request.registered_at),
                  enroll_request_id=check_text("request_id", request.request_id, KEY_LIMIT) or None,
                  subscriptions=_subscriptions("subscriptions", request.subscriptions))
    return values


# The profile fields ``UpdateMemberRequest`` sets (given) or clears (given as ""), beside ``phone``.
PROFILE_FIELDS = ("first_name", "last_name", "gender", "birth_date", "email", "city")


def validate_update(request) -> dict:
    """What an ``UpdateMemberRequest`` changes: ``ref``, ``request_id`` (or None), ``fields`` (``members``
    columns set, None or "" to clear; ``phone`` included when given), ``custom`` (names set), ``clear_custom``
    (names removed) and ``subscriptions`` (channel -> on). ``InvalidArgument`` on the first bad field, and
    when the request changes nothing."""
    ref = validate_ref(request.member if request.HasField("member") else None, required=True)
    fields = _profile("", {name: getattr(request, name) for name in PROFILE_FIELDS if request.HasField(name)})
    if request.HasField("phone"):
        fields["phone"] = check_phone("phone", request.phone) if normalize_phone(request.phone) else None
    custom = _custom("custom", request.custom)
    clear = []
    for i, name in enumerate(request.clear_custom):
        _custom_name(f"clear_custom[{i}]", name)
        if name in custom:
            raise InvalidArgument(f"clear_custom[{i}]", f"custom field {name!r} is also set in custom")
        clear.append(name)
    subs = _subscriptions("subscriptions", request.subscriptions)
    if not (fields or custom or clear or subs):
        raise InvalidArgument("", "nothing to change: give a profile field, custom, clear_custom or subscriptions")
    return {"ref": ref, "request_id": check_text("request_id", request.request_id.strip(), KEY_LIMIT) or None,
            "fields": fields, "custom": custom, "clear_custom": clear, "subscriptions": subs}


def validate_status(status: str, path: str = "status") -> str:
    if status not in CARD_STATUSES:
        raise InvalidArgument(path, f"expected one of {', '.join(CARD_STATUSES)}, got {quote(status)}")
    return status


# ---- tiers and periods --------------------------------------------------------------------------------------

def tier_for(program: Program, purchases_sum: int) -> str:
    """The highest level whose threshold the metric reaches."""
    name = program.tiers.levels[0].name
    for level in program.tiers.levels:
        if purchases_sum >= level.threshold:
            name = level.name
    return name


def effective_tier(program: Program, stored: str, purchases_sum: int) -> str:
    """The stored tier if the program still has it, else the one the metric gives (after a program change)."""
    for level in program.tiers.levels:
        if level.name == stored:
            return stored
    return tier_for(program, purchases_sum)


def tier_threshold(program: Program, name: str) -> int:
    for level in program.tiers.levels:
        if level.name == name:
            return level.threshold
    return -1


def next_tier(program: Program, purchases_sum: int) -> tuple[str, int | None]:
    for level in program.tiers.levels:
        if level.threshold > purchases_sum:
            return level.name, level.threshold - purchases_sum
    return "", None


def tier_window_start(program: Program, now: dt.datetime) -> dt.date | None:
    """The first receipt date the tier metric counts at ``now`` (SPEC 6: receipts count by their local date):
    ``window_days`` N covers the N dates up to and including today (UTC); None for a lifetime metric."""
    days = program.tiers.window_days
    return now.astimezone(dt.timezone.utc).date() - dt.timedelta(days=days - 1) if days else None


def in_tier_window(program: Program, receipt_date: dt.date, now: dt.datetime) -> bool:
    """Whether a purchase of ``receipt_date`` counts in the tier metric at ``now``."""
    start = tier_window_start(program, now)
    return start is None or receipt_date >= start


def period_key(period: str, at: dt.datetime) -> str:
    """The usage period a receipt's local time falls in."""
    if period == "day":
        return at.strftime("%Y-%m-%d")
    if period == "week":
        year, week, _ = at.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return at.strftime("%Y-%m")
    if period == "year":
        return at.strftime("%Y")
    return "all"


# ---- reading ------------------------------------------------------------------------------------------------

_CONTEXT_COLS = (balances.c.member_id, cards.c.number, cards.c.status, balances.c.tier, balances.c.active,
                 balances.c.pending, balances.c.purchases_sum)


def _context_stmt(kind: str, lock: bool):
    stmt = select(*_CONTEXT_COLS).select_from(cards.join(balances, balances.c.member_id == cards.c.member_id))
    if kind == "card":
        stmt = stmt.where(cards.c.number == bindparam("ref"))
    else:
        stmt = (stmt.join(members, members.c.id == cards.c.member_id).where(members.c.phone == bindparam("ref"))
                .order_by((cards.c.status == "active").desc(), cards.c.id.desc()).limit(1))
    if lock:
        stmt = stmt.with_for_update(of=balances)
    return stmt


# Built once: a statement object made per call costs more Python than the query itself.
_CONTEXT_STMTS = {(kind, lock): _context_stmt(kind, lock) for kind in ("card", "phone") for lock in (False, True)}

# The member of a phone, for ``check_pair``.
_PHONE_MEMBER = select(members.c.id).where(members.c.phone == bindparam("phone"))


def find_member(conn, ref: tuple, *, lock: bool = False) -> MemberContext | None:
    """The member's context by card or phone (the member's newest active card for a phone), None when
    unknown; a reference with both (``validate_ref``) is refused unless the phone is the card's member's
    (``check_pair``). With ``lock``, the ``balances`` row is locked for the transaction (PostgreSQL ``FOR
    UPDATE``; SQLite already holds the database's write lock)."""
    kind, value = ref[0], ref[1]
    stmt = _CONTEXT_STMTS[kind, lock and dialect_of(conn).locks_rows]
    row = conn.execute(stmt, {"ref": value}).first()
    if row is None:
        return None
    if len(ref) > 2:
        check_pair(ref, row[0], conn.execute(_PHONE_MEMBER, {"phone": ref[2]}).scalar())
    return MemberContext(member_id=row[0], card=row[1], status=row[2], tier=row[3], active_points=row[4],
                         pending_points=row[5], purchases_sum=row[6])


_USAGE_STMT = (select(promotion_usage.c.promotion, promotion_usage.c.period_key, promotion_usage.c.uses)
               .where(promotion_usage.c.member_id == bindparam("member_id"),
                      promotion_usage.c.promotion.in_(bindparam("ids", expanding=True))))


def load_usage(conn, member_id: int, promotion_ids: list[str]) -> dict:
    if not promotion_ids:
        return {}
    rows = conn.execute(_USAGE_STMT, {"member_id": member_id, "ids": list(promotion_ids)}).all()
    return {(p, k): u for p, k, u in rows}


def increment_usage(conn, member_id: int, keys: list[tuple[str, str]]) -> None:
    """One more use of each (promotion, period_key); the caller holds the member's lock, so the
    update-then-insert cannot race with another write of the same member."""
    for promotion, key in keys:
        cond = and_(promotion_usage.c.member_id == member_id, promotion_usage.c.promotion == promotion,
                    promotion_usage.c.period_key == key)
        if conn.execute(update(promotion_usage).where(cond).values(uses=promotion_usage.c.uses + 1)).rowcount == 0:
            conn.execute(insert(promotion_usage).values(member_id=member_id, promotion=promotion, period_key=key,
                                                        uses=1))


def member_view(conn, ref: tuple, audiences_of) -> dict | None:
    """Everything the ``Member`` message shows, or None; ``audiences_of(conn, member_id)`` gives the
    member's audience ids (the segment module's index)."""
    ctx = find_member(conn, ref)
    if ctx is None:
        return None
    m = conn.execute(select(members).where(members.c.id == ctx.member_id)).one()._mapping
    subs = dict(conn.execute(select(subscriptions.c.channel, subscriptions.c.on)
                             .where(subscriptions.c.member_id == ctx.member_id)).all())
    expiry = conn.execute(
        select(point_lots.c.expires_at, func.sum(point_lots.c.remaining))
        .where(point_lots.c.member_id == ctx.member_id, point_lots.c.state == "active",
               point_lots.c.remaining > 0, point_lots.c.expires_at.is_not(None))
        .group_by(point_lots.c.expires_at).order_by(point_lots.c.expires_at).limit(1)).first()
    return {"ctx": ctx, "member": dict(m), "subscriptions": subs,
            "audiences": audiences_of(conn, ctx.member_id),
            "next_expiry_at": expiry[0] if expiry else None, "next_expiry_points": int(expiry[1]) if expiry else 0}


# ---- the per-process cache ----------------------------------------------------------------------------------

class ContextCache:
    """Member contexts by reference for ``CONTEXT_TTL`` seconds, each with the ``stamp`` it was built for
    (``(program version, membership version)``): ``get`` with another stamp misses, so a context never outlives
    a change of the program or of the memberships it was built from. The caller takes the stamp before it
    reads the context (what it reads can then only be newer). ``invalidate(member_id)`` drops every reference
    of a member this process has just written to."""

    def __init__(self, ttl: float = CONTEXT_TTL, max_entries: int = 100_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: dict[tuple[str, str], tuple[float, tuple, MemberContext]] = {}
        self._by_member: dict[int, set] = {}
        self._lock = threading.Lock()

    def get(self, ref, stamp: tuple) -> MemberContext | None:
        item = self._items.get(ref)
        if item is None or item[1] != stamp or item[0] < time.monotonic():
            return None
        return item[2]

    def put(self, ref, ctx: MemberContext, stamp: tuple) -> None:
        with self._lock:
            if len(self._items) >= self.max_entries:
                self._items.clear()
                self._by_member.clear()
            self._items[ref] = (time.monotonic() + self.ttl, stamp, ctx)
            self._by_member.setdefault(ctx.member_id, set()).add(ref)

    def invalidate(self, member_id: int | None) -> None:
        if member_id is None:
            return
        with self._lock:
            for ref in self._by_member.pop(member_id, ()):
                self._items.pop(ref, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._by_member.clear()
