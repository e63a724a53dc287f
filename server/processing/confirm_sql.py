"""ConfirmPurchase on PostgreSQL: the raw statements of one confirm (``_PG_WRITE``) and of a whole group-commit
batch (``_PGB_WRITE``), and the batch's rows gathered for them (``_BatchWrite``)."""
from __future__ import annotations

from sqlalchemy import bindparam, insert, select, update

from ..db import dumps
from ..models import promotion_budgets, purchases

# ---- the statements of ConfirmPurchase, built once --------------------------------------------------------------

_SELECT_PURCHASE = (select(purchases.c.id, purchases.c.request_hash, purchases.c.answer, purchases.c.member_id)
                    .where(purchases.c.store == bindparam("store"), purchases.c.terminal == bindparam("terminal"),
                           purchases.c.number == bindparam("number")))
_INSERT_PURCHASE = insert(purchases).returning(purchases.c.id)
_SPEND_BUDGET = (update(promotion_budgets).where(promotion_budgets.c.promotion == bindparam("b_promotion"))
                 .values(spent=promotion_budgets.c.spent + bindparam("b_spent")))

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

# PostgreSQL, raw driver SQL. The idempotency check draws the new purchase's id and two ledger entry ids in the
# same statement (a replay or a failure leaves a gap in the sequences, as any rolled-back insert does).
_PG_EXISTING = """SELECT p.id, p.request_hash, p.answer::text,
       nextval('purchases_id_seq'), nextval('ledger_id_seq'), nextval('ledger_id_seq'), p.member_id
FROM (VALUES (1)) AS one(x)
LEFT JOIN purchases AS p ON p.store = %s AND p.terminal = %s AND p.number = %s"""
# Every row of a confirm in one statement (data-modifying CTEs see the same snapshot and never the same row
# twice: the lots consumed are older than the lot added). Rows that a confirm does not have come from empty
# sets: no member (anonymous) matches no balance, ``redeemed`` 0 consumes nothing, ``lot_points`` 0 adds no lot.
_PG_WRITE = f"""\
WITH
purchase AS (
    INSERT INTO purchases ({_PURCHASE_COLUMNS})
    VALUES (%(id)s::bigint, %(store)s, %(terminal)s, %(number)s, %(member_id)s::bigint, %(card)s::varchar,
        %(version)s::bigint, %(hash)s, %(answer)s::json, %(at)s, %(receipt_time)s::timestamptz,
        %(receipt_date)s::date, %(amount)s::bigint, %(discount)s::bigint,
        %(payable)s::bigint, %(redeemed_points)s::bigint, %(redeemed_amount)s::bigint, %(accrued_points)s::bigint,
        0, 0, 0, 0, 'confirmed', %(now)s::timestamptz)),
lines AS (
    INSERT INTO purchase_lines ({_LINE_COLUMNS})
    SELECT %(id)s::bigint, t.line, t.sku, t.quantity, t.amount, t.payable, t.redeemed, t.points, 0, 0, 0, 0
    FROM json_to_recordset(%(lines)s::json)
        AS t(line int, sku varchar, quantity bigint, amount bigint, payable bigint, redeemed bigint, points bigint)),
held AS (
    SELECT id, remaining, sum(remaining) OVER (ORDER BY expires_at ASC NULLS LAST, id) - remaining AS before
    FROM point_lots
    WHERE member_id = %(member_id)s::bigint AND state = 'active' AND remaining > 0 AND %(redeemed)s::bigint > 0),
consumed AS (
    UPDATE point_lots AS p SET remaining = p.remaining - LEAST(h.remaining, %(redeemed)s::bigint - h.before)
    FROM held AS h WHERE p.id = h.id AND h.before < %(redeemed)s::bigint),
entries AS (
    INSERT INTO ledger ({_LEDGER_COLUMNS})
    SELECT t.id, t.key, %(member_id)s::bigint, t.kind, t.a + t.p, t.a, t.p, %(id)s::bigint, NULL, NULL, '',
        %(now)s::timestamptz
    FROM json_to_recordset(%(entries)s::json) AS t(id bigint, key varchar, kind varchar, a bigint, p bigint)),
lot AS (
    INSERT INTO point_lots ({_LOT_COLUMNS})
    SELECT %(member_id)s::bigint, %(lot_points)s::bigint, %(lot_points)s::bigint, %(lot_state)s::varchar,
        %(lot_activates)s::timestamptz, %(lot_expires)s::timestamptz, %(lot_entry)s::bigint, %(id)s::bigint, false
    WHERE %(lot_points)s::bigint > 0 AND %(member_id)s::bigint IS NOT NULL),
balance AS (
    UPDATE balances SET active = active + %(active_delta)s::bigint, pending = pending + %(pending_delta)s::bigint,
        purchases_sum = GREATEST(purchases_sum + %(metric)s::bigint, 0),
        tier = COALESCE(%(tier)s::varchar, tier), updated_at = %(now)s::timestamptz
    WHERE member_id = %(member_id)s::bigint),
usage AS (
    INSERT INTO promotion_usage (member_id, promotion, period_key, uses)
    SELECT %(member_id)s::bigint, t.promotion, t.period_key, 1
    FROM json_to_recordset(%(usage)s::json) AS t(promotion varchar, period_key varchar)
    ON CONFLICT (member_id, promotion, period_key) DO UPDATE SET uses = promotion_usage.uses + 1)
INSERT INTO events (kind, key, member_id, payload, created_at, processed_at)
SELECT t.kind, t.key, %(member_id)s::bigint, t.payload, %(now)s::timestamptz, NULL
FROM json_to_recordset(%(events)s::json) AS t(kind varchar, key varchar, payload json)"""
_PG_SPEND_BUDGET = "UPDATE promotion_budgets SET spent = spent + %s WHERE promotion = %s"

