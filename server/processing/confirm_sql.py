"""ConfirmPurchase on PostgreSQL, set-based: the raw statements that read what a group of confirms needs (the
stored purchases under their keys, the ids of their new rows, their members locked, contexts, usage and
budgets) and the one statement that writes every row of the group (``_PGB_WRITE``), with ``SetWrite`` gathering
the rows ``effects.purchase_rows`` decided into its parameters. A confirm alone is a group of one."""
from __future__ import annotations

from ..db import dumps
from ..ledger import write_off_order_sql
from .effects import PurchaseRows

# The columns a confirm writes, in the order both write statements (one confirm, a whole batch) give them.
_PURCHASE_COLUMNS = ("id, store, terminal, number, member_id, card, program_version, request_hash, answer, "
                     "receipt_at, receipt_time, receipt_date, amount, discount, payable, redeemed_points, "
                     "redeemed_amount, accrued_points, "
                     "refunded_payable, refunded_amount, returned_points, taken_back_points, status, created_at")
_LINE_COLUMNS = ("purchase_id, line, sku, quantity, amount, payable, redeemed, points, refunded_quantity, "
                 "refunded_payable, refunded_redeemed, refunded_points")
_LEDGER_COLUMNS = ("id, key, member_id, kind, points, active_delta, pending_delta, purchase_id, refund_id, "
                   "operation_id, reason, created_at")
_LOT_COLUMNS = ("member_id, points, remaining, state, activates_at, expires_at, entry_id, purchase_id, "
                "expiring_notified")

# The first round trip of a group (``Confirm._set_based_tx``) in four statements, whatever its size.
# Stored purchases under the batch's keys (parameters: stores, terminals, numbers):
_PGB_EXISTING = """SELECT p.store, p.terminal, p.number, p.id, p.request_hash, p.answer::text, p.member_id
FROM purchases AS p JOIN unnest(%s::varchar[], %s::varchar[], %s::varchar[]) AS k(store, terminal, number)
    ON p.store = k.store AND p.terminal = k.terminal AND p.number = k.number"""
# A purchase id and two ledger entry ids per confirm (parameter: how many):
_PGB_IDS = """SELECT nextval('purchases_id_seq'), nextval('ledger_id_seq'), nextval('ledger_id_seq')
FROM generate_series(1, %s)"""
# The members of every reference (parameters: cards, phones), locked in member id order: the sort runs below the
# row locking, so any two transactions lock their common members in the same order and cannot deadlock on them.
_PGB_MEMBERS = """SELECT member_id FROM cards WHERE number = ANY(%s::varchar[])
    UNION SELECT id FROM members WHERE phone = ANY(%s::varchar[])"""
_PGB_LOCK = f"""SELECT member_id FROM balances WHERE member_id IN ({_PGB_MEMBERS})
ORDER BY member_id FOR UPDATE"""
# Read after the lock was granted (a statement of its own: its snapshot sees what the lock's previous holder
# committed): each reference's card, status and its member's balances (parameters: cards, phones).
_PGB_CONTEXT = """SELECT 'card', c.number, b.member_id, c.number, c.status, b.tier, b.active, b.pending,
    b.purchases_sum
FROM cards AS c JOIN balances AS b ON b.member_id = c.member_id WHERE c.number = ANY(%s::varchar[])
UNION ALL
SELECT * FROM (SELECT DISTINCT ON (m.phone) 'phone', m.phone, b.member_id, c.number, c.status, b.tier, b.active,
        b.pending, b.purchases_sum
    FROM cards AS c JOIN balances AS b ON b.member_id = c.member_id JOIN members AS m ON m.id = c.member_id
    WHERE m.phone = ANY(%s::varchar[]) ORDER BY m.phone, c.status = 'active' DESC, c.id DESC) AS by_phone"""
# Promotion usage of those members (parameters: cards, phones, limited promotion ids).
_PGB_USAGE = f"""SELECT member_id, promotion, period_key, uses FROM promotion_usage
WHERE member_id IN ({_PGB_MEMBERS}) AND promotion = ANY(%s::varchar[])"""
# What the program's budgets have spent, read without a lock (parameter: the budgeted promotion ids): a batch
# decides on these figures and, before writing, checks that each budget it used still had room (below).
_PGB_BUDGETS = "SELECT promotion, spent FROM promotion_budgets WHERE promotion = ANY(%s::varchar[])"
# Spend a batch's total on one budget if the decisions still hold: the last confirm of the batch that applied
# the promotion saw ``spent_then + before`` (``before``: what the batch's earlier confirms spent) below the limit;
# it still holds when ``spent_now + before`` is. Spent only grows between the read and this (a refund giving
# some back only widens the room), so no row returned means a decision was made on a figure that has moved
# (parameters: total, promotion, before, limit). The row stays locked until the batch's COMMIT.
_PGB_SPEND_BUDGET = """UPDATE promotion_budgets SET spent = spent + %s::bigint
WHERE promotion = %s AND spent + %s::bigint < %s::bigint RETURNING promotion"""


