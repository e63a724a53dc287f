"""The periodic job: activate due pending lots, expire lots past ``expires_at``, announce points that expire
soon (``points_expiring``, once per lot) and recalculate tiers over the metric window (downgrades happen
only here; upgrades happen at confirm).

Work is set-based SQL (``INSERT ... SELECT`` into the ledger, one ``UPDATE`` of the balances with a grouped
subquery, one ``UPDATE`` of the lots) in batches of members; each batch is one transaction that first locks
its members' balance rows, so a confirm or refund of the same member waits rather than interleaves. Running
it twice, or in two processes at once, is harmless: a lot changes state once, and ledger keys are unique.

A batch that changed balances or tiers also bumps the membership version (``bump_membership_version``, last
in its transaction) and the pass announces it: every server process stops using the member contexts it had
cached from before, as a recalculation's would (the server processes' caches are not this process's).
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import String, and_, case, cast, func, insert, literal, select, update

from . import ledger
from .db import Database
from .dialects import dialect_of
from .errors import FailedPrecondition
from .members import tier_window_start
from .models import UTCDateTime, balances, events, point_lots, purchases
from .segments.service import SegmentService, bump_membership_version
from .models import ledger as ledger_entries
from .runtime import Runtime

__all__ = ["run_once", "EXPIRING_NOTICE_DAYS"]

EXPIRING_NOTICE_DAYS = 7
BATCH = 2000


def run_once(runtime: Runtime, now: dt.datetime | None = None, *, expiring_days: int = EXPIRING_NOTICE_DAYS,
             batch: int = BATCH) -> dict:
    """One pass of every periodic task at ``now`` (default: the runtime's clock). Returns counts:
    ``activated_lots``, ``activated_points``, ``expired_lots``, ``expired_points``, ``expiring_notices``,
    ``tier_changes``, ``tier_downgrades``, ``segment_runs`` (updatable segments recalculated on schedule)."""
    now = now or runtime.clock()
    counts = {"activated_lots": 0, "activated_points": 0, "expired_lots": 0, "expired_points": 0,
              "expiring_notices": 0, "tier_changes": 0, "tier_downgrades": 0}
    _move_lots(runtime.db, now, batch, counts, activate=True)
    _move_lots(runtime.db, now, batch, counts, activate=False)
    _announce_expiring(runtime.db, now, expiring_days, batch, counts)
    retiered = _recalculate_tiers(runtime, now, batch, counts)
    counts["segment_runs"] = len(SegmentService(runtime.db, clock=runtime.clock).run_due(now))
    runtime.contexts.clear()
    if retiered or counts["activated_lots"] or counts["expired_lots"] or counts["segment_runs"]:
        runtime.audience_index.announce()
    return counts


def _lock_members(conn, member_ids) -> None:
    dialect_of(conn).lock_rows(conn, select(balances.c.member_id).where(balances.c.member_id.in_(member_ids))
                               .order_by(balances.c.member_id))


def _move_lots(db: Database, now: dt.datetime, batch: int, counts: dict, *, activate: bool) -> None:
    """Activation (pending -> active) or expiry (active -> expired), one batch of members at a time."""
    lots = point_lots.c
    if activate:
        due = and_(lots.state == "pending", lots.activates_at <= now)
        kind, prefix = "activation", "activated"
    else:
        due = and_(lots.state == "active", lots.expires_at.is_not(None), lots.expires_at <= now)
        kind, prefix = "expiry", "expired"
    while True:
        def step(conn):
            ids = conn.execute(select(lots.member_id).where(due).distinct().limit(batch)).scalars().all()
            if not ids:
                return False
            _lock_members(conn, ids)
            cond = and_(due, lots.member_id.in_(ids))
            n_lots, n_points = conn.execute(select(func.count(), func.coalesce(func.sum(lots.remaining), 0))
                                            .where(cond)).one()
            key = literal("lot:", String) + cast(lots.id, String) + literal(f":{kind}", String)
            conn.execute(insert(ledger_entries).from_select(
                ["key", "member_id", "kind", "points", "active_delta", "pending_delta", "purchase_id", "reason",
                 "created_at"],
                select(key, lots.member_id, literal(kind, String),
                       -lots.remaining if not activate else literal(0),
                       lots.remaining if activate else -lots.remaining,
                       -lots.remaining if activate else literal(0),
                       lots.purchase_id, literal("", String), literal(now, UTCDateTime()))
                .where(cond, lots.remaining > 0)))
            moved = (select(func.coalesce(func.sum(lots.remaining), 0))
                     .where(cond, lots.member_id == balances.c.member_id).scalar_subquery())
            values = {"active": balances.c.active + moved, "pending": balances.c.pending - moved} if activate \
                else {"active": balances.c.active - moved}
            conn.execute(update(balances).where(balances.c.member_id.in_(ids)).values(**values, updated_at=now))
            if activate:
                conn.execute(update(point_lots).where(cond).values(state="active"))
                # Members in debt (a refund took back more than they had): new active points pay it first.
                held = (select(func.coalesce(func.sum(lots.remaining), 0))
                        .where(lots.member_id == balances.c.member_id, lots.state == "active").scalar_subquery())
                for member_id, active in conn.execute(
                        select(balances.c.member_id, balances.c.active)
                        .where(balances.c.member_id.in_(ids), held > case((balances.c.active > 0, balances.c.active),
                                                                          else_=0))).all():
                    ledger.settle_debt(conn, member_id, active)
            else:
                conn.execute(update(point_lots).where(cond).values(state="expired", remaining=0))
            bump_membership_version(conn, now)
            counts[f"{prefix}_lots"] += n_lots
            counts[f"{prefix}_points"] += int(n_points)
            return len(ids) == batch
        if not db.run_write(step):
            return


def _announce_expiring(db: Database, now: dt.datetime, days: int, batch: int, counts: dict) -> None:
    lots = point_lots.c
    soon = and_(lots.state == "active", lots.remaining > 0, lots.expiring_notified.is_(False),
                lots.expires_at.is_not(None), lots.expires_at > now,
                lots.expires_at <= now + dt.timedelta(days=days))
    while True:
        def step(conn):
            rows = conn.execute(select(lots.id, lots.member_id, lots.remaining, lots.expires_at).where(soon)
                                .order_by(lots.id).limit(batch)).all()
            if not rows:
                return False
            conn.execute(insert(events), [
                {"kind": "points_expiring", "key": f"points_expiring:{r.id}", "member_id": r.member_id,
                 "payload": {"lot_id": r.id, "points": r.remaining, "expires_at": r.expires_at.isoformat()},
                 "created_at": now} for r in rows])
            conn.execute(update(point_lots).where(lots.id.in_([r.id for r in rows])).values(expiring_notified=True))
            counts["expiring_notices"] += len(rows)
            return len(rows) == batch
        if not db.run_write(step):
            return


def _recalculate_tiers(runtime: Runtime, now: dt.datetime, batch: int, counts: dict) -> int:
    """Returns how many members' tier or metric changed."""
    try:
        program = runtime.programs.current().program
    except FailedPrecondition:
        return 0
    levels = program.tiers.levels
    rank = {lvl.name: i for i, lvl in enumerate(levels)}
    start = tier_window_start(program, now)
    if start is not None:
        # SPEC 6: receipts count by their local date, whenever they were confirmed
        metric = (select(func.coalesce(func.sum(purchases.c.payable - purchases.c.refunded_payable), 0))
                  .where(purchases.c.member_id == balances.c.member_id, purchases.c.receipt_date >= start)
                  .scalar_subquery())
    else:
        metric = balances.c.purchases_sum
    if len(levels) > 1:
        tier = case(*[(metric >= lvl.threshold, lvl.name) for lvl in reversed(levels[1:])], else_=levels[0].name)
    else:                   # one level: everybody holds it (a CASE needs at least one WHEN)
        tier = literal(levels[0].name, String)
    last, total = 0, 0
    while True:
        def step(conn, last=last):
            """(the last member id of a full batch, else None; how many rows changed)"""
            ids = conn.execute(select(balances.c.member_id).where(balances.c.member_id > last)
                               .order_by(balances.c.member_id).limit(batch)).scalars().all()
            if not ids:
                return None, 0
            _lock_members(conn, ids)
            changed = conn.execute(
                select(balances.c.member_id, balances.c.tier, tier.label("new_tier"), metric.label("new_sum"))
                .where(balances.c.member_id.in_(ids),
                       (balances.c.tier != tier) | (balances.c.purchases_sum != metric))).all()
            if changed:
                conn.execute(update(balances).where(balances.c.member_id.in_([r.member_id for r in changed]))
                             .values(purchases_sum=metric, tier=tier, updated_at=now))
                moves = [r for r in changed if r.tier != r.new_tier]
                if moves:
                    conn.execute(insert(events), [
                        {"kind": "tier_changed", "key": None, "member_id": r.member_id, "created_at": now,
                         "payload": {"tier_before": r.tier, "tier": r.new_tier, "purchases_sum": int(r.new_sum),
                                     "reason": "recalculation"}} for r in moves])
                    counts["tier_changes"] += len(moves)
                    counts["tier_downgrades"] += sum(
                        1 for r in moves if rank.get(r.new_tier, 0) < rank.get(r.tier, len(levels)))
                bump_membership_version(conn, now)
            return ids[-1] if len(ids) == batch else None, len(changed)
        last, n = runtime.db.run_write(step)
        total += n
        if last is None:
            return total
