"""Segment conditions: validation with field paths, compilation of the whole tree into ONE SQL query
(SQLAlchemy Core, the same text on PostgreSQL and SQLite), and a plain per-member Python evaluator used as the
second opinion in tests.

The tree (YAML in the program file's ``segments:``, JSON through the API) is ``all: [...]``, ``any: [...]``,
``not: {...}`` over leaves, each a mapping with one key::

    gender: female                    city: {in: [Moscow, Kazan]}        source: pos
    birth_date: {lt: 1990-01-01}      age: {between: [25, 40]}          registered_at: {gte: 2025-01-01}
    custom: {pet: cat}                subscribed: email                  tag: vip        tier: {in: [Gold]}
    card_status: active               points: {active: {gte: 500}, pending: {gt: 0}, accrued_total: {gt: 1000}}
    purchases: {window_days: 90, count: {gte: 2}, sum: {gte: 500000}, average: {gte: 150000},
                first_date: {gte: 2026-01-01}, last_date: {between: [2026-01-01, 2026-04-01]},
                bought: {group: dairy}}                    # or from / to dates instead of window_days
    messages: {kind: opened, channel: email, window_days: 30, count: {gte: 1}}
    segment: women-q1                 # membership of another segment

A comparison is a scalar (equality) or a mapping of operators, all of which must hold: ``eq``, ``ne``,
``in``, ``not_in`` for every field, ``gt``, ``gte``, ``lt``, ``lte``, ``between: [a, b]`` (inclusive) for
numbers and dates, ``exists: true|false`` for fields that may be empty (birth date, custom fields).

Semantics, identical in SQL and in ``evaluate``: every leaf is two-valued (a missing value satisfies no
comparison except ``exists: false``), so ``not`` is plain negation. A purchase's date is its receipt's local
date (``purchases.receipt_date``: receipts confirmed late count on their own dates); other dates are UTC days.
A purchase counts
while its status is ``confirmed`` (partly refunded ones included), its amount is ``payable`` minus
``refunded_payable``; ``average`` compares sum with value x count in integers (no division); a member with
no purchase in the window has count 0 and sum 0 and no average, first or last date. ``accrued_total`` is the
sum of the member's ``accrual`` ledger entries. ``age`` is in full years at the evaluation date and is
compiled to birth-date bounds. ``card_status`` holds when some card of the member matches.

Compilation: balances are LEFT JOINed once; each purchase / message / ledger aggregate is a grouped
subquery LEFT JOINed on ``member_id`` (one per distinct window), so a single pass over the big tables serves
the whole tree; set leaves (subscriptions, tags, cards, bought, stored segments) are ``member_id IN
(SELECT ...)``. No Python loop over members anywhere.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

from sqlalchemy import and_, false, func, not_, or_, select, true
from sqlalchemy.sql import ColumnElement, Select

from loyalty.server.errors import InvalidArgument
from loyalty.server.models import balances, cards, ledger, members, purchase_lines, purchases, subscriptions

from .models import MESSAGE_KINDS, member_tags, message_events, segment_members

__all__ = ["validate", "compile_query", "compile_predicate", "evaluate", "load_facts", "CompileContext",
           "segment_refs", "LEAVES"]

UTC = dt.timezone.utc
STR_OPS = ("eq", "ne", "in", "not_in")
ORDER_OPS = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between")
MAX_DEPTH = 32
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")

# leaf name -> value kind
PROFILE_STR = {"gender": members.c.gender, "city": members.c.city, "source": members.c.source}
LEAVES = ("gender", "city", "source", "birth_date", "age", "registered_at", "custom", "subscribed", "tag",
          "tier", "card_status", "points", "purchases", "messages", "segment")
# The leaves that are one comparison: value kind (str, date, int) and whether it may be empty (``exists``).
# The validator and the JSON Schema (``loyalty.server.schemas``) both read this table.
COMPARISON_LEAVES = {"gender": ("str", False), "city": ("str", False), "source": ("str", False),
                     "tier": ("str", False), "card_status": ("str", False), "birth_date": ("date", True),
                     "registered_at": ("date", False), "age": ("int", True)}
AGE_RANGE = (0, 150)
WINDOW_DAYS = (1, 36600)
MAX_LIST = 1000
MAX_TEXT = 254
POINT_FIELDS = ("active", "pending", "accrued_total")
BOUGHT_KEYS = ("group", "sku", "skus")
PURCHASE_KEYS = ("window_days", "from", "to", "count", "sum", "average", "first_date", "last_date", "bought")
MESSAGE_KEYS = ("kind", "channel", "window_days", "from", "to", "count")


# ---- validation ---------------------------------------------------------------------------------------------

def _fail(path: str, reason: str):
    raise InvalidArgument(path, reason)


# The years a date in a condition may name (windows add a day to their end).
MIN_YEAR, MAX_YEAR = 1900, 9998


def _as_date(value, path: str) -> dt.date:
    if isinstance(value, dt.datetime):
        _fail(path, f"expected a date YYYY-MM-DD, got a date and time {value.isoformat()!r}")
    if isinstance(value, str):
        try:
            value = dt.date.fromisoformat(value)
        except ValueError:
            pass
    if isinstance(value, dt.date):
        if not MIN_YEAR <= value.year <= MAX_YEAR:
            _fail(path, f"dates run from {MIN_YEAR} to {MAX_YEAR}, got {value.isoformat()}")
        return value
    _fail(path, f"expected a date YYYY-MM-DD, got {value!r}")


def _as_int(value, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"expected a whole number, got {value!r}")
    if abs(value) > 10**15:
        _fail(path, "out of range")
    return value


def _as_str(value, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, f"expected a string, got {value!r}")
    if len(value) > MAX_TEXT:
        _fail(path, f"at most {MAX_TEXT} characters")
    return value


def _comparison(value, path: str, kind: str, *, nullable: bool = False) -> dict:
    """A normalised comparison ``{op: value}``; ``kind`` is str, int or date."""
    conv = {"str": _as_str, "int": _as_int, "date": _as_date}[kind]
    ops = STR_OPS if kind == "str" else ORDER_OPS
    if not isinstance(value, dict):
        if isinstance(value, list):
            _fail(path, "a list needs an operator: {in: [...]}")
        return {"eq": conv(value, path)}
    if not value:
        _fail(path, f"an empty comparison; use one of {', '.join(ops)}")
    out = {}
    for op, v in value.items():
        p = f"{path}.{op}"
        if op == "exists":
            if not nullable:
                _fail(p, "this field always has a value; exists is not available")
            if not isinstance(v, bool):
                _fail(p, f"expected true or false, got {v!r}")
            out[op] = v
        elif op not in ops:
            allowed = ops + (("exists",) if nullable else ())
            _fail(p, f"unknown operator; expected one of {', '.join(allowed)}")
        elif op in ("in", "not_in"):
            if not isinstance(v, list) or not v:
                _fail(p, "expected a non-empty list")
            if len(v) > MAX_LIST:
                _fail(p, f"at most {MAX_LIST} values")
            out[op] = [conv(x, f"{p}[{i}]") for i, x in enumerate(v)]
        elif op == "between":
            if not isinstance(v, list) or len(v) != 2:
                _fail(p, "expected [from, to]")
            lo, hi = conv(v[0], f"{p}[0]"), conv(v[1], f"{p}[1]")
            if lo > hi:
                _fail(p, f"from {lo} is after to {hi}")
            out[op] = [lo, hi]
        else:
            out[op] = conv(v, p)
    return out


def _mapping(value, path: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        _fail(path, f"expected a mapping with some of: {', '.join(keys)}")
    for k in value:
        if k not in keys:
            _fail(f"{path}.{k}", f"unknown key; expected one of {', '.join(keys)}")
    return value


def _window(spec: dict, path: str, out: dict) -> None:
    if "window_days" in spec:
        if "from" in spec or "to" in spec:
            _fail(f"{path}.window_days", "give either window_days or from / to, not both")
        n = _as_int(spec["window_days"], f"{path}.window_days")
        if not WINDOW_DAYS[0] <= n <= WINDOW_DAYS[1]:
            _fail(f"{path}.window_days", f"expected {WINDOW_DAYS[0]} to {WINDOW_DAYS[1]} days, got {n}")
        out["window_days"] = n
    if "from" in spec:
        out["from"] = _as_date(spec["from"], f"{path}.from")
    if "to" in spec:
        out["to"] = _as_date(spec["to"], f"{path}.to")
    if "from" in out and "to" in out and out["from"] > out["to"]:
        _fail(f"{path}.to", f"{out['to']} is before from {out['from']}")


def validate(tree, path: str = "conditions", *, known_segments: Callable[[str], bool] | None = None,
             groups: dict[str, frozenset[str]] | None = None, _depth: int = 0) -> dict:
    """The normalised tree (JSON-ready: dates become ISO strings) or ``InvalidArgument(path, reason)``.

    ``known_segments(id)`` says whether a referenced segment exists; ``groups`` maps the program's product
    groups to their skus (None: group names are not checked here)."""
    norm = _validate(tree, path, known_segments, groups, _depth)
    return _jsonable(norm)


def _validate(tree, path, known, groups, depth) -> dict:
    if depth > MAX_DEPTH:
        _fail(path, f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(tree, dict) or len(tree) != 1:
        _fail(path, "expected a mapping with exactly one key: all, any, not or a condition such as "
                    "gender, purchases, points")
    (key, value), = tree.items()
    p = f"{path}.{key}"
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            _fail(p, "expected a non-empty list of conditions")
        return {key: [_validate(c, f"{p}[{i}]", known, groups, depth + 1) for i, c in enumerate(value)]}
    if key == "not":
        return {"not": _validate(value, p, known, groups, depth + 1)}
    if key in COMPARISON_LEAVES:
        kind, nullable = COMPARISON_LEAVES[key]
        c = _comparison(value, p, kind, nullable=nullable)
        if key == "age":
            lo, hi = AGE_RANGE
            for op, v in c.items():
                for x in (v if isinstance(v, list) else [v]):
                    if not isinstance(x, bool) and not lo <= x <= hi:
                        _fail(f"{p}.{op}", f"an age from {lo} to {hi}, got {x}")
        return {key: c}
    if key == "custom":
        if not isinstance(value, dict) or not value:
            _fail(p, "expected {field_name: comparison, ...}")
        out = {}
        for name, cmp in value.items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                _fail(f"{p}.{name}", "a custom field name has 1-100 letters, digits, _ . -")
            out[name] = _comparison(cmp, f"{p}.{name}", "str", nullable=True)
        return {key: out}
    if key == "subscribed":
        ch = _as_str(value, p)
        if not ch or len(ch) > 32:
            _fail(p, "a channel name of 1 to 32 characters")
        return {key: ch}
    if key == "tag":
        c = _comparison(value, p, "str")
        if set(c) - {"eq", "in"}:
            _fail(p, "a tag, or {in: [tags]} for any of several")
        return {key: c}
    if key == "points":
        spec = _mapping(value, p, POINT_FIELDS)
        if not spec:
            _fail(p, f"expected at least one of {', '.join(POINT_FIELDS)}")
        return {key: {k: _comparison(v, f"{p}.{k}", "int") for k, v in spec.items()}}
    if key == "purchases":
        spec = _mapping(value, p, PURCHASE_KEYS)
        out: dict[str, Any] = {}
        _window(spec, p, out)
        for k in ("count", "sum", "average"):
            if k in spec:
                out[k] = _comparison(spec[k], f"{p}.{k}", "int")
        for k in ("first_date", "last_date"):
            if k in spec:
                out[k] = _comparison(spec[k], f"{p}.{k}", "date")
        if "bought" in spec:
            b = _mapping(spec["bought"], f"{p}.bought", BOUGHT_KEYS)
            if len(b) != 1:
                _fail(f"{p}.bought", "expected exactly one of group, sku, skus")
            if "group" in b:
                g = _as_str(b["group"], f"{p}.bought.group")
                if groups is not None:
                    if g not in groups:
                        _fail(f"{p}.bought.group", f"no product group {g!r} in the published program")
                    if not groups[g]:
                        _fail(f"{p}.bought.group", f"group {g!r} is defined by categories only; purchase "
                                                   f"lines keep skus, so name its skus instead")
                out["bought"] = {"group": g}
            else:
                skus = [b["sku"]] if "sku" in b else b["skus"]
                if not isinstance(skus, list) or not skus:
                    _fail(f"{p}.bought.skus", "expected a non-empty list of skus")
                out["bought"] = {"skus": [_as_str(s, f"{p}.bought.skus[{i}]") for i, s in enumerate(skus)]}
        if not set(out) - {"window_days", "from", "to"}:
            _fail(p, "expected at least one of count, sum, average, first_date, last_date, bought")
        return {key: out}
    if key == "messages":
        spec = _mapping(value, p, MESSAGE_KEYS)
        out = {}
        _window(spec, p, out)
        kind = spec.get("kind")
        if kind not in MESSAGE_KINDS:
            _fail(f"{p}.kind", f"expected one of {', '.join(MESSAGE_KINDS)}, got {kind!r}")
        out["kind"] = kind
        if "channel" in spec:
            out["channel"] = _as_str(spec["channel"], f"{p}.channel")
        out["count"] = _comparison(spec.get("count", {"gte": 1}), f"{p}.count", "int")
        return {key: out}
    if key == "segment":
        sid = _as_str(value, p)
        if not _NAME_RE.match(sid):
            _fail(p, f"not a segment id: {sid!r}")
        if known is not None and not known(sid):
            _fail(p, f"no segment {sid!r}")
        return {key: sid}
    _fail(p, f"unknown condition; expected all, any, not or one of {', '.join(LEAVES)}")


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, dt.date):
        return x.isoformat()
    return x


def segment_refs(tree) -> set[str]:
    """Ids of the segments a (normalised) tree names."""
    out: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "segment":
                out.add(v)
            elif k in ("all", "any"):
                for c in v:
                    out |= segment_refs(c)
            elif k == "not":
                out |= segment_refs(v)
    return out


# ---- shared helpers (SQL and Python follow the same definitions) --------------------------------------------

def _d(v) -> dt.date:
    return v if isinstance(v, dt.date) else dt.date.fromisoformat(v)


def _midnight(d: dt.date) -> dt.datetime:
    return dt.datetime(d.year, d.month, d.day, tzinfo=UTC)


def _window_dates(spec: dict, as_of: dt.date) -> tuple[dt.date | None, dt.date | None]:
    """[start, end) as dates; window_days N covers the N days up to and including ``as_of``; ``from`` / ``to``
    include both days."""
    if "window_days" in spec:
        return as_of - dt.timedelta(days=spec["window_days"] - 1), None
    start = _d(spec["from"]) if "from" in spec else None
    end = _d(spec["to"]) + dt.timedelta(days=1) if "to" in spec else None
    return start, end


def _window_bounds(spec: dict, as_of: dt.date) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``_window_dates`` as [start, end) instants in UTC (for timestamps: message events)."""
    start, end = _window_dates(spec, as_of)
    return (None if start is None else _midnight(start)), (None if end is None else _midnight(end))