# Every row of a group of confirms in ONE statement (``SetWrite`` builds the parameters from their
# ``PurchaseRows``): JSON arrays of rows named by their columns. Data-modifying CTEs see the same snapshot and never
# the same row twice, so rows of one member are summed where the statement touches a row once: the balance
# (deltas and metric added; the last upgrade's tier), the promotion usage (uses counted) and the points written off
# (one walk over the member's active lots in the ledger's write-off order for the group's total: the same lots, in
# the same order, as the confirms one after another, as long as no confirm of the group writes off points an
# earlier one of it made active; ``SetWrite.exact`` says so). The lots consumed are older than the lots added.
_PGB_WRITE = f"""\
WITH
purchase AS (
    INSERT INTO purchases ({_PURCHASE_COLUMNS})
    SELECT t.id, t.store, t.terminal, t.number, t.member_id, t.card, t.program_version, t.request_hash, t.answer,
        t.receipt_at, t.receipt_time, t.receipt_date, t.amount, t.discount, t.payable, t.redeemed_points,
        t.redeemed_amount, t.accrued_points, 0, 0, 0, 0, 'confirmed', t.created_at
    FROM json_to_recordset(%(purchases)s::json) AS t(id bigint, store varchar, terminal varchar, number varchar,
        member_id bigint, card varchar, program_version bigint, request_hash varchar, answer json,
        receipt_at varchar, receipt_time timestamptz, receipt_date date, amount bigint, discount bigint,
        payable bigint, redeemed_points bigint, redeemed_amount bigint, accrued_points bigint,
        created_at timestamptz)),
lines AS (
    INSERT INTO purchase_lines ({_LINE_COLUMNS})
    SELECT t.purchase_id, t.line, t.sku, t.quantity, t.amount, t.payable, t.redeemed, t.points, 0, 0, 0, 0
    FROM json_to_recordset(%(lines)s::json) AS t(purchase_id bigint, line int, sku varchar, quantity bigint,
        amount bigint, payable bigint, redeemed bigint, points bigint)),
held AS (
    SELECT point_lots.id, point_lots.remaining, c.redeemed,
        sum(point_lots.remaining) OVER (PARTITION BY point_lots.member_id ORDER BY {write_off_order_sql()})
            - point_lots.remaining AS before
    FROM point_lots JOIN json_to_recordset(%(consumed)s::json) AS c(member_id bigint, redeemed bigint)
        ON point_lots.member_id = c.member_id
    WHERE point_lots.state = 'active' AND point_lots.remaining > 0),
consumed AS (
    UPDATE point_lots AS p SET remaining = p.remaining - LEAST(h.remaining, h.redeemed - h.before)
    FROM held AS h WHERE p.id = h.id AND h.before < h.redeemed),
entries AS (
    INSERT INTO ledger ({_LEDGER_COLUMNS})
    SELECT t.id, t.key, t.member_id, t.kind, t.active_delta + t.pending_delta, t.active_delta, t.pending_delta,
        t.purchase_id, NULL, NULL, '', t.created_at
    FROM json_to_recordset(%(entries)s::json) AS t(id bigint, key varchar, member_id bigint, kind varchar,
        active_delta bigint, pending_delta bigint, purchase_id bigint, created_at timestamptz)),
lot AS (
    INSERT INTO point_lots ({_LOT_COLUMNS})
    SELECT t.member_id, t.points, t.points, t.state, t.activates_at, t.expires_at, t.entry_id, t.purchase_id, false
    FROM json_to_recordset(%(lots)s::json) AS t(member_id bigint, points bigint, state varchar,
        activates_at timestamptz, expires_at timestamptz, entry_id bigint, purchase_id bigint)),
balance AS (
    UPDATE balances AS b SET active = b.active + t.active, pending = b.pending + t.pending,
        purchases_sum = GREATEST(b.purchases_sum + t.metric, 0), tier = COALESCE(t.tier, b.tier),
        updated_at = t.now
    FROM json_to_recordset(%(balances)s::json) AS t(member_id bigint, active bigint, pending bigint, metric bigint,
        tier varchar, now timestamptz)
    WHERE b.member_id = t.member_id),
usage AS (
    INSERT INTO promotion_usage (member_id, promotion, period_key, uses)
    SELECT t.member_id, t.promotion, t.period_key, t.uses
    FROM json_to_recordset(%(usage)s::json) AS t(member_id bigint, promotion varchar, period_key varchar, uses int)
    ON CONFLICT (member_id, promotion, period_key) DO UPDATE SET uses = promotion_usage.uses + EXCLUDED.uses)
INSERT INTO events (kind, key, member_id, payload, created_at, processed_at)
SELECT t.kind, t.key, t.member_id, t.payload, t.created_at, NULL
FROM json_to_recordset(%(events)s::json) AS t(kind varchar, key varchar, member_id bigint, payload json,
    created_at timestamptz)"""

