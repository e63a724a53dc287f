"""A confirm's rows written row by row through ``ledger`` (SQLite; on PostgreSQL the rare confirms the set-based
writer of ``confirm_sql`` hands back: a card and a phone to compare, a member in debt, a group rolled back)."""
from __future__ import annotations

from sqlalchemy import bindparam, insert, select, update

from .. import ledger
from ..members import increment_usage
from ..models import events, promotion_budgets, purchase_lines, purchases
from .effects import PurchaseRows

__all__ = ["SELECT_PURCHASE", "INSERT_PURCHASE", "write_rows"]

SELECT_PURCHASE = (select(purchases.c.id, purchases.c.request_hash, purchases.c.answer, purchases.c.member_id)
                   .where(purchases.c.store == bindparam("store"), purchases.c.terminal == bindparam("terminal"),
                          purchases.c.number == bindparam("number")))
INSERT_PURCHASE = insert(purchases).returning(purchases.c.id)
_SPEND_BUDGET = (update(promotion_budgets).where(promotion_budgets.c.promotion == bindparam("b_promotion"))
                 .values(spent=promotion_budgets.c.spent + bindparam("b_spent")))


def write_rows(conn, rows: PurchaseRows) -> None:
    """Every row of ``rows`` but the purchase's own (the caller inserted it for its id, ``INSERT_PURCHASE``), in
    the caller's transaction, which holds the member's balance lock and the budgets' (``Reads.budgets``)."""
    pid, member_id, now = rows.purchase_id, rows.member_id, rows.now
    conn.execute(insert(purchase_lines), [{"purchase_id": pid, **line} for line in rows.lines])
    if member_id is not None:
        ledger.consume_active(conn, member_id, rows.redeemed)
        accrual = None
        for e in rows.entries:
            entry_id = ledger.add_entry(conn, key=e.key, member_id=member_id, kind=e.kind,
                                        active_delta=e.active_delta, pending_delta=e.pending_delta, now=now,
                                        purchase_id=pid)
            if e.kind == "accrual":
                accrual = entry_id
        if rows.lot is not None:
            ledger.new_lot(conn, member_id=member_id, points=rows.lot.points, entry_id=accrual, state=rows.lot.state,
                           activates_at=rows.lot.activates_at, expires_at=rows.lot.expires_at, purchase_id=pid)
        ledger.move_balance(conn, member_id, active=rows.active_delta, pending=rows.pending_delta,
                            purchases_sum=rows.metric, tier=rows.tier, now=now)
        if rows.settle:
            ledger.settle_debt(conn, member_id, rows.active_after)
        increment_usage(conn, member_id, rows.usage)
    for promotion, spent in rows.budgets:
        conn.execute(_SPEND_BUDGET, {"b_promotion": promotion, "b_spent": spent})
    conn.execute(insert(events), [{"kind": kind, "key": key, "member_id": member_id, "payload": payload,
                                   "created_at": now, "processed_at": None} for kind, key, payload in rows.events])