# Group commit (``_confirm_batch``): the first round trip of a whole batch in four statements, whatever its size.
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


def _member_of(item) -> tuple[str, str] | None:
    """The batcher's key of a confirm (``_confirm_item``): its member reference, whose balance row the batch
    locks; two batches of one process never hold the same one (``Batcher``). A card and a phone of one member
    are two keys: those two batches meet at the balance row's lock, which keeps them correct, only slower."""
    return item[1]


_ALONE = object()       # a batch's answer meaning: run this confirm in a transaction of its own


# Every row of a whole batch in ONE statement (``_BatchWrite`` builds the parameters): what ``_PG_WRITE`` does
# for one confirm, over JSON arrays of the batch's rows. Rows of one member are summed where one statement may
# touch a row only once: the balance (deltas and payables added; the last upgrade's tier), the promotion usage
# (uses counted) and the points written off (one walk over the member's lots, earliest-expiring first, for the
# batch's total: the same lots, in the same order, as the confirms one after another, as long as no confirm of
# the batch writes off points that an earlier one of the batch made active; ``_BatchWrite.exact`` says so).
_PGB_WRITE = f"""\
WITH
purchase AS (
    INSERT INTO purchases ({_PURCHASE_COLUMNS})
    SELECT t.id, t.store, t.terminal, t.number, t.member_id, t.card, t.version, t.hash, t.answer, t.at,
        t.receipt_time, t.receipt_date, t.amount,
        t.discount, t.payable, t.redeemed_points, t.redeemed_amount, t.accrued_points, 0, 0, 0, 0, 'confirmed', t.now
    FROM json_to_recordset(%(purchases)s::json) AS t(id bigint, store varchar, terminal varchar, number varchar,
        member_id bigint, card varchar, version bigint, hash varchar, answer json, at varchar,
        receipt_time timestamptz, receipt_date date, amount bigint,
        discount bigint, payable bigint, redeemed_points bigint, redeemed_amount bigint, accrued_points bigint,
        now timestamptz)),
lines AS (
    INSERT INTO purchase_lines ({_LINE_COLUMNS})
    SELECT t.purchase_id, t.line, t.sku, t.quantity, t.amount, t.payable, t.redeemed, t.points, 0, 0, 0, 0
    FROM json_to_recordset(%(lines)s::json) AS t(purchase_id bigint, line int, sku varchar, quantity bigint,
        amount bigint, payable bigint, redeemed bigint, points bigint)),
held AS (
    SELECT l.id, l.remaining, c.redeemed,
        sum(l.remaining) OVER (PARTITION BY l.member_id ORDER BY l.expires_at ASC NULLS LAST, l.id) - l.remaining
            AS before
    FROM point_lots AS l JOIN json_to_recordset(%(consumed)s::json) AS c(member_id bigint, redeemed bigint)
        ON l.member_id = c.member_id
    WHERE l.state = 'active' AND l.remaining > 0),
consumed AS (
    UPDATE point_lots AS p SET remaining = p.remaining - LEAST(h.remaining, h.redeemed - h.before)
    FROM held AS h WHERE p.id = h.id AND h.before < h.redeemed),
entries AS (
    INSERT INTO ledger ({_LEDGER_COLUMNS})
    SELECT t.id, t.key, t.member_id, t.kind, t.a + t.p, t.a, t.p, t.purchase_id, NULL, NULL, '', t.now
    FROM json_to_recordset(%(entries)s::json) AS t(id bigint, key varchar, member_id bigint, kind varchar, a bigint,
        p bigint, purchase_id bigint, now timestamptz)),
lot AS (
    INSERT INTO point_lots ({_LOT_COLUMNS})
    SELECT t.member_id, t.points, t.points, t.state, t.activates, t.expires, t.entry, t.purchase_id, false
    FROM json_to_recordset(%(lots)s::json) AS t(member_id bigint, points bigint, state varchar,
        activates timestamptz, expires timestamptz, entry bigint, purchase_id bigint)),
balance AS (
    UPDATE balances AS b SET active = b.active + t.a, pending = b.pending + t.p,
        purchases_sum = GREATEST(b.purchases_sum + t.metric, 0), tier = COALESCE(t.tier, b.tier), updated_at = t.now
    FROM json_to_recordset(%(balances)s::json) AS t(member_id bigint, a bigint, p bigint, metric bigint,
        tier varchar, now timestamptz)
    WHERE b.member_id = t.member_id),
usage AS (
    INSERT INTO promotion_usage (member_id, promotion, period_key, uses)
    SELECT t.member_id, t.promotion, t.period_key, t.uses
    FROM json_to_recordset(%(usage)s::json) AS t(member_id bigint, promotion varchar, period_key varchar, uses int)
    ON CONFLICT (member_id, promotion, period_key) DO UPDATE SET uses = promotion_usage.uses + EXCLUDED.uses)
INSERT INTO events (kind, key, member_id, payload, created_at, processed_at)
SELECT t.kind, t.key, t.member_id, t.payload, t.now, NULL
FROM json_to_recordset(%(events)s::json) AS t(kind varchar, key varchar, member_id bigint, payload json,
    now timestamptz)"""