def _years_before(d: dt.date, n: int) -> dt.date:
    try:
        return d.replace(year=d.year - n)
    except ValueError:      # 29 February in a year that has none
        return d.replace(year=d.year - n, day=28)


def _age(birth: dt.date, as_of: dt.date) -> int:
    return as_of.year - birth.year - ((as_of.month, as_of.day) < (birth.month, birth.day))


# ---- compilation --------------------------------------------------------------------------------------------

@dataclass
class CompileContext:
    """What compilation needs besides the tree: the evaluation day, the program's product groups (name ->
    skus), and a lookup of other segments (id -> (type, conditions)) for ``segment`` leaves."""
    as_of: dt.date
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    segment_lookup: Callable[[str], tuple[str, dict | None] | None] = lambda _id: None
    only_member: int | None = None      # evaluate for this one member: every subquery is narrowed to it


class _Compiler:
    def __init__(self, ctx: CompileContext):
        self.ctx = ctx
        self.joins: list = []          # (subquery, on clause)
        self._aggs: dict = {}
        self._balances = False
        self._stack: list[str] = []

    # -- joins --
    def balances(self):
        self._balances = True
        return balances

    def _agg(self, key, build):
        sub = self._aggs.get(key)
        if sub is None:
            sub = build(f"agg_{len(self._aggs) + 1}")
            self._aggs[key] = sub
            self.joins.append(sub)
        return sub

    def _one(self, col) -> list:
        return [] if self.ctx.only_member is None else [col == self.ctx.only_member]

    def _window_where(self, col, spec, *, by_date: bool = False) -> list:
        """``col`` inside the window of ``spec``: a timestamp by UTC day, or (``by_date``) a date column, as
        purchases are counted by their receipt's local date (SPEC 6-7)."""
        start, end = (_window_dates if by_date else _window_bounds)(spec, self.ctx.as_of)
        out = []
        if start is not None:
            out.append(col >= start)
        if end is not None:
            out.append(col < end)
        return out

    def purchase_agg(self, spec):
        key = ("purchases", spec.get("window_days"), spec.get("from"), spec.get("to"))

        def build(name):
            p = purchases
            return (select(p.c.member_id.label("member_id"), func.count().label("n"),
                           func.sum(p.c.payable - p.c.refunded_payable).label("total"),
                           func.min(p.c.receipt_date).label("first_at"),
                           func.max(p.c.receipt_date).label("last_at"))
                    .where(p.c.member_id.is_not(None), p.c.status == "confirmed",
                           *self._window_where(p.c.receipt_date, spec, by_date=True), *self._one(p.c.member_id))
                    .group_by(p.c.member_id).subquery(name))
        return self._agg(key, build)

    def message_agg(self, spec):
        key = ("messages", spec["kind"], spec.get("channel"), spec.get("window_days"), spec.get("from"),
               spec.get("to"))

        def build(name):
            m = message_events
            where = [m.c.kind == spec["kind"], *self._window_where(m.c.at, spec), *self._one(m.c.member_id)]
            if "channel" in spec:
                where.append(m.c.channel == spec["channel"])
            return (select(m.c.member_id.label("member_id"), func.count().label("n"))
                    .where(*where).group_by(m.c.member_id).subquery(name))
        return self._agg(key, build)

    def accrued_agg(self):
        def build(name):
            return (select(ledger.c.member_id.label("member_id"), func.sum(ledger.c.points).label("total"))
                    .where(ledger.c.kind == "accrual", *self._one(ledger.c.member_id)).group_by(ledger.c.member_id).subquery(name))
        return self._agg(("accrued",), build)

    # -- comparisons --
    @staticmethod
    def cmp(col, c: dict, *, nullable: bool) -> ColumnElement:
        parts = []
        for op, v in c.items():
            if op == "exists":
                parts.append(col.is_not(None) if v else col.is_(None))
                continue
            if op == "eq":
                e = col == v
            elif op == "ne":
                e = col != v
            elif op == "in":
                e = col.in_(v)
            elif op == "not_in":
                e = col.not_in(v)
            elif op == "gt":
                e = col > v
            elif op == "gte":
                e = col >= v
            elif op == "lt":
                e = col < v
            elif op == "lte":
                e = col <= v
            else:  # between
                e = and_(col >= v[0], col <= v[1])
            parts.append(and_(col.is_not(None), e) if nullable else e)
        return and_(*parts)

    @staticmethod
    def day_cmp(col, c: dict, *, nullable: bool, by_date: bool = False) -> ColumnElement:
        """A date comparison on a timestamp column, by UTC day (``by_date``: on a date column)."""
        def day(d):
            d = _d(d)
            if by_date:
                return d, d + dt.timedelta(days=1)
            return _midnight(d), _midnight(d + dt.timedelta(days=1))

        parts = []
        for op, v in c.items():
            if op == "exists":
                parts.append(col.is_not(None) if v else col.is_(None))
                continue
            if op in ("eq", "ne", "in", "not_in"):
                vals = v if isinstance(v, list) else [v]
                e = or_(*[and_(col >= day(x)[0], col < day(x)[1]) for x in vals])
                if op in ("ne", "not_in"):
                    e = not_(e)
            elif op == "gt":
                e = col >= day(v)[1]
            elif op == "gte":
                e = col >= day(v)[0]
            elif op == "lt":
                e = col < day(v)[0]
            elif op == "lte":
                e = col < day(v)[1]
            else:
                e = and_(col >= day(v[0])[0], col < day(v[1])[1])
            parts.append(and_(col.is_not(None), e) if nullable else e)
        return and_(*parts)

    def age_cmp(self, c: dict) -> ColumnElement:
        b, a = members.c.birth_date, self.ctx.as_of

        def at_least(n):        # age >= n
            return b <= _years_before(a, n)

        parts = []
        for op, v in c.items():
            if op == "exists":
                parts.append(b.is_not(None) if v else b.is_(None))
                continue
            if op in ("eq", "ne", "in", "not_in"):
                vals = v if isinstance(v, list) else [v]
                e = or_(*[and_(at_least(x), not_(at_least(x + 1))) for x in vals])
                if op in ("ne", "not_in"):
                    e = not_(e)
            elif op == "gt":
                e = at_least(v + 1)
            elif op == "gte":
                e = at_least(v)
            elif op == "lt":
                e = not_(at_least(v))
            elif op == "lte":
                e = not_(at_least(v + 1))
            else:
                e = and_(at_least(v[0]), not_(at_least(v[1] + 1)))
            parts.append(and_(b.is_not(None), e))
        return and_(*parts)

    # -- the tree --
    def node(self, tree: dict) -> ColumnElement:
        (key, v), = tree.items()
        mid = members.c.id
        if key == "all":
            return and_(*[self.node(c) for c in v])
        if key == "any":
            return or_(*[self.node(c) for c in v])
        if key == "not":
            return not_(self.node(v))
        if key in PROFILE_STR:
            return self.cmp(PROFILE_STR[key], v, nullable=False)
        if key == "birth_date":
            return self.cmp(members.c.birth_date, _dates(v), nullable=True)
        if key == "registered_at":
            return self.day_cmp(members.c.registered_at, v, nullable=False)
        if key == "age":
            return self.age_cmp(v)
        if key == "custom":
            return and_(*[self.cmp(members.c.custom[name].as_string(), c, nullable=True)
                          for name, c in v.items()])
        if key == "tier":
            return self.cmp(self.balances().c.tier, v, nullable=True)
        if key == "subscribed":
            return mid.in_(select(subscriptions.c.member_id)
                           .where(subscriptions.c.channel == v, subscriptions.c.on.is_(True)))
        if key == "tag":
            vals = [v["eq"]] if "eq" in v else v["in"]
            return mid.in_(select(member_tags.c.member_id).where(member_tags.c.tag.in_(vals)))
        if key == "card_status":
            return mid.in_(select(cards.c.member_id).where(self.cmp(cards.c.status, v, nullable=False)))
        if key == "points":
            parts = []
            for name, c in v.items():
                if name == "accrued_total":
                    col = func.coalesce(self.accrued_agg().c.total, 0)
                else:
                    col = func.coalesce(getattr(self.balances().c, name), 0)
                parts.append(self.cmp(col, c, nullable=False))
            return and_(*parts)
        if key == "purchases":
            return self.purchases(v)
        if key == "messages":
            agg = self.message_agg(v)
            return self.cmp(func.coalesce(agg.c.n, 0), v["count"], nullable=False)
        if key == "segment":
            return self.segment(v)
        raise AssertionError(key)

    def purchases(self, v: dict) -> ColumnElement:
        parts = []
        if set(v) & {"count", "sum", "average", "first_date", "last_date"}:
            agg = self.purchase_agg(v)
            n, total = func.coalesce(agg.c.n, 0), func.coalesce(agg.c.total, 0)
            if "count" in v:
                parts.append(self.cmp(n, v["count"], nullable=False))
            if "sum" in v:
                parts.append(self.cmp(total, v["sum"], nullable=False))
            if "average" in v:
                parts.append(and_(n > 0, self.average(total, n, v["average"])))
            if "first_date" in v:
                parts.append(self.day_cmp(agg.c.first_at, v["first_date"], nullable=True, by_date=True))
            if "last_date" in v:
                parts.append(self.day_cmp(agg.c.last_at, v["last_date"], nullable=True, by_date=True))
        if "bought" in v:
            b = v["bought"]
            skus = sorted(self.ctx.groups.get(b["group"], frozenset())) if "group" in b else b["skus"]
            if not skus:
                parts.append(false())
            else:
                p, l = purchases, purchase_lines
                sub = (select(p.c.member_id).select_from(p.join(l, l.c.purchase_id == p.c.id))
                       .where(p.c.member_id.is_not(None), p.c.status == "confirmed", l.c.sku.in_(skus),
                              l.c.quantity > l.c.refunded_quantity,
                              *self._window_where(p.c.receipt_date, v, by_date=True)))
                parts.append(members.c.id.in_(sub))
        return and_(*parts)

    @staticmethod
    def average(total, n, c: dict) -> ColumnElement:
        """average (total / n) compared with integers, without division: total <op> value x n."""
        parts = []
        for op, v in c.items():
            if op == "eq":
                parts.append(total == n * v)
            elif op == "ne":
                parts.append(total != n * v)
            elif op == "in":
                parts.append(or_(*[total == n * x for x in v]))
            elif op == "not_in":
                parts.append(and_(*[total != n * x for x in v]))
            elif op == "gt":
                parts.append(total > n * v)
            elif op == "gte":
                parts.append(total >= n * v)
            elif op == "lt":
                parts.append(total < n * v)
            elif op == "lte":
                parts.append(total <= n * v)
            else:
                parts.append(and_(total >= n * v[0], total <= n * v[1]))
        return and_(*parts)

    def segment(self, sid: str) -> ColumnElement:
        if sid in self._stack:
            raise InvalidArgument("conditions", "segments refer to each other in a cycle: "
                                  + " -> ".join(self._stack + [sid]))
        found = self.ctx.segment_lookup(sid)
        if found is None:
            raise InvalidArgument("conditions", f"no segment {sid!r}")
        stype, tree = found
        if stype == "dynamic" and tree is not None:
            self._stack.append(sid)
            try:
                return self.node(tree)
            finally:
                self._stack.pop()
        return members.c.id.in_(select(segment_members.c.member_id).where(segment_members.c.segment_id == sid))

    def from_clause(self):
        src = members
        if self._balances:
            src = src.outerjoin(balances, balances.c.member_id == members.c.id)
        for sub in self.joins:
            src = src.outerjoin(sub, sub.c.member_id == members.c.id)
        return src


