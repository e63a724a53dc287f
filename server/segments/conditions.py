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


The tree is compiled into one SQL query by ``compiler`` and read member by member by ``evaluator`` (the
second opinion); both follow ``semantics``. This module validates trees (with field paths) and names the
segments they refer to; it also serves the compiler's and the evaluator's entry points, its public surface.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any, Callable

from loyalty.server.errors import InvalidArgument

from .compiler import CompileContext, compile_predicate, compile_query
from .evaluator import evaluate, load_facts
from .models import MESSAGE_KINDS

__all__ = ["validate", "compile_query", "compile_predicate", "evaluate", "load_facts", "CompileContext",
           "segment_refs", "LEAVES"]

STR_OPS = ("eq", "ne", "in", "not_in")
ORDER_OPS = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between")
MAX_DEPTH = 32
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")

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
