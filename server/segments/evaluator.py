"""The per-member evaluator of segment conditions: the plain-Python second opinion on what the SQL compiler
(``compiler``) selects, over facts read per table without aggregation in SQL (``load_facts``); used by the
SQL-vs-Python agreement tests and to explain one member's membership."""
from __future__ import annotations

import datetime as dt
from fractions import Fraction
from typing import Callable

from sqlalchemy import select

from loyalty.server.errors import InvalidArgument
from loyalty.server.models import balances, cards, ledger, members, purchase_lines, purchases, subscriptions

from .compiler import CompileContext
from .models import member_tags, message_events, segment_members
from .semantics import PROFILE_STR, UTC, _age, _dates, _window_bounds, _window_dates

__all__ = ["evaluate", "load_facts"]

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