def compile_predicate(tree: dict, ctx: CompileContext):
    """``(where clause, from clause)`` for ``SELECT ... FROM <from clause> WHERE <where clause>``; the from
    clause is ``members`` LEFT JOINed to what the tree needs."""
    c = _Compiler(ctx)
    where = c.node(tree) if tree else true()
    return where, c.from_clause()


def compile_query(tree: dict, ctx: CompileContext, *columns) -> Select:
    """ONE ``SELECT members.id`` (or ``columns``) of the members the tree selects."""
    where, src = compile_predicate(tree, ctx)
    return select(*(columns or (members.c.id,))).select_from(src).where(where)


# ---- the per-member evaluator (the second opinion) ----------------------------------------------------------

def _test(value, c: dict) -> bool:
    for op, v in c.items():
        if op == "exists":
            if (value is not None) != v:
                return False
            continue
        if value is None:
            return False
        if op == "eq":
            ok = value == v
        elif op == "ne":
            ok = value != v
        elif op == "in":
            ok = value in v
        elif op == "not_in":
            ok = value not in v
        elif op == "gt":
            ok = value > v
        elif op == "gte":
            ok = value >= v
        elif op == "lt":
            ok = value < v
        elif op == "lte":
            ok = value <= v
        else:
            ok = v[0] <= value <= v[1]
        if not ok:
            return False
    return True


