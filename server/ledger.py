"""The points ledger: append-only entries, the lots they create or consume, and the balances beside them.

Every change of a member's points goes through here inside the caller's transaction, after the caller has
locked the member's ``balances`` row: one ledger entry (with its unique key, so a retry cannot write it
twice), the lots it touches, and the balance update. Invariants, proved by ``check``:

- ``balances.active = sum(ledger.active_delta)`` and ``balances.pending = sum(ledger.pending_delta)``;
- ``balances.pending = sum(remaining)`` of pending lots and ``max(balances.active, 0) = sum(remaining)`` of
  active lots (``active`` is below zero only while a refund's take-back exceeds what the member has: that
  debt is paid off by the next points that become active, see ``settle_debt``).

``liability`` reports the outstanding points.
"""
from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, case, func, insert, literal, select, update

from .dialects import dialect_of
from .models import balances, ledger, point_lots, purchase_lines, purchases

if TYPE_CHECKING:
    from .db import Database
    from .runtime import Runtime

__all__ = ["WRITE_OFF_ORDER", "write_off_order_sql", "add_entry", "new_lot", "consume_active", "take_back", "settle_debt", "move_balance", "check",
           "liability"]


_insert_entry = insert(ledger).returning(ledger.c.id)
_insert_lot = insert(point_lots)


def add_entry(conn, *, key: str, member_id: int, kind: str, active_delta: int = 0, pending_delta: int = 0,
              now: dt.datetime, purchase_id: int | None = None, refund_id: str | None = None,
              operation_id: str | None = None, reason: str = "") -> int:
    """Append one entry; returns its id."""
    return conn.execute(_insert_entry, {
        "key": key, "member_id": member_id, "kind": kind, "points": active_delta + pending_delta,
        "active_delta": active_delta, "pending_delta": pending_delta, "purchase_id": purchase_id,
        "refund_id": refund_id, "operation_id": operation_id, "reason": reason, "created_at": now}).scalar_one()


def new_lot(conn, *, member_id: int, points: int, entry_id: int, state: str, activates_at, expires_at,
            purchase_id: int | None = None) -> None:
    conn.execute(_insert_lot, {
        "member_id": member_id, "points": points, "remaining": points, "state": state,
        "activates_at": activates_at, "expires_at": expires_at, "entry_id": entry_id, "purchase_id": purchase_id,
        "expiring_notified": False})


_set_remaining = (update(point_lots).where(point_lots.c.id == bindparam("lot_id"))
                  .values(remaining=bindparam("new_remaining")))


def _take(conn, rows, points: int) -> tuple[int, list[tuple[str, int]]]:
    """Take up to ``points`` from ``rows`` (id, remaining, state) in order; returns what was left untaken and
    (state, taken) per lot touched."""
    updates, taken = [], []
    for lot_id, remaining, state in rows:
        if points <= 0:
            break
        k = min(points, remaining)
        if k <= 0:
            continue
        points -= k
        updates.append({"lot_id": lot_id, "new_remaining": remaining - k})
        taken.append((state, k))
    if updates:
        conn.execute(_set_remaining, updates)
    return points, taken


# The write-off order (SPEC 6), the one rule every writer follows: the earliest-expiring lot first, never-expiring
# lots last, then the oldest. Row by row here; the set-based PostgreSQL writes of a confirm
# (``processing/confirm_sql.py``) walk the lots in the same order, given as SQL text by ``write_off_order_sql``.
WRITE_OFF_ORDER = (point_lots.c.expires_at.asc().nulls_last(), point_lots.c.id.asc())


def write_off_order_sql() -> str:
    """``WRITE_OFF_ORDER`` as PostgreSQL's ORDER BY text (columns qualified by ``point_lots``)."""
    from sqlalchemy.dialects import postgresql
    return ", ".join(str(c.compile(dialect=postgresql.dialect())) for c in WRITE_OFF_ORDER)


