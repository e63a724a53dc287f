"""Segment conditions compiled into ONE SQL query (SQLAlchemy Core, the same text on PostgreSQL and SQLite):
what a validated tree (``conditions.validate``) selects, as a where clause over ``members`` and the joins it
needs.

Compilation: balances are LEFT JOINed once; each purchase / message / ledger aggregate is a grouped
subquery LEFT JOINed on ``member_id`` (one per distinct window), so a single pass over the big tables serves
the whole tree; set leaves (subscriptions, tags, cards, bought, stored segments) are ``member_id IN
(SELECT ...)``. No Python loop over members anywhere.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import and_, false, func, not_, or_, select, true
from sqlalchemy.sql import ColumnElement, Select

from loyalty.server.errors import InvalidArgument
from loyalty.server.models import balances, cards, ledger, members, purchase_lines, purchases, subscriptions

from .models import member_tags, message_events, segment_members
from .semantics import PROFILE_STR, _d, _dates, _midnight, _window_bounds, _window_dates, _years_before

__all__ = ["CompileContext", "compile_predicate", "compile_query"]


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