def _dates(c: dict) -> dict:
    out = {}
    for op, v in c.items():
        if op == "exists":
            out[op] = v
        elif isinstance(v, list):
            out[op] = [_d(x) for x in v]
        else:
            out[op] = _d(v)
    return out


def _in_window(at: dt.datetime | dt.date, spec: dict, as_of: dt.date) -> bool:
    """A timestamp (by UTC day) or a date (a purchase's receipt date) inside the window of ``spec``."""
    start, end = (_window_bounds if isinstance(at, dt.datetime) else _window_dates)(spec, as_of)
    return (start is None or at >= start) and (end is None or at < end)


def evaluate(tree: dict, facts: dict, ctx: CompileContext, segment_facts: Callable[[str], bool] | None = None,
             *, _stack=()) -> bool:
    """Whether one member (``facts`` from ``load_facts``) satisfies the tree, in plain Python."""
    (key, v), = tree.items()
    if key == "all":
        return all(evaluate(c, facts, ctx, segment_facts, _stack=_stack) for c in v)
    if key == "any":
        return any(evaluate(c, facts, ctx, segment_facts, _stack=_stack) for c in v)
    if key == "not":
        return not evaluate(v, facts, ctx, segment_facts, _stack=_stack)
    if key in PROFILE_STR or key == "tier":
        return _test(facts[key], v)
    if key == "birth_date":
        return _test(facts["birth_date"], _dates(v))
    if key == "registered_at":
        return _test(facts["registered_at"].astimezone(UTC).date(), _dates(v))
    if key == "age":
        b = facts["birth_date"]
        return _test(None if b is None else _age(b, ctx.as_of), v)
    if key == "custom":
        return all(_test(facts["custom"].get(name), c) for name, c in v.items())
    if key == "subscribed":
        return v in facts["subscriptions"]
    if key == "tag":
        vals = [v["eq"]] if "eq" in v else v["in"]
        return bool(set(vals) & facts["tags"])
    if key == "card_status":
        return any(_test(s, v) for s in facts["card_statuses"])
    if key == "points":
        return all(_test(facts[name], c) for name, c in v.items())
    if key == "purchases":
        rows = [p for p in facts["purchases"] if p["status"] == "confirmed" and _in_window(p["at"], v, ctx.as_of)]
        n, total = len(rows), sum(p["net"] for p in rows)
        if "count" in v and not _test(n, v["count"]):
            return False
        if "sum" in v and not _test(total, v["sum"]):
            return False
        if "average" in v:
            avg = Fraction(total, n) if n else None
            if avg is None or not _test(avg, v["average"]):
                return False
        days = sorted(p["at"] for p in rows)        # receipt dates
        if "first_date" in v and not _test(days[0] if days else None, _dates(v["first_date"])):
            return False
        if "last_date" in v and not _test(days[-1] if days else None, _dates(v["last_date"])):
            return False
        if "bought" in v:
            b = v["bought"]
            skus = set(ctx.groups.get(b["group"], ())) if "group" in b else set(b["skus"])
            if not any(p["skus"] & skus for p in rows):
                return False
        return True
    if key == "messages":
        n = sum(1 for m in facts["messages"] if m["kind"] == v["kind"]
                and ("channel" not in v or m["channel"] == v["channel"]) and _in_window(m["at"], v, ctx.as_of))
        return _test(n, v["count"])
    if key == "segment":
        found = ctx.segment_lookup(v)
        if found is not None and found[0] == "dynamic" and found[1] is not None:
            if v in _stack:
                raise InvalidArgument("conditions", f"segments refer to each other in a cycle at {v!r}")
            return evaluate(found[1], facts, ctx, segment_facts, _stack=_stack + (v,))
        return v in facts["segments"]
    raise AssertionError(key)