_active_lots = (select(point_lots.c.id, point_lots.c.remaining, point_lots.c.state)
                .where(point_lots.c.member_id == bindparam("member_id"), point_lots.c.state == "active",
                       point_lots.c.remaining > 0)
                .order_by(*WRITE_OFF_ORDER))


def consume_active(conn, member_id: int, points: int) -> int:
    """Consume ``points`` from the active lots in ``WRITE_OFF_ORDER``; returns what could not be covered (0 when
    the balance was checked first)."""
    if points <= 0:
        return 0
    left, _ = _take(conn, conn.execute(_active_lots, {"member_id": member_id}).all(), points)
    return left


def take_back(conn, member_id: int, points: int, purchase_id: int | None) -> tuple[int, int]:
    """Take back accrued points: from the purchase's own lot first, then other pending lots, then active
    lots (earliest-expiring first). Returns ``(from_pending, from_active)``; what no lot covers is taken
    from the active balance as a debt (counted in ``from_active``)."""
    if points <= 0:
        return 0, 0
    own_first = case((point_lots.c.purchase_id == purchase_id, 0), else_=1) if purchase_id else literal(1)
    pending_first = case((point_lots.c.state == "pending", 0), else_=1)
    rows = conn.execute(
        select(point_lots.c.id, point_lots.c.remaining, point_lots.c.state)
        .where(point_lots.c.member_id == member_id, point_lots.c.state.in_(("pending", "active")),
               point_lots.c.remaining > 0)
        .order_by(own_first, pending_first, *WRITE_OFF_ORDER)).all()
    left, taken = _take(conn, rows, points)
    from_pending = sum(k for state, k in taken if state == "pending")
    return from_pending, points - from_pending


def settle_debt(conn, member_id: int, active_after: int) -> None:
    """When a member in debt (active below zero) receives active points, the debt eats them first: consume
    from the active lots whatever they hold above ``max(active_after, 0)``."""
    held = conn.execute(select(func.coalesce(func.sum(point_lots.c.remaining), 0))
                        .where(point_lots.c.member_id == member_id, point_lots.c.state == "active")).scalar()
    excess = held - max(active_after, 0)
    if excess > 0:
        consume_active(conn, member_id, excess)


def _move_balance_stmt(ops):
    greatest = getattr(func, ops.greatest.lower())
    b = balances.c
    return (update(balances).where(b.member_id == bindparam("b_member_id"))
            .values(active=b.active + bindparam("b_active"), pending=b.pending + bindparam("b_pending"),
                    purchases_sum=greatest(b.purchases_sum + bindparam("b_sum"), 0),
                    tier=func.coalesce(bindparam("b_tier", type_=balances.c.tier.type), b.tier),
                    updated_at=bindparam("b_now", type_=balances.c.updated_at.type)))


_move_balance: dict = {}    # dialect name -> the statement, built once


def move_balance(conn, member_id: int, *, active: int = 0, pending: int = 0, purchases_sum: int = 0,
                 tier: str | None = None, now: dt.datetime) -> None:
    """Add the deltas to the member's balances (``purchases_sum`` never below zero); ``tier`` when given."""
    ops = dialect_of(conn)
    stmt = _move_balance.get(ops.name)
    if stmt is None:
        stmt = _move_balance[ops.name] = _move_balance_stmt(ops)
    conn.execute(stmt, {"b_member_id": member_id, "b_active": active, "b_pending": pending,
                        "b_sum": purchases_sum, "b_tier": tier, "b_now": now})


# ---- proofs and reports -------------------------------------------------------------------------------------