_PURCHASE_KEYS = ("store", "terminal", "number", "member_id", "card", "program_version", "request_hash", "answer",
                  "receipt_at", "receipt_time", "receipt_date", "amount", "discount", "payable", "redeemed_points",
                  "redeemed_amount", "accrued_points", "created_at")


class SetWrite:
    """The rows of a group's confirms (``effects.PurchaseRows``, in the order they are written), sent as ONE
    ``_PGB_WRITE``, or as one each when one walk over a member's lots would not write off what the confirms one
    after another would (``exact`` False: a member's confirm writes off points while an earlier confirm of the
    group made points active, which that later one might take)."""

    def __init__(self):
        self.confirms: list[PurchaseRows] = []
        self.exact = True
        self._made_active: set = set()      # members with points made active by a confirm of this group

    def add(self, rows: PurchaseRows) -> None:
        self.confirms.append(rows)
        member_id = rows.member_id
        if member_id is None:
            return
        if rows.redeemed and member_id in self._made_active:
            self.exact = False
        if rows.lot is not None and rows.lot.state == "active":
            self._made_active.add(member_id)

    def send(self, dconn) -> None:
        """Queue the writes on ``dconn`` (in a pipeline)."""
        groups = [self.confirms] if self.exact else [[rows] for rows in self.confirms]
        for group in groups:
            dconn.execute(_PGB_WRITE, _parameters(group))


def _parameters(confirms: list[PurchaseRows]) -> dict:
    """``_PGB_WRITE``'s parameters for ``confirms``: their rows as JSON arrays, one member's sums together."""
    purchases, lines, entries, lots, events = [], [], [], [], []
    consumed: dict = {}
    balances: dict = {}
    usage: dict = {}
    for r in confirms:
        pid, member_id, now = r.purchase_id, r.member_id, r.now
        purchases.append({"id": pid, **{k: r.purchase[k] for k in _PURCHASE_KEYS}})
        lines += [{"purchase_id": pid, **line} for line in r.lines]
        events += [{"kind": kind, "key": key, "member_id": member_id, "payload": payload, "created_at": now}
                   for kind, key, payload in r.events]
        if member_id is None:
            continue
        accrual = None
        for e in r.entries:
            entries.append({"id": e.id, "key": e.key, "member_id": member_id, "kind": e.kind,
                            "active_delta": e.active_delta, "pending_delta": e.pending_delta, "purchase_id": pid,
                            "created_at": now})
            if e.kind == "accrual":
                accrual = e.id
        if r.lot is not None:
            lots.append({"member_id": member_id, "points": r.lot.points, "state": r.lot.state,
                         "activates_at": r.lot.activates_at, "expires_at": r.lot.expires_at, "entry_id": accrual,
                         "purchase_id": pid})
        if r.redeemed:
            consumed[member_id] = consumed.get(member_id, 0) + r.redeemed
        b = balances.get(member_id)
        if b is None:
            b = balances[member_id] = {"member_id": member_id, "active": 0, "pending": 0, "metric": 0, "tier": None}
        b["active"] += r.active_delta
        b["pending"] += r.pending_delta
        b["metric"] += r.metric
        b["now"] = now
        if r.tier is not None:
            b["tier"] = r.tier
        for promotion, period_key in r.usage:
            k = (member_id, promotion, period_key)
            usage[k] = usage.get(k, 0) + 1
    return {"purchases": dumps(purchases), "lines": dumps(lines), "entries": dumps(entries), "lots": dumps(lots),
            "consumed": dumps([{"member_id": m, "redeemed": n} for m, n in consumed.items()]),
            "balances": dumps(list(balances.values())),
            "usage": dumps([{"member_id": m, "promotion": p, "period_key": k, "uses": n}
                            for (m, p, k), n in usage.items()]),
            "events": dumps(events)}