def load_facts(conn, member_ids=None) -> dict[int, dict]:
    """Everything ``evaluate`` reads, per member, with plain per-table queries (no aggregation in SQL): the
    independent side of the SQL-vs-Python agreement tests, and a way to explain one member's membership."""
    sel = select(members.c.id, members.c.gender, members.c.city, members.c.source, members.c.birth_date,
                 members.c.registered_at, members.c.custom)
    if member_ids is not None:
        sel = sel.where(members.c.id.in_(list(member_ids)))
    facts: dict[int, dict] = {}
    for r in conn.execute(sel):
        facts[r.id] = {"gender": r.gender, "city": r.city, "source": r.source, "birth_date": r.birth_date,
                       "registered_at": r.registered_at,
                       "custom": {k: (v if isinstance(v, str) else None) for k, v in (r.custom or {}).items()},
                       "subscriptions": set(), "tags": set(), "card_statuses": [], "tier": None, "active": 0,
                       "pending": 0, "accrued_total": 0, "purchases": [], "messages": [], "segments": set()}
    ids = set(facts)
    for r in conn.execute(select(subscriptions.c.member_id, subscriptions.c.channel, subscriptions.c.on)):
        if r.member_id in ids and r.on:
            facts[r.member_id]["subscriptions"].add(r.channel)
    for r in conn.execute(select(member_tags.c.member_id, member_tags.c.tag)):
        if r.member_id in ids:
            facts[r.member_id]["tags"].add(r.tag)
    for r in conn.execute(select(cards.c.member_id, cards.c.status)):
        if r.member_id in ids:
            facts[r.member_id]["card_statuses"].append(r.status)
    for r in conn.execute(select(balances.c.member_id, balances.c.tier, balances.c.active, balances.c.pending)):
        if r.member_id in ids:
            facts[r.member_id].update(tier=r.tier, active=r.active, pending=r.pending)
    for r in conn.execute(select(ledger.c.member_id, ledger.c.kind, ledger.c.points)):
        if r.member_id in ids and r.kind == "accrual":
            facts[r.member_id]["accrued_total"] += r.points
    by_purchase = {}
    for r in conn.execute(select(purchases.c.id, purchases.c.member_id, purchases.c.status, purchases.c.payable,
                                 purchases.c.refunded_payable, purchases.c.receipt_date)):
        if r.member_id in ids:
            p = {"status": r.status, "net": r.payable - r.refunded_payable, "at": r.receipt_date, "skus": set()}
            facts[r.member_id]["purchases"].append(p)
            by_purchase[r.id] = p
    for r in conn.execute(select(purchase_lines.c.purchase_id, purchase_lines.c.sku, purchase_lines.c.quantity,
                                 purchase_lines.c.refunded_quantity)):
        p = by_purchase.get(r.purchase_id)
        if p is not None and r.quantity > r.refunded_quantity:
            p["skus"].add(r.sku)
    for r in conn.execute(select(message_events.c.member_id, message_events.c.channel, message_events.c.kind,
                                 message_events.c.at)):
        if r.member_id in ids:
            facts[r.member_id]["messages"].append({"channel": r.channel, "kind": r.kind, "at": r.at})
    for r in conn.execute(select(segment_members.c.segment_id, segment_members.c.member_id)):
        if r.member_id in ids:
            facts[r.member_id]["segments"].add(r.segment_id)
    return facts