def check(db: Database) -> list[str]:
    """Every discrepancy between the ledger, the lots and the balances (and purchase lines without their
    purchase), one sentence each; empty when they agree. Set-based: a few grouped queries, whatever the number
    of members."""
    problems: list[str] = []
    with db.read() as conn:
        sums = (select(ledger.c.member_id, func.sum(ledger.c.active_delta).label("a"),
                       func.sum(ledger.c.pending_delta).label("p"))
                .group_by(ledger.c.member_id).subquery())
        rows = conn.execute(
            select(balances.c.member_id, balances.c.active, balances.c.pending,
                   func.coalesce(sums.c.a, 0), func.coalesce(sums.c.p, 0))
            .select_from(balances.outerjoin(sums, sums.c.member_id == balances.c.member_id))
            .where((balances.c.active != func.coalesce(sums.c.a, 0))
                   | (balances.c.pending != func.coalesce(sums.c.p, 0)))).all()
        for member_id, active, pending, la, lp in rows:
            problems.append(f"member {member_id}: balance active {active} / pending {pending}, "
                            f"ledger says {la} / {lp}")
        lots = (select(point_lots.c.member_id,
                       func.sum(case((point_lots.c.state == "active", point_lots.c.remaining), else_=0)).label("a"),
                       func.sum(case((point_lots.c.state == "pending", point_lots.c.remaining), else_=0)).label("p"))
                .group_by(point_lots.c.member_id).subquery())
        held_a, held_p = func.coalesce(lots.c.a, 0), func.coalesce(lots.c.p, 0)
        rows = conn.execute(
            select(balances.c.member_id, balances.c.active, balances.c.pending, held_a, held_p)
            .select_from(balances.outerjoin(lots, lots.c.member_id == balances.c.member_id))
            .where((case((balances.c.active > 0, balances.c.active), else_=0) != held_a)
                   | (balances.c.pending != held_p))).all()
        for member_id, active, pending, la, lp in rows:
            problems.append(f"member {member_id}: balance active {active} / pending {pending}, "
                            f"lots hold {la} / {lp}")
        orphans = conn.execute(
            select(ledger.c.member_id).where(ledger.c.member_id.not_in(select(balances.c.member_id)))
            .distinct()).scalars().all()
        for member_id in orphans:
            problems.append(f"member {member_id}: ledger entries without a balance row")
        # NOT EXISTS: an anti-join at any size (NOT IN over a large id list falls back to a rescan per line)
        lost = conn.execute(select(func.count()).select_from(purchase_lines)
                            .where(~select(purchases.c.id).where(purchases.c.id == purchase_lines.c.purchase_id)
                                   .exists())).scalar()
        if lost:
            problems.append(f"{lost} purchase lines without their purchase")
        bad = conn.execute(select(func.count()).select_from(balances).where(balances.c.pending < 0)).scalar()
        if bad:
            problems.append(f"{bad} balances with negative pending points")
    return problems


def liability(runtime: Runtime, *, expiring_within_days: int = 30) -> dict:
    """Outstanding points: active, pending, their money value at the current program's ``point_value``,
    members holding points, debt (refund take-backs beyond the balance), points expiring soon."""
    now = runtime.clock()
    with runtime.db.read() as conn:
        active, pending, holders, debt = conn.execute(select(
            func.coalesce(func.sum(case((balances.c.active > 0, balances.c.active), else_=0)), 0),
            func.coalesce(func.sum(balances.c.pending), 0),
            func.count().filter((balances.c.active > 0) | (balances.c.pending > 0)),
            func.coalesce(func.sum(case((balances.c.active < 0, -balances.c.active), else_=0)), 0),
        )).one()
        expiring = conn.execute(
            select(func.coalesce(func.sum(point_lots.c.remaining), 0))
            .where(point_lots.c.state == "active", point_lots.c.remaining > 0,
                   point_lots.c.expires_at <= now + dt.timedelta(days=expiring_within_days))).scalar()
    try:
        point_value = runtime.programs.current().program.point_value
    except Exception:  # noqa: BLE001 - no program yet: report points only
        point_value = None
    out = {"active_points": int(active), "pending_points": int(pending),
           "outstanding_points": int(active) + int(pending), "members_with_points": int(holders),
           "debt_points": int(debt), "expiring_points": int(expiring),
           "expiring_within_days": expiring_within_days, "at": now.isoformat()}
    if point_value is not None:
        out["point_value"] = point_value
        out["active_value"] = int(active) * point_value
        out["outstanding_value"] = (int(active) + int(pending)) * point_value
    return out