_JSON_PARAMS = ("answer", "lines", "entries", "usage", "events")


def _as_json_params(rows: dict) -> dict:
    """``_pg_rows``'s values as ``_PG_WRITE``'s parameters: its documents as JSON text."""
    for name in _JSON_PARAMS:
        rows[name] = dumps(rows[name])
    return rows


class _BatchWrite:
    """The rows of a batch's confirms (``_pg_rows`` of each, in the order they are written), gathered into
    ``_PGB_WRITE``'s parameters, or sent one ``_PG_WRITE`` each when one walk over a member's lots would not
    write off what the confirms one after another would (``exact`` False: a member's confirm writes off points
    while an earlier confirm of the batch made points active, which that later one might take)."""

    def __init__(self):
        self.confirms: list[dict] = []
        self.exact = True
        self._made_active: set = set()      # members with points made active by a confirm of this batch

    def add(self, rows: dict) -> None:
        self.confirms.append(rows)
        member_id = rows["member_id"]
        if member_id is None:
            return
        if rows["redeemed"] and member_id in self._made_active:
            self.exact = False
        if rows["lot_points"] and rows["lot_state"] == "active":
            self._made_active.add(member_id)

    def send(self, dconn) -> None:
        """Queue the writes on ``dconn`` (in a pipeline)."""
        if not self.exact:
            for rows in self.confirms:
                dconn.execute(_PG_WRITE, _as_json_params(rows))
            return
        purchases, lines, entries, lots, events = [], [], [], [], []
        consumed: dict = {}
        balances: dict = {}
        usage: dict = {}
        for r in self.confirms:
            pid, member_id, now = r["id"], r["member_id"], r["now"]
            purchases.append({k: r[k] for k in _PURCHASE_KEYS})
            lines += r["lines"]
            events += r["events"]
            if member_id is None:
                continue
            entries += r["entries"]
            if r["lot_points"] > 0:
                lots.append({"member_id": member_id, "points": r["lot_points"], "state": r["lot_state"],
                             "activates": r["lot_activates"], "expires": r["lot_expires"], "entry": r["lot_entry"],
                             "purchase_id": pid})
            if r["redeemed"]:
                consumed[member_id] = consumed.get(member_id, 0) + r["redeemed"]
            b = balances.get(member_id)
            if b is None:
                b = balances[member_id] = {"member_id": member_id, "a": 0, "p": 0, "metric": 0, "tier": None}
            b["a"] += r["active_delta"]
            b["p"] += r["pending_delta"]
            b["metric"] += r["metric"]
            b["now"] = now
            if r["tier"] is not None:
                b["tier"] = r["tier"]
            for u in r["usage"]:
                k = (member_id, u["promotion"], u["period_key"])
                usage[k] = usage.get(k, 0) + 1
        dconn.execute(_PGB_WRITE, {
            "purchases": dumps(purchases), "lines": dumps(lines), "entries": dumps(entries), "lots": dumps(lots),
            "consumed": dumps([{"member_id": m, "redeemed": n} for m, n in consumed.items()]),
            "balances": dumps(list(balances.values())),
            "usage": dumps([{"member_id": m, "promotion": p, "period_key": k, "uses": n}
                            for (m, p, k), n in usage.items()]),
            "events": dumps(events)})


_PURCHASE_KEYS = ("id", "store", "terminal", "number", "member_id", "card", "version", "hash", "answer", "at",
                  "receipt_time", "receipt_date",
                  "amount", "discount", "payable", "redeemed_points", "redeemed_amount", "accrued_points", "now")
