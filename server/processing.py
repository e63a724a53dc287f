"""The processing service: SPEC sections 5-6 as plain synchronous Python, one instance per process.

Each public method takes the request message of ``loyalty.v1`` and returns the response message, and reads
like a story: validate (nothing is written before the whole request is known to be good), load the member
context and the program snapshot, call the core, write in one transaction, answer. Errors are the
``loyalty.server.errors`` types: ``InvalidArgument(path, reason)`` names the field as the client sent it
(``receipt.lines[2].quantity``, ``member.card``, ``lines[0].quantity``), ``NotFound``, ``AlreadyExists``
(an idempotency key reused with another payload), ``FailedPrecondition`` (not enough points:
``details["available_points"]``), ``Unavailable`` (storage down; the transaction was rolled back).

The gRPC layer (``grpc_server.py``) only maps these to status codes; idempotency and concurrency live here,
in the storage transactions.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass

import orjson

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from loyalty.core import InputError, ProgramError, load_program_text
from loyalty.core.errors import quote
from loyalty.core.inputs import parse_at, parse_receipt_time
from loyalty.v1 import admin_pb2, processing_pb2

from . import ledger
from .batcher import Batcher
from .timeutil import utcnow
from .convert import answer_to_proto, iso, receipt_strings, receipt_to_dict
from .db import (
    Database, committing, current_deadline, deadline as db_deadline, driver_errors, dumps, loads,
)
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ServiceError, Unavailable
from .members import (
    CONTEXT_PG, PHONE_MEMBER_PG, USAGE_PG, ContextCache, MemberContext, check_pair, check_text, effective_tier,
    find_member, in_tier_window, increment_usage, load_usage, member_view, next_tier, period_key, tier_for,
    tier_threshold, validate_enroll, validate_ref, validate_status, validate_update,
)
from .models import (
    balances, cards, events, ledger as ledger_entries, member_updates, members, operations, program_versions,
    promotion_budgets, promotion_usage, purchase_lines, purchases, refunds, subscriptions,
)
from .programs import ProgramRegistry, Snapshot
from .segments.membership import AudienceIndex
from .scenarios.definitions import parse_scenarios
from .segments.service import SegmentService, bump_membership_version

__all__ = ["ProcessingService"]

log = logging.getLogger(__name__)


def _hash(message) -> str:
    """The canonical hash of a request: protobuf's deterministic encoding (map keys sorted) of the fields this
    server knows; unknown fields (a newer client's additions) are not part of the payload it checks."""
    known = type(message)()
    known.CopyFrom(message)
    known.DiscardUnknownFields()
    return hashlib.sha256(known.SerializeToString(deterministic=True)).hexdigest()


def _receipt_hash(card: str, phone: str, receipt: dict) -> str:
    """The canonical hash of a confirm's payload: the member reference and the receipt as the server reads them
    (``convert.receipt_to_dict``'s shape, which holds every field of ``Receipt``), keys sorted. Two requests
    with the same hash confirm the same purchase; how the client ordered or encoded its fields does not count,
    and neither do fields this server does not know."""
    return hashlib.sha256(orjson.dumps((card, phone, receipt), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _legacy_hashes(card: str, phone: str, receipt: dict) -> set[str]:
    """What releases before ``_receipt_hash`` stored for the same payload: ``_hash`` of the
    ``ConfirmPurchaseRequest`` message, rebuilt from what the server read (``receipt_to_dict``'s keys are the
    proto's field names, and an optional ``amount`` is present exactly when it was set; with neither card nor
    phone the message may have carried an empty ``member`` or none, so both). A retry across an upgrade, or
    between workers of two releases, replays instead of being ``AlreadyExists``."""
    message = processing_pb2.ConfirmPurchaseRequest(receipt=receipt)
    if card or phone:
        message.member.card, message.member.phone = card, phone
        return {_hash(message)}
    bare = _hash(message)
    message.member.SetInParent()
    return {bare, _hash(message)}


def _data_errors(method):
    """Safety net behind the validation: a value storage refuses (``DataError``: too long for its column, a
    character the database cannot hold) is the client's ``InvalidArgument``, never ``INTERNAL``; the
    driver's text goes to the log only."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except DataError as exc:
            log.warning("storage refused a value in %s: %s", method.__name__, exc)
            raise InvalidArgument("", "a value does not fit the field it is stored in (too long, or a "
                                      "character storage cannot hold)") from None
    return wrapper


# How far ahead of the server's clock a receipt's time may be (tills' clocks drift, time zones are misset).
RECEIPT_AHEAD = dt.timedelta(days=1)

# A group-commit batch is given at least this long in storage, even when a caller's deadline is nearer (a caller
# whose deadline is nearer than this when its batch starts is answered at once and nothing of it is written).
BATCH_MIN_TIME_S = 0.2

# The longest free-text reason (adjustments, refunds, cancels, card status changes) kept in the ledger and the
# audit trail: a sentence or two for the operator who reads it later, not a document.
REASON_LIMIT = 500


def _check_receipt(receipt: dict, path: str = "receipt") -> None:
    """Every string of a receipt (``convert.receipt_to_dict``'s shape) that the service stores or looks up
    fits storage (``check_text``): store / terminal / number and skus at most 64 characters, ``at`` at most
    40, and no NUL character anywhere. (``convert.decode_receipt_request``'s ``fits`` tells a caller that
    decoded the request itself that this would pass.)"""
    for field, value, limit in receipt_strings(receipt, path):
        check_text(field, value, limit)


class _Retry(Exception):
    """A concurrent writer took the idempotency key first: run the transaction again to replay its answer."""


class _BudgetMoved(Exception):
    """A group-commit batch applied a budgeted promotion on a budget figure that other writers have since
    exhausted: the batch is rolled back and every confirm of it runs alone, on locked figures."""


@dataclass(frozen=True, slots=True)
class _Returned:
    """What one refund gives back, worked out before anything is written."""
    line_updates: list
    payable: int            # tier metric taken back
    redeemed: int           # minor units paid with points, of the returned part
    returned_points: int
    taken_back_points: int
    final: bool
    refunded_amount: int    # money back: payable - returned_points x point_value


@dataclass(slots=True)
class _Effects:
    """What a confirmed receipt does to the member, decided before anything is written."""
    counted: bool               # a member's purchase (not anonymous, not a suspended / blocked card)
    member_id: int | None       # the member written to (None when not counted)
    receipt_time: dt.datetime   # when the purchase happened, by its receipt (UTC)
    receipt_date: dt.date       # the receipt's local date
    metric: int                 # what the purchase adds to the tier metric (0 outside the tier window)
    redeemed: int
    accrued: int
    is_pending: bool
    activates: dt.datetime | None
    expires: dt.datetime | None
    active_delta: int
    pending_delta: int
    tier_before: str
    reached: str
    upgrade: bool
    new_sum: int
    settle: bool                # active points arrive while the member is in debt: the debt eats them
    limited: list               # (promotion, period_key) of limited promotions applied
    budgets: list               # (promotion, spent) of budgeted promotions applied, in program order


def _effects(snap: Snapshot, receipt: dict, ctx: MemberContext | None, answer: dict, at, now) -> _Effects:
    """The balance check (``FailedPrecondition`` with ``available_points``) and every amount the writes need."""
    program = snap.program
    totals, state = answer["totals"], answer["member"]
    counted = ctx is not None and not state["anonymous"]     # suspended / blocked cards are anonymous
    if counted and ctx.status == "active" and receipt["redeem_points"] > max(ctx.active, 0):
        available = max(ctx.active, 0)
        raise FailedPrecondition(
            f"not enough points: {receipt['redeem_points']} requested, {available} available",
            available_points=available)
    local, moment = parse_receipt_time(receipt["at"])      # validated with the request
    fx = _Effects(counted=counted, member_id=ctx.member_id if counted else None, receipt_time=moment,
                  receipt_date=local.date(), metric=0, redeemed=0, accrued=0, is_pending=False, activates=None,
                  expires=None, active_delta=0, pending_delta=0, tier_before="",
                  reached="", upgrade=False, new_sum=0, settle=False, limited=[], budgets=[])
    if counted:
        fx.redeemed, fx.accrued = totals["redeemed_points"], totals["accrued_points"]
        fx.active_delta -= fx.redeemed
        if fx.accrued:
            # SPEC 6: pending for activation_days after the receipt's time, active at once if that is past (a
            # receipt confirmed late); expiry counts from activation.
            # (a receipt a little ahead of the server's clock counts from now: its till's clock runs fast)
            fx.activates = max(min(moment, now) + dt.timedelta(days=program.activation_days), now)
            fx.expires = fx.activates + dt.timedelta(days=program.expiry_days) if program.expiry_days else None
            fx.is_pending = fx.activates > now
            if not fx.is_pending:
                _accrued_active(answer, fx.accrued)
            if fx.is_pending:
                fx.pending_delta += fx.accrued
            else:
                fx.active_delta += fx.accrued
        # Upgrades happen here; downgrades only in the periodic recalculation (jobs.run_once).
        fx.tier_before = state["tier"]
        fx.metric = totals["payable"] if in_tier_window(program, fx.receipt_date, now) else 0
        fx.new_sum = ctx.purchases_sum + fx.metric
        fx.reached = tier_for(program, fx.new_sum)
        fx.upgrade = tier_threshold(program, fx.reached) > tier_threshold(program, fx.tier_before)
        fx.settle = bool(fx.accrued and not fx.pending_delta and ctx.active < 0)
        fx.limited = [(p.id, period_key(p.limits.period, at)) for p in program.promotions
                      if p.limits.uses_per_member is not None and p.id in answer["promotions"]]
    # Budgeted promotions count what they gave: discount budgets the minor units of their discounts, points
    # budgets the receipt's accrued points (the answer does not split points by promotion, so this errs on the
    # side of spending the budget early).
    applied = set(answer["promotions"])
    for p in program.promotions:
        if p.id not in applied:
            continue
        spent = 0
        if p.limits.discount_budget is not None:
            spent = sum(d["amount"] for ln in answer["lines"] for d in ln["discounts"] if d["promotion"] == p.id)
        elif p.limits.points_budget is not None:
            spent = totals["accrued_points"]
        if spent:
            fx.budgets.append((p.id, spent))
    return fx


def _accrued_active(answer: dict, accrued: int) -> None:
    """The answer's balances after a receipt whose points are active at once (a receipt older than the return
    window, or no window): the core books accrued points as pending; move them."""
    state = answer["member"]
    state["active_after"] += accrued
    state["pending_after"] -= accrued


def _purchase_row(snap: Snapshot, receipt: dict, ctx, fx: _Effects, answer: dict, totals: dict, request_hash: str,
                  now) -> dict:
    return {"store": receipt["store"], "terminal": receipt["terminal"], "number": receipt["number"],
            "member_id": fx.member_id, "card": ctx.card if ctx else None, "program_version": snap.version,
            "request_hash": request_hash, "answer": answer, "receipt_at": receipt.get("at", ""),
            "receipt_time": fx.receipt_time, "receipt_date": fx.receipt_date,
            "amount": totals["amount"], "discount": totals["discount"], "payable": totals["payable"],
            "redeemed_points": totals["redeemed_points"], "redeemed_amount": totals["redeemed_amount"],
            "accrued_points": totals["accrued_points"], "refunded_payable": 0, "refunded_amount": 0,
            "returned_points": 0, "taken_back_points": 0, "status": "confirmed", "created_at": now}


def _confirm_events(purchase_id: int, snap: Snapshot, receipt: dict, ctx, fx: _Effects, answer: dict) -> list:
    """(kind, key, member_id, payload) of the events a confirm emits, in the order they are written."""
    out = []
    if fx.upgrade:
        out.append(("tier_changed", f"tier:purchase:{purchase_id}", fx.member_id,
                    {"card": ctx.card, "tier_before": fx.tier_before, "tier": fx.reached,
                     "purchases_sum": fx.new_sum, "reason": "purchase"}))
    totals = answer["totals"]
    out.append(("purchase_confirmed", f"purchase_confirmed:{purchase_id}", fx.member_id,
                {"purchase_id": str(purchase_id), "card": ctx.card if ctx else None, "store": receipt["store"],
                 "terminal": receipt["terminal"], "number": receipt["number"], "payable": totals["payable"],
                 "redeemed_points": totals["redeemed_points"], "accrued_points": totals["accrued_points"],
                 "promotions": answer["promotions"], "program_version": snap.version,
                 "at": fx.receipt_time.isoformat()}))
    return out


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


class ProcessingService:
    """Sync and thread-safe; one per process, shared by every request thread.

    ``clock`` is a zero-argument callable returning an aware ``datetime`` (default: UTC now); tests pass a
    simulated one so that activation and expiry can be exercised without waiting.
    """

    def __init__(self, database: Database, programs: ProgramRegistry, *, clock=None,
                 redis_url: str | None = None, audience_index: AudienceIndex | None = None,
                 group_commit: int | None = None, batch_threads: int | None = None):
        self.db = database
        self.programs = programs
        self.clock = clock or utcnow
        self.contexts = ContextCache()
        self._budget_cache: tuple[float, dict] | None = None
        self._old_programs: dict = {}       # version -> Program of older versions (``_program_version``)
        # Group commit of ConfirmPurchase on PostgreSQL (``_confirm_batch``): ``group_commit`` is the largest
        # batch (0: off, every confirm in its own transaction); None reads $LOYALTY_CONFIRM_BATCH (default 32).
        # $LOYALTY_CONFIRM_BATCH_WINDOW_MS (default 4) is how long a batch waits to fill under load (``Batcher``;
        # in interleaved runs of benchmarks/server.py, 4 ms instead of 1 made batches larger and took about a fifth
        # off PostgreSQL's CPU per confirm, most of it spent per batch), and
        # $LOYALTY_CONFIRM_BATCH_THREADS (default 2) how many batches run at once (each on its own connection).
        env = os.environ.get
        if group_commit is None:
            group_commit = int(env("LOYALTY_CONFIRM_BATCH", "32") or 0)
        self._batcher = None
        self._alone_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._alone_lock = threading.Lock()
        if group_commit > 0 and database.dialect == "postgresql":
            self._batcher = Batcher(self._confirm_batch, max_batch=group_commit,
                                    window=float(env("LOYALTY_CONFIRM_BATCH_WINDOW_MS", "4") or 0) / 1000,
                                    threads=batch_threads or int(env("LOYALTY_CONFIRM_BATCH_THREADS", "2") or 2),
                                    name="confirm-batch", key=_member_of)
        # Audience membership from the segment module (roaring bitmaps, reloaded when a recalculation
        # bumps the membership version): what the core's audience conditions check.
        self.audience_index = audience_index or AudienceIndex(database, redis_url=redis_url)
        # A new program version is served only once the memberships its promotions name are loaded.
        programs.memberships = self.audience_index.catch_up

    @classmethod
    def open(cls, database_url: str, *, redis_url: str | None = None, clock=None,
             batch_threads: int | None = None) -> "ProcessingService":
        """Connect to ``database_url`` (``sqlite:///...`` or ``postgresql+psycopg://...``; the schema must
        be at head: call ``loyalty.server.db.upgrade(url)`` first) and, with ``redis_url``, listen for
        program publications there. Storage problems surface as ``Unavailable`` on the first request and
        as ``check_ready() == False``. ``batch_threads``: group-commit batches in flight (None:
        $LOYALTY_CONFIRM_BATCH_THREADS, default 2)."""
        database = Database(database_url)
        clock = clock or utcnow
        return cls(database, ProgramRegistry(database, redis_url=redis_url, clock=clock), clock=clock,
                   redis_url=redis_url, batch_threads=batch_threads)

    # ---- Processing service -------------------------------------------------------------------------------

    def calculate_receipt(self, request) -> processing_pb2.CalculateReceiptResponse:
        """SPEC 4 for ``request.receipt`` with the context of ``request.member`` (card or phone; both empty:
        anonymous). No side effects. Unknown card: ``NotFound``. No program published:
        ``FailedPrecondition``."""
        member = request.member
        answer = self.calculate_answer(member.card, member.phone, receipt_to_dict(request.receipt))
        return processing_pb2.CalculateReceiptResponse(answer=answer_to_proto(answer))

    class _MemberRef:
        """A ``MemberRef`` of two plain strings, for ``validate_ref``."""
        __slots__ = ("card", "phone")

        def __init__(self, card: str, phone: str):
            self.card, self.phone = card, phone

    # What a calculate that must not wait for storage may use: (renew_at, checked_at, snapshot, budgets), set
    # by the last waiting calculate at checked_at. Past renew_at, one call is sent to renew it (the others keep
    # using it meanwhile); past checked_at + CALCULATE_STALE_MAX (storage not answering) nobody uses it.
    _calc_lease: tuple[float, float, Snapshot, dict | None] | None = None
    CALCULATE_LEASE = 0.1
    CALCULATE_STALE_MAX = 1.0

    @_data_errors
    def calculate_answer(self, card: str, phone: str, receipt: dict, *, wait: bool = True,
                         fits: bool = False) -> dict | None:
        """``calculate_receipt`` on plain values, for an edge that decodes the request bytes itself
        (``convert.decode_calculate_request``): ``card`` / ``phone`` of the ``MemberRef`` (both empty:
        anonymous), ``receipt`` as ``convert.receipt_to_dict`` makes it. Returns the core's answer dict
        with ``program_version``; raises what ``calculate_receipt`` raises.

        ``wait=False`` is for a caller on an event loop: it never touches storage, and returns None at once
        when the answer needs anything not in memory (the member's context is not cached; the program
        snapshot and budget figures of the last waiting call are due for renewal, about every
        ``CALCULATE_LEASE`` seconds); the caller then asks again, waiting, from a thread. A new program
        version or budget figure reaches these calls that much later.

        ``fits=True``: the caller's decoder already knows the receipt's strings pass the storage check
        (``convert.decode_receipt_request``), which is then skipped."""
        now = time.monotonic()
        if wait:
            snap = self.programs.current()
        else:
            lease = self._calc_lease
            if lease is None or now - lease[1] > self.CALCULATE_STALE_MAX:
                return None
            if lease[0] <= now:
                self._calc_lease = (now + self.CALCULATE_LEASE,) + lease[1:]
                return None       # this call renews the lease from a thread; the others go on with it
            _, _, snap, budgets = lease
        ref = validate_ref(self._MemberRef(card, phone))
        if not fits:
            _check_receipt(receipt)
        at = self._receipt_at(receipt)
        member = None
        if ref is not None:
            # A cached context serves only the program and membership versions it was built for; taken
            # before the context is read (which then can only be newer). Without waiting: the versions held.
            index = self.audience_index
            stamp = (snap.version, index.checked_version() if wait else index.version)
            ctx = self.contexts.get(ref, stamp)
            if ctx is None:
                if not wait:
                    return None
                with self.db.read() as conn:
                    ctx = self._load_context(conn, ref, snap, lock=False)
                self.contexts.put(ref, ctx, stamp)
            member = ctx.as_core(snap.program, at)
        if wait:
            budgets = self._budgets(snap)
            self._calc_lease = (now + self.CALCULATE_LEASE, now, snap, budgets)
        try:
            answer = snap.engine.calculate(receipt, member, budgets)
        except InputError as exc:
            raise InvalidArgument(exc.path, exc.reason) from None
        accrued = answer["totals"]["accrued_points"]
        if accrued and member is not None and not answer["member"]["anonymous"]:
            # what a confirm now would do: the points of a receipt past its return window are active at once
            moment, clock = parse_receipt_time(receipt["at"])[1], self.clock()
            if min(moment, clock) + dt.timedelta(days=snap.program.activation_days) <= clock:
                _accrued_active(answer, accrued)
        answer["program_version"] = snap.version
        return answer

    def confirm_purchase(self, request) -> processing_pb2.ConfirmPurchaseResponse:
        """Recompute server-side and write the purchase in one transaction. Idempotent by
        ``receipt.store`` / ``receipt.terminal`` / ``receipt.number`` (all three required): the same payload
        again returns the stored answer with ``replayed=True``; another payload under that key is
        ``AlreadyExists``. When ``receipt.redeem_points`` is more than the member's active balance at the
        moment of writing: ``FailedPrecondition(available_points=N)`` and nothing is written."""
        purchase_id, answer, replayed = self.confirm_answer(
            request.member.card, request.member.phone, receipt_to_dict(request.receipt))
        return processing_pb2.ConfirmPurchaseResponse(purchase_id=str(purchase_id),
                                                      answer=answer_to_proto(answer), replayed=replayed)

    def confirm_answer(self, card: str, phone: str, receipt: dict, *, fits: bool = False) -> tuple[int, dict, bool]:
        """``confirm_purchase`` on plain values (``card`` / ``phone`` of the ``MemberRef``, ``receipt`` as
        ``convert.receipt_to_dict`` makes it, e.g. from ``convert.decode_receipt_request``, whose layout
        ``ConfirmPurchaseRequest`` shares, and whose ``fits`` is ``fits`` here, as for ``calculate_answer``):
        ``(purchase_id, answer dict, replayed)``."""
        item = self._confirm_item(card, phone, receipt, fits)
        outcome = _ALONE if self._batcher is None else self._batcher.submit(item, current_deadline())
        if outcome is _ALONE:
            outcome = self._confirm_alone(item)
        return self._confirm_outcome(outcome)

    def group_commit_counters(self) -> dict[str, tuple[str, int]]:
        """The confirm batcher's counters for the metrics (``Metrics.add_counters``); empty without one."""
        batcher = self._batcher
        if batcher is None:
            return {}
        return {"loyalty_confirm_batches_total": ("ConfirmPurchase group-commit batches run.", batcher.batches),
                "loyalty_confirm_batched_total": ("Confirms run in group-commit batches.", batcher.items)}

    def confirm_future(self, card: str, phone: str, receipt: dict, *,
                       fits: bool = False) -> concurrent.futures.Future | None:
        """``confirm_answer`` without a thread waiting for it, for an asyncio edge
        (``await asyncio.wrap_future(future)``): the request is validated now (``InvalidArgument`` raised
        here, without touching storage), the future completes from the batch's thread with
        ``(purchase_id, answer, replayed)`` or the error. None when group commit is off (SQLite,
        ``LOYALTY_CONFIRM_BATCH=0``): call ``confirm_answer`` in a thread instead."""
        if self._batcher is None:
            return None
        item = self._confirm_item(card, phone, receipt, fits)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()   # a caller that gives up cannot cancel a write already queued

        def done(slot) -> None:
            try:
                if slot.error is not None:
                    future.set_exception(slot.error)
                elif slot.value is _ALONE:      # rare: a rolled-back batch; its own transaction, off this thread
                    self._alone_pool().submit(self._confirm_alone_future, item, future, slot.deadline)
                else:
                    future.set_result(self._confirm_outcome(slot.value))
            except BaseException as exc:  # noqa: BLE001 - the waiter must hear of it
                if not future.done():
                    future.set_exception(exc)

        self._batcher.submit_nowait(item, done, current_deadline())
        return future

    def _alone_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._alone_lock:
            if self._alone_executor is None:
                self._alone_executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="confirm-alone")
            return self._alone_executor

    def _confirm_alone_future(self, item, future: concurrent.futures.Future, until: float | None = None) -> None:
        try:
            with db_deadline(until):
                future.set_result(self._confirm_outcome(self._confirm_alone(item)))
        except BaseException as exc:  # noqa: BLE001 - the waiter must hear of it
            future.set_exception(exc)

    def _confirm_item(self, card: str, phone: str, receipt: dict, fits: bool = False) -> tuple:
        """The validated request: ``(receipt, ref, at, request_hash, (card, phone) as sent)``; ``InvalidArgument``
        naming the field.
        Touches no storage (the program snapshot is taken by the transaction that writes)."""
        for name in ("store", "terminal", "number"):
            if not receipt[name]:
                raise InvalidArgument(f"receipt.{name}", "required to confirm: store, terminal and number "
                                                         "identify the purchase")
        if not fits:
            _check_receipt(receipt)
        ref = validate_ref(self._MemberRef(card, phone))
        at = self._receipt_at(receipt)
        return receipt, ref, at, _receipt_hash(card, phone, receipt), (card, phone)

    @_data_errors
    def _confirm_alone(self, item) -> tuple:
        """One confirm in its own transaction: ``(purchase_id, answer, replayed, member_id)``."""
        snap = self.programs.current()
        for attempt in range(2):
            try:
                return self.db.run_write(self._confirm_tx, snap, *item, idempotent=True)
            except _Retry:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _confirm_outcome(self, outcome: tuple) -> tuple[int, dict, bool]:
        purchase_id, answer, replayed, member_id = outcome
        if member_id is not None:       # written now, or replayed (perhaps after a lost COMMIT reply)
            self.contexts.invalidate(member_id)
        return purchase_id, answer, replayed

    def _confirm_tx(self, conn, snap: Snapshot, receipt: dict, ref, at: dt.datetime, request_hash: str,
                    sent: tuple | None = None):
        if self.db.dialect == "postgresql":
            return self._confirm_tx_pg(conn, snap, receipt, ref, at, request_hash, sent)
        existing = conn.execute(_SELECT_PURCHASE, {"store": receipt["store"], "terminal": receipt["terminal"],
                                                   "number": receipt["number"]}).first()
        if existing is not None:
            return self._replay_purchase(existing.id, existing.request_hash, existing.answer, request_hash,
                                         receipt, sent, existing.member_id)

        ctx = self._load_context(conn, ref, snap, lock=True) if ref is not None else None
        member = ctx.as_core(snap.program, at) if ctx is not None else None
        answer = self._calculate(snap, receipt, member, conn)
        now = self.clock()
        fx = _effects(snap, receipt, ctx, answer, at, now)
        totals = answer["totals"]
        try:
            purchase_id = conn.execute(_INSERT_PURCHASE, _purchase_row(snap, receipt, ctx, fx, answer, totals,
                                                                       request_hash, now)).scalar_one()
        except IntegrityError:
            raise _Retry() from None
        conn.execute(insert(purchase_lines), [
            {"purchase_id": purchase_id, "line": i, "sku": ln["sku"], "quantity": receipt["lines"][i]["quantity"],
             "amount": ln["amount"], "payable": ln["payable"], "redeemed": ln["redeemed"], "points": ln["points"],
             "refunded_quantity": 0, "refunded_payable": 0, "refunded_redeemed": 0, "refunded_points": 0}
            for i, ln in enumerate(answer["lines"])])
        if fx.counted:
            member_id = fx.member_id
            if fx.redeemed:
                ledger.consume_active(conn, member_id, fx.redeemed)
                ledger.add_entry(conn, key=f"purchase:{purchase_id}:redemption", member_id=member_id,
                                 kind="redemption", active_delta=-fx.redeemed, now=now, purchase_id=purchase_id)
            if fx.accrued:
                entry = ledger.add_entry(
                    conn, key=f"purchase:{purchase_id}:accrual", member_id=member_id, kind="accrual",
                    active_delta=0 if fx.is_pending else fx.accrued,
                    pending_delta=fx.accrued if fx.is_pending else 0, now=now, purchase_id=purchase_id)
                ledger.new_lot(conn, member_id=member_id, points=fx.accrued, entry_id=entry,
                               state="pending" if fx.is_pending else "active", activates_at=fx.activates,
                               expires_at=fx.expires, purchase_id=purchase_id)
            ledger.move_balance(conn, member_id, active=fx.active_delta, pending=fx.pending_delta,
                                purchases_sum=fx.metric, tier=fx.reached if fx.upgrade else None, now=now)
            if fx.settle:
                ledger.settle_debt(conn, member_id, ctx.active + fx.active_delta)
            if fx.limited:
                increment_usage(conn, member_id, fx.limited)
        for promotion, spent in fx.budgets:
            conn.execute(_SPEND_BUDGET, {"b_promotion": promotion, "b_spent": spent})
        conn.execute(insert(events), [
            {"kind": kind, "key": key, "member_id": member_id, "payload": payload, "created_at": now,
             "processed_at": None}
            for kind, key, member_id, payload in _confirm_events(purchase_id, snap, receipt, ctx, fx, answer)])
        return purchase_id, answer, False, ctx.member_id if ctx else None

    def _confirm_tx_pg(self, conn, snap: Snapshot, receipt: dict, ref, at: dt.datetime, request_hash: str,
                       sent: tuple | None = None):
        """The same transaction on PostgreSQL in two round trips of the driver's pipeline mode.

        1. the idempotency check (which also draws the purchase id and two ledger ids from their sequences),
           the member's context locked ``FOR UPDATE`` and its promotion usage (its own statement, so read after
           the lock was granted);
        2. after the calculation: every row (purchase, lines with one ``unnest``, ledger entries, lot, lots
           consumed, balance, usage, budgets, events) and COMMIT, sent together; a failure of any of them
           fails the COMMIT and rolls the whole transaction back.
        """
        dconn = conn.connection.driver_connection
        program = snap.program
        limited_ids = [p.id for p in program.promotions if p.limits.uses_per_member is not None]
        with driver_errors(conn):
            with dconn.pipeline():
                first = dconn.execute(_PG_EXISTING, (receipt["store"], receipt["terminal"], receipt["number"]))
                found = dconn.execute(CONTEXT_PG[ref[0]], (ref[1],)) if ref is not None else None
                usage = (dconn.execute(USAGE_PG[ref[0]], (ref[1], limited_ids))
                         if ref is not None and limited_ids else None)
                pair = dconn.execute(PHONE_MEMBER_PG, (ref[2],)) if ref is not None and len(ref) > 2 else None
            existing_id, existing_hash, existing_answer, purchase_id, entry_a, entry_b, existing_member = \
                first.fetchone()
            if existing_id is not None:
                return self._replay_purchase(existing_id, existing_hash, loads(existing_answer), request_hash,
                                             receipt, sent, existing_member)
            ctx = None
            if found is not None:
                row = found.fetchone()
                if row is None:
                    raise NotFound(f"{'card' if ref[0] == 'card' else 'phone'} {ref[1]} was not found")
                if pair is not None:
                    check_pair(ref, row[0], (pair.fetchone() or (None,))[0])
                ctx = MemberContext(member_id=row[0], card=row[1], status=row[2], tier=row[3], active=row[4],
                                    pending=row[5], purchases_sum=row[6])
                if usage is not None:
                    ctx.usage = {(p, k): u for p, k, u in usage.fetchall()}
        if ctx is not None:
            ctx.audiences = self._audiences(conn, ctx.member_id)
        member = ctx.as_core(program, at) if ctx is not None else None
        answer = self._calculate(snap, receipt, member, conn)
        now = self.clock()
        fx = _effects(snap, receipt, ctx, answer, at, now)
        member_id = fx.member_id
        params = self._pg_write_params(snap, receipt, ctx, fx, answer, now, request_hash, purchase_id, entry_a,
                                       entry_b)
        try:
            with committing() if not fx.settle else contextlib.nullcontext(), driver_errors(conn):
                with dconn.pipeline():
                    dconn.execute(_PG_WRITE, params)
                    for promotion, spent in fx.budgets:     # program order: a fixed lock order
                        dconn.execute(_PG_SPEND_BUDGET, (spent, promotion))
                    if not fx.settle:
                        dconn.commit()      # queued behind the writes: one round trip for all of them
            if fx.settle:                   # a member in debt: rare, plain statements before the commit
                ledger.settle_debt(conn, member_id, ctx.active + fx.active_delta)
        except IntegrityError:
            # Someone confirmed the same store/terminal/number meanwhile: run again to replay their answer.
            raise _Retry() from None
        return purchase_id, answer, False, ctx.member_id if ctx else None

    # ---- group commit (PostgreSQL) ------------------------------------------------------------------------

    def _confirm_batch(self, slots: list) -> None:
        """Run the confirms of ``slots`` (``_confirm_item``'s tuples) in ONE transaction
        and answer each slot: ``(purchase_id, answer, replayed, member_id)``, its own ``ServiceError``, or
        ``_ALONE`` (run it in a transaction of its own).

        Each confirm's own failures (unknown member, bad input, not enough points, a key reused with another
        payload) are decided in Python before anything is sent, so they never touch the transaction: that
        confirm writes nothing and the others go on. A statement failing in the write round (a concurrent
        confirm of the same key from another process, a deadlock after the retries, anything unexpected)
        rolls back the whole batch and sends every confirm of it back to run alone, where it gets its exact
        answer (the replay, ``AlreadyExists``, ...). Losing the connection fails the whole batch with
        ``Unavailable``: nothing of it was committed (or all of it was, and a retry replays). Answers are
        given only after the COMMIT succeeded."""
        now = time.monotonic()
        late = [s for s in slots if s.deadline is not None and s.deadline - BATCH_MIN_TIME_S <= now]
        if late:                                # their callers have given up: write nothing for them
            for s in late:
                s.fail(Unavailable("the call's deadline passed before storage could take it; nothing was written",
                                   outcome="not_written"))
            slots = [s for s in slots if s not in late]
            if not slots:
                return
        # storage work is bounded by the latest deadline of the batch (one short deadline must not fail the
        # others), given at least BATCH_MIN_TIME_S; a slot whose own deadline passes meanwhile is answered late
        until = max((s.deadline for s in slots if s.deadline is not None), default=None)
        if until is not None and any(s.deadline is None for s in slots):
            until = None
        try:
            snap = self.programs.current()      # one program for the whole batch
            with db_deadline(None if until is None else max(until, now + BATCH_MIN_TIME_S)):
                outcomes = self.db.run_write(self._confirm_batch_tx, snap, [s.item for s in slots],
                                             idempotent=True)
        except ServiceError as exc:             # Unavailable: storage down or a lost connection; no program
            for s in slots:
                s.fail(exc)
            return
        except _BudgetMoved as exc:
            log.info("confirm batch of %d rolled back: budget of %s spent meanwhile; running each alone",
                     len(slots), ", ".join(exc.args[0]))
            outcomes = [_ALONE] * len(slots)
        except Exception:  # noqa: BLE001 - IntegrityError & co: every confirm runs alone and gets its answer
            log.info("confirm batch of %d rolled back; running each alone", len(slots), exc_info=True)
            outcomes = [_ALONE] * len(slots)
        for s, outcome in zip(slots, outcomes):
            if isinstance(outcome, BaseException):
                s.fail(outcome)
            else:
                s.set(outcome)

    def _confirm_batch_tx(self, conn, snap: Snapshot, items: list) -> list:
        """The batch's transaction in two round trips (see ``_confirm_batch``).

        1. the stored purchases under the batch's keys, the ids the new rows need, every member of the batch
           locked in member id order, then (each its own statement, read after the locks) the members'
           contexts, promotion usage and what the budgets have spent (not locked);
        2. only when a confirm applied a budgeted promotion: the budgets spent by the whole batch, each on
           the condition that the figures the batch decided on still hold (``_PGB_SPEND_BUDGET``; when one
           does not, ``_BudgetMoved``: the batch rolls back and each confirm runs alone);
        3. after the calculations, in receipt-key order (the order every batch inserts its purchases in):
           every row of the batch in one statement (``_BatchWrite``), COMMIT.

        Two confirms of one member follow each other: the second is calculated and checked against the
        member as the first one's writes leave it. Two confirms of one key: the second replays the first
        (or is ``AlreadyExists``)."""
        dconn = conn.connection.driver_connection
        n = len(items)
        order = sorted(range(n), key=lambda i: (items[i][0]["store"], items[i][0]["terminal"],
                                                items[i][0]["number"]))
        cards = sorted({it[1][1] for it in items if it[1] is not None and it[1][0] == "card"})
        phones = sorted({it[1][1] for it in items if it[1] is not None and it[1][0] == "phone"})
        promotions = snap.program.promotions
        limited = sorted(p.id for p in promotions if p.limits.uses_per_member is not None)
        budgeted = sorted(p.id for p in promotions
                          if p.limits.discount_budget is not None or p.limits.points_budget is not None)
        with driver_errors(conn):
            with dconn.pipeline():
                found = dconn.execute(_PGB_EXISTING, ([it[0]["store"] for it in items],
                                                      [it[0]["terminal"] for it in items],
                                                      [it[0]["number"] for it in items]))
                drawn = dconn.execute(_PGB_IDS, (n,))
                context = usage = budget_rows = None
                if cards or phones:
                    dconn.execute(_PGB_LOCK, (cards, phones))
                    context = dconn.execute(_PGB_CONTEXT, (cards, phones))
                    if limited:
                        usage = dconn.execute(_PGB_USAGE, (cards, phones, limited))
                if budgeted:
                    budget_rows = dconn.execute(_PGB_BUDGETS, (budgeted,))
            stored = {(r[0], r[1], r[2]): r[3:] for r in found.fetchall()}
            ids = drawn.fetchall()
            # what the budgets had spent when read; the batch's confirms add theirs (``budgets``) as they go
            spent_before = dict(budget_rows.fetchall()) if budget_rows is not None else None
            refs, state = {}, {}        # ref -> (member_id, card, status); member_id -> its live context
            for kind, value, member_id, card, status, tier, active, pending, purchases_sum in (
                    context.fetchall() if context is not None else ()):
                refs[kind, value] = (member_id, card, status)
                if member_id not in state:
                    state[member_id] = MemberContext(member_id=member_id, card=card, status=status, tier=tier,
                                                     active=active, pending=pending, purchases_sum=purchases_sum)
            if usage is not None:
                for member_id, promotion, key, uses in usage.fetchall():
                    if member_id in state:
                        state[member_id].usage[promotion, key] = uses
        for member_id, ctx in state.items():
            ctx.audiences = self._audiences(conn, member_id)

        outcomes: list = [None] * n
        firsts: dict = {}           # key -> index of the confirm of this batch that writes it
        writes, budgets = _BatchWrite(), {}     # budgets: promotion -> what this batch's confirms spend of it
        checks: dict = {}           # promotion -> what the batch had spent before its last confirm applying it
        for k, i in enumerate(order):
            receipt, ref, at, request_hash, sent = items[i]
            key = (receipt["store"], receipt["terminal"], receipt["number"])
            try:
                if key in firsts:
                    j = firsts[key]
                    self._replay_purchase(None, items[j][3], None, request_hash, receipt)  # or AlreadyExists
                    outcomes[i] = j
                    continue
                if key in stored:
                    pid, stored_hash, stored_answer, stored_member = stored[key]
                    outcomes[i] = self._replay_purchase(pid, stored_hash, loads(stored_answer), request_hash,
                                                        receipt, sent, stored_member)
                    continue
                ctx = None
                if ref is not None and len(ref) > 2:
                    outcomes[i] = _ALONE    # a card and a phone, rare: its own transaction compares the two
                    continue
                if ref is not None:
                    found_ref = refs.get(ref)
                    if found_ref is None:
                        raise NotFound(f"{'card' if ref[0] == 'card' else 'phone'} {ref[1]} was not found")
                    live = state[found_ref[0]]
                    ctx = MemberContext(member_id=live.member_id, card=found_ref[1], status=found_ref[2],
                                        tier=live.tier, active=live.active, pending=live.pending,
                                        purchases_sum=live.purchases_sum, audiences=live.audiences,
                                        usage=live.usage)
                member = ctx.as_core(snap.program, at) if ctx is not None else None
                # the budgets as this batch's earlier confirms leave them
                used = None
                if spent_before is not None:
                    used = dict(spent_before)
                    for promotion, amount in budgets.items():
                        used[promotion] = used.get(promotion, 0) + amount
                answer = self._calculate(snap, receipt, member, conn, budgets=used)
                now = self.clock()
                fx = _effects(snap, receipt, ctx, answer, at, now)
            except ServiceError as exc:
                outcomes[i] = exc
                continue
            except SQLAlchemyError:         # storage (the budgets read, an audience lookup): the batch's failure
                raise
            except Exception as exc:  # noqa: BLE001 - this confirm's own bug, not the batch's
                log.exception("confirm %s/%s/%s failed in a batch", *key)
                outcomes[i] = exc
                continue
            if fx.settle:                   # a member in debt: rare, after this batch in its own transaction
                outcomes[i] = _ALONE
                continue
            purchase_id, entry_a, entry_b = ids[k]
            writes.add(self._pg_rows(snap, receipt, ctx, fx, answer, now, request_hash, purchase_id, entry_a,
                                     entry_b))
            if spent_before is not None:
                for promotion in answer["promotions"]:
                    if promotion in spent_before:
                        checks[promotion] = budgets.get(promotion, 0)
            for promotion, spent in fx.budgets:
                budgets[promotion] = budgets.get(promotion, 0) + spent
            if fx.counted:                  # what the next confirm of this member sees
                live.active += fx.active_delta
                live.pending += fx.pending_delta
                live.purchases_sum = max(live.purchases_sum + fx.metric, 0)
                if fx.upgrade:
                    live.tier = fx.reached
                for pk in fx.limited:
                    live.usage[pk] = live.usage.get(pk, 0) + 1
            firsts[key] = i
            outcomes[i] = (purchase_id, answer, False, ctx.member_id if ctx else None)
        if writes.confirms:
            with driver_errors(conn):
                if checks:                  # promotion id order: the order every writer locks budget rows in
                    limits = {p.id: p.limits.discount_budget if p.limits.discount_budget is not None
                              else p.limits.points_budget for p in promotions}
                    spend = sorted(checks)
                    with dconn.pipeline():
                        spent = [dconn.execute(_PGB_SPEND_BUDGET, (budgets.get(p, 0), p, checks[p], limits[p]))
                                 for p in spend]
                    moved = [p for p, cur in zip(spend, spent) if cur.fetchone() is None]
                    if moved:
                        raise _BudgetMoved(moved)
            with committing(), driver_errors(conn), dconn.pipeline():
                writes.send(dconn)
                dconn.commit()
        for i, outcome in enumerate(outcomes):
            if type(outcome) is int:        # the replay of the first confirm of its key in this batch
                pid, answer, _, _ = outcomes[outcome]
                outcomes[i] = (pid, answer, True, None)
        return outcomes

    @staticmethod
    def _pg_rows(snap: Snapshot, receipt: dict, ctx, fx: _Effects, answer: dict, now, request_hash: str,
                 purchase_id: int, entry_a: int, entry_b: int) -> dict:
        """Every row of one confirm as plain values, named as ``_PG_WRITE``'s parameters (``_pg_write_params``
        encodes them for it; a batch gathers many into ``_PGB_WRITE``, ``_BatchWrite``)."""
        totals = answer["totals"]
        lines, rlines = answer["lines"], receipt["lines"]
        member_id = fx.member_id
        # the line, entry and event rows carry their purchase / member / time already, as ``_PGB_WRITE`` reads
        # them (``_PG_WRITE`` takes those from its own parameters and ignores the extra keys)
        entries = []
        if fx.redeemed:
            entries.append({"id": entry_a, "key": f"purchase:{purchase_id}:redemption", "kind": "redemption",
                            "a": -fx.redeemed, "p": 0, "member_id": member_id, "purchase_id": purchase_id,
                            "now": now})
        if fx.accrued:
            entries.append({"id": entry_b, "key": f"purchase:{purchase_id}:accrual", "kind": "accrual",
                            "a": 0 if fx.is_pending else fx.accrued, "p": fx.accrued if fx.is_pending else 0,
                            "member_id": member_id, "purchase_id": purchase_id, "now": now})
        return {
            "id": purchase_id, "store": receipt["store"], "terminal": receipt["terminal"],
            "number": receipt["number"], "member_id": member_id, "card": ctx.card if ctx else None,
            "version": snap.version, "hash": request_hash, "answer": answer, "at": receipt.get("at", ""),
            "receipt_time": fx.receipt_time, "receipt_date": fx.receipt_date, "metric": fx.metric,
            "amount": totals["amount"], "discount": totals["discount"], "payable": totals["payable"],
            "redeemed_points": totals["redeemed_points"], "redeemed_amount": totals["redeemed_amount"],
            "accrued_points": totals["accrued_points"], "now": now,
            "lines": [{"purchase_id": purchase_id, "line": i, "sku": ln["sku"], "quantity": rlines[i]["quantity"],
                       "amount": ln["amount"], "payable": ln["payable"], "redeemed": ln["redeemed"],
                       "points": ln["points"]} for i, ln in enumerate(lines)],
            "redeemed": fx.redeemed, "entries": entries,
            "lot_points": fx.accrued, "lot_state": "pending" if fx.is_pending else "active",
            "lot_activates": fx.activates, "lot_expires": fx.expires, "lot_entry": entry_b,
            "active_delta": fx.active_delta, "pending_delta": fx.pending_delta,
            "tier": fx.reached if fx.upgrade else None,
            "usage": [{"promotion": p, "period_key": k} for p, k in fx.limited],
            "events": [{"kind": kind, "key": key, "payload": payload, "member_id": member_id, "now": now}
                       for kind, key, _, payload in _confirm_events(purchase_id, snap, receipt, ctx, fx, answer)],
        }

    @classmethod
    def _pg_write_params(cls, *args) -> dict:
        """The parameters of ``_PG_WRITE``: ``_pg_rows(*args)`` with its documents as JSON text."""
        return _as_json_params(cls._pg_rows(*args))

    @staticmethod
    def _replay_purchase(purchase_id: int, stored_hash: str, answer: dict, request_hash: str, receipt: dict,
                         sent: tuple | None = None, member_id: int | None = None):
        """The stored answer when the payloads are the same (``sent``: the card and phone as sent, to recognise
        a hash stored by an earlier release, ``_legacy_hashes``); ``AlreadyExists`` otherwise. ``member_id``
        (the stored purchase's) is the member whose cached context the caller drops: a replay after a lost
        COMMIT reply is the first answer this member's till hears of the purchase."""
        if stored_hash != request_hash and (sent is None or stored_hash not in _legacy_hashes(*sent, receipt)):
            raise AlreadyExists(
                f"purchase {receipt['store']}/{receipt['terminal']}/{receipt['number']} was already confirmed "
                f"with a different payload")
        return purchase_id, answer, True, member_id

    @_data_errors
    def refund_purchase(self, request) -> processing_pb2.RefundPurchaseResponse:
        """Return ``request.lines`` (line index and thousandths) or, with ``all_remaining``, everything not
        yet returned. Idempotent by ``refund_id`` (concurrent calls with the same one: one refund is made,
        the others replay it). Unknown purchase: ``NotFound``; a cancelled purchase: ``FailedPrecondition``;
        more than is left of a line: ``InvalidArgument("lines[i].quantity")``.

        Money and points: the returned part's payable comes back as whole written-off points (cumulatively
        rounded down over the purchase's refunds; the final refund returns what is left) and money
        (``refunded_amount``, which also carries the fraction of a point the written-off share does not make
        whole), so that each refund's money + points x point_value is exactly what the customer paid for the
        returned units. Accrued points are taken back for the returned part, but never the ones the
        purchase's own lot lost to expiry. The final refund (nothing left afterwards) also gives back the
        purchase's use of promotions limited per member and what it spent of discount budgets; a partial
        refund leaves both as they are."""
        refund_id = check_text("refund_id", request.refund_id.strip(), 100)
        if not refund_id:
            raise InvalidArgument("refund_id", "required: the idempotency key of this refund")
        if refund_id.startswith("cancel:"):
            raise InvalidArgument("refund_id", "the prefix 'cancel:' is reserved")
        check_text("reason", request.reason, REASON_LIMIT)
        key = self._purchase_key(request.purchase, "purchase")
        if request.all_remaining and len(request.lines):
            raise InvalidArgument("lines", "give either lines or all_remaining, not both")
        if not request.all_remaining and not len(request.lines):
            raise InvalidArgument("lines", "required: the lines returned, or all_remaining")
        wanted: dict[int, int] = {}
        for i, rl in enumerate(request.lines):
            if rl.line < 0:
                raise InvalidArgument(f"lines[{i}].line", f"must be at least 0, got {rl.line}")
            if rl.line in wanted:
                raise InvalidArgument(f"lines[{i}].line", f"line {rl.line} is listed twice")
            if rl.quantity <= 0:
                raise InvalidArgument(f"lines[{i}].quantity", f"must be at least 1, got {rl.quantity}")
            wanted[rl.line] = rl.quantity
        response, member_id = self._write_replaying(
            self._refund_tx, refund_id, key, wanted, request.all_remaining, request.reason, _hash(request),
            False)
        self.contexts.invalidate(member_id)
        return processing_pb2.RefundPurchaseResponse(**response)

    @_data_errors
    def cancel_purchase(self, request) -> processing_pb2.CancelPurchaseResponse:
        """Reverse what is left of a confirmed purchase, as a final refund does (promotion uses and discount
        budgets come back too). Idempotent by the purchase: calling it again (or concurrently) returns the
        stored answer with ``replayed=True``."""
        key = self._purchase_key(request.purchase, "purchase")
        check_text("reason", request.reason, REASON_LIMIT)
        response, member_id = self._write_replaying(
            self._refund_tx, None, key, {}, True, request.reason, "", True)
        self.contexts.invalidate(member_id)
        response.pop("refund_id")
        response.pop("final")
        return processing_pb2.CancelPurchaseResponse(**response)

    def _write_replaying(self, fn, *args, idempotent: bool = True):
        """``db.run_write(fn, ...)`` for a write idempotent by a unique key: when a concurrent call wrote the
        key first (the unique violation of our insert), run once more to replay its stored answer; when the
        connection is lost while committing, run again to learn the outcome (``Database.run_write``)."""
        for attempt in range(2):
            try:
                return self.db.run_write(fn, *args, idempotent=idempotent)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _refund_tx(self, conn, refund_id: str | None, key: tuple, wanted: dict, all_remaining: bool, reason: str,
                   request_hash: str, cancel: bool):
        """One refund (``cancel``: the purchase's cancellation, keyed ``cancel:<purchase id>``). The
        idempotency key is checked again once the purchase row is locked, so a concurrent call with the same
        key waits for the first one and replays it."""
        is_pg = conn.dialect.name == "postgresql"
        if not cancel:
            done = self._stored_refund(conn, refund_id, request_hash)
            if done is not None:
                return done
        stmt = select(purchases).where(purchases.c.store == key[0], purchases.c.terminal == key[1],
                                       purchases.c.number == key[2])
        if is_pg:
            stmt = stmt.with_for_update()
        purchase = conn.execute(stmt).first()
        if purchase is None:
            raise NotFound(f"purchase {'/'.join(key)} was not found")
        if cancel:
            refund_id = f"cancel:{purchase.id}"
        if cancel or is_pg:       # (SQLite: the write lock was held since the first check)
            done = self._stored_refund(conn, refund_id, request_hash if not cancel else None)
            if done is not None:
                return done
        if purchase.status == "cancelled":
            raise FailedPrecondition(f"purchase {'/'.join(key)} was cancelled")
        lines = conn.execute(select(purchase_lines).where(purchase_lines.c.purchase_id == purchase.id)
                             .order_by(purchase_lines.c.line)).all()
        if all_remaining:
            wanted = {ln.line: ln.quantity - ln.refunded_quantity for ln in lines
                      if ln.quantity > ln.refunded_quantity}
            if not wanted and not cancel:
                raise FailedPrecondition(f"nothing of purchase {'/'.join(key)} is left to return")
        else:
            for i, (line, qty) in enumerate(wanted.items()):
                if line >= len(lines):
                    raise InvalidArgument(f"lines[{i}].line", f"the purchase has {len(lines)} lines, "
                                                              f"no line {line}")
                left = lines[line].quantity - lines[line].refunded_quantity
                if qty > left:
                    raise InvalidArgument(f"lines[{i}].quantity", f"{qty} is more than the {left} left of "
                                                                  f"line {line}")
        ret = _work_out_return(purchase, lines, wanted)
        member_id = purchase.member_id
        if ret.taken_back_points and member_id is not None:
            # Never take back what the purchase's own lot lost to expiry: at most its accrual less the
            # expiry entries of its lot less what earlier refunds took back.
            expired = -int(conn.execute(
                select(func.coalesce(func.sum(ledger_entries.c.points), 0))
                .where(ledger_entries.c.member_id == member_id, ledger_entries.c.purchase_id == purchase.id,
                       ledger_entries.c.kind == "expiry")).scalar())
            allowed = max(purchase.accrued_points - expired - purchase.taken_back_points, 0)
            if ret.taken_back_points > allowed:
                ret = dataclasses.replace(ret, taken_back_points=allowed)
        now = self.clock()
        if member_id is not None and (ret.returned_points or ret.taken_back_points or ret.payable):
            ctx = self._lock_balance(conn, member_id)
            active_delta = pending_delta = 0
            if ret.taken_back_points:
                from_pending, from_active = ledger.take_back(conn, member_id, ret.taken_back_points, purchase.id)
                ledger.add_entry(conn, key=f"refund:{refund_id}:reversal", member_id=member_id, kind="reversal",
                                 active_delta=-from_active, pending_delta=-from_pending, now=now,
                                 purchase_id=purchase.id, refund_id=refund_id, reason=reason)
                active_delta -= from_active
                pending_delta -= from_pending
            if ret.returned_points:
                program = self.programs.current().program
                entry = ledger.add_entry(conn, key=f"refund:{refund_id}:refund", member_id=member_id, kind="refund",
                                         active_delta=ret.returned_points, now=now, purchase_id=purchase.id,
                                         refund_id=refund_id, reason=reason)
                ledger.new_lot(conn, member_id=member_id, points=ret.returned_points, entry_id=entry,
                               state="active", activates_at=now,
                               expires_at=now + dt.timedelta(days=program.expiry_days) if program.expiry_days
                               else None)
                active_delta += ret.returned_points
            try:
                in_window = in_tier_window(self.programs.current().program, purchase.receipt_date, now)
            except FailedPrecondition:
                in_window = True
            ledger.move_balance(conn, member_id, active=active_delta, pending=pending_delta,
                                purchases_sum=-ret.payable if in_window else 0, now=now)
            if ret.returned_points:
                ledger.settle_debt(conn, member_id, ctx[0] + active_delta)
            balance = (ctx[0] + active_delta, ctx[1] + pending_delta)
        elif member_id is not None:
            balance = self._lock_balance(conn, member_id)
        else:
            balance = (0, 0)
        if cancel or ret.final:
            self._give_back_limits(conn, purchase)
        if ret.line_updates:
            conn.execute(update(purchase_lines).where(purchase_lines.c.purchase_id == purchase.id,
                                                      purchase_lines.c.line == bindparam("b_line")),
                         ret.line_updates)
        status = "cancelled" if cancel else ("refunded" if ret.final else "confirmed")
        conn.execute(update(purchases).where(purchases.c.id == purchase.id).values(
            refunded_payable=purchases.c.refunded_payable + ret.payable,
            refunded_amount=purchases.c.refunded_amount + ret.refunded_amount,
            returned_points=purchases.c.returned_points + ret.returned_points,
            taken_back_points=purchases.c.taken_back_points + ret.taken_back_points,
            status=status))
        response = {"refund_id": refund_id, "purchase_id": str(purchase.id),
                    "refunded_amount": ret.refunded_amount, "returned_points": ret.returned_points,
                    "taken_back_points": ret.taken_back_points, "final": ret.final,
                    "active_points": balance[0], "pending_points": balance[1], "replayed": False}
        conn.execute(insert(refunds).values(refund_id=refund_id, purchase_id=purchase.id, request_hash=request_hash,
                                            response=response, reason=reason, created_at=now))
        self._event(conn, "refund", member_id, now, key=f"refund:{refund_id}", refund_id=refund_id,
                    purchase_id=str(purchase.id), card=purchase.card, cancel=cancel,
                    refunded_amount=response["refunded_amount"], returned_points=ret.returned_points,
                    taken_back_points=ret.taken_back_points, final=ret.final or cancel,
                    lines={str(k): v for k, v in wanted.items()})
        return response, member_id

    @staticmethod
    def _stored_refund(conn, refund_id: str, request_hash: str | None) -> tuple[dict, int | None] | None:
        """The stored response under ``refund_id`` marked ``replayed`` (``AlreadyExists`` when
        ``request_hash`` is given and differs) and its purchase's member (whose cached context the caller
        drops: a replay after a lost COMMIT reply is the first the till hears of it), or None."""
        done = conn.execute(select(refunds.c.request_hash, refunds.c.response, purchases.c.member_id)
                            .join(purchases, purchases.c.id == refunds.c.purchase_id)
                            .where(refunds.c.refund_id == refund_id)).first()
        if done is None:
            return None
        if request_hash is not None and done.request_hash != request_hash:
            raise AlreadyExists(f"refund {refund_id} was already made with a different payload")
        return dict(done.response, replayed=True), done.member_id

    def _give_back_limits(self, conn, purchase) -> None:
        """A cancelled or finally refunded purchase no longer counts: one use less of each promotion limited
        per member that it applied (in the period of its receipt), and its discounts back into the discount
        budgets of the promotions that gave them. The limits are those of the program version the purchase
        was confirmed with."""
        program = self._program_version(conn, purchase.program_version)
        answer = purchase.answer or {}
        applied = set(answer.get("promotions", ()))
        if purchase.member_id is not None:
            limited = [p for p in program.promotions if p.id in applied and p.limits.uses_per_member is not None]
            if limited:
                at = parse_at(purchase.receipt_at, "receipt.at")
                u = promotion_usage.c
                for p in limited:
                    conn.execute(update(promotion_usage)
                                 .where(u.member_id == purchase.member_id, u.promotion == p.id,
                                        u.period_key == period_key(p.limits.period, at), u.uses > 0)
                                 .values(uses=u.uses - 1))
        given = {}
        budgeted = {p.id for p in program.promotions if p.id in applied and p.limits.discount_budget is not None}
        for ln in answer.get("lines", ()):
            for d in ln.get("discounts", ()):
                if d["promotion"] in budgeted:
                    given[d["promotion"]] = given.get(d["promotion"], 0) + d["amount"]
        b = promotion_budgets.c
        for promotion in sorted(given):         # the budget rows' lock order (see ``_budgets``)
            if given[promotion]:
                conn.execute(update(promotion_budgets).where(b.promotion == promotion)
                             .values(spent=case((b.spent > given[promotion], b.spent - given[promotion]), else_=0)))
        self._budget_cache = None

    def _program_version(self, conn, version: int):
        """The ``Program`` of a published version (the current one from memory, older ones parsed once)."""
        snap = self.programs.current()
        if snap.version == version:
            return snap.program
        program = self._old_programs.get(version)
        if program is None:
            yaml_text = conn.execute(select(program_versions.c.yaml)
                                     .where(program_versions.c.version == version)).scalar_one()
            program = load_program_text(yaml_text)
            if len(self._old_programs) >= 16:
                self._old_programs.clear()
            self._old_programs[version] = program
        return program

    def _lock_balance(self, conn, member_id: int) -> tuple[int, int]:
        stmt = select(balances.c.active, balances.c.pending).where(balances.c.member_id == member_id)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).one()
        return row[0], row[1]

    @_data_errors
    def get_member(self, request) -> processing_pb2.Member:
        """The member by ``request.member.card`` or ``.phone``: status, tier, balances, next expiry,
        progress, subscriptions, profile. ``NotFound`` when unknown."""
        ref = validate_ref(request.member if request.HasField("member") else None, required=True)
        return self._member_message(ref)

    @_data_errors
    def enroll_member(self, request) -> processing_pb2.Member:
        """Register a member with a new card (required) and phone (optional); both unique (``AlreadyExists``
        naming the field). ``source`` defaults to ``api``, ``registered_at`` to now. With ``request_id`` a
        retry, also a concurrent one, returns the member that request enrolled. Emits ``member_registered``."""
        values = validate_enroll(request)
        if values["registered_at"] is not None and values["registered_at"] > self.clock():
            raise InvalidArgument("registered_at", "must not be in the future")
        try:
            lowest = self.programs.current().program.tiers.levels[0].name
        except FailedPrecondition:
            lowest = ""
        try:
            # A concurrent enrolment of the same card / phone / request_id that commits first fails our insert;
            # the second run sees it (the same request_id: that member; else AlreadyExists).
            self._write_replaying(self._enroll_tx, values, lowest,
                                  idempotent=bool(values.get("enroll_request_id")))
        except IntegrityError:
            raise AlreadyExists("the card or the phone is already registered") from None
        return self._member_message(("card", values["card"]))

    def _enroll_tx(self, conn, v: dict, tier: str) -> None:
        # The card and the phone are looked up BEFORE the request id: on PostgreSQL each statement reads what
        # was committed when it started, so an identical call that commits between the two reads shows its
        # request id here, and this call replays it instead of calling its card "taken".
        taken = None
        if conn.execute(select(cards.c.id).where(cards.c.number == v["card"])).first() is not None:
            taken = AlreadyExists(f"card {v['card']} is already registered", field="card")
        elif v["phone"] and conn.execute(select(members.c.id).where(members.c.phone == v["phone"])).first():
            taken = AlreadyExists(f"phone {v['phone']} is already registered", field="phone")
        if v["enroll_request_id"]:
            prior = conn.execute(select(cards.c.number).join(members, members.c.id == cards.c.member_id)
                                 .where(members.c.enroll_request_id == v["enroll_request_id"])).first()
            if prior is not None:
                if prior.number != v["card"]:
                    raise AlreadyExists(f"request {v['enroll_request_id']} enrolled another card",
                                        field="request_id")
                return
        if taken is not None:
            raise taken
        now = self.clock()
        member_id = conn.execute(insert(members).values(
            phone=v["phone"], first_name=v["first_name"], last_name=v["last_name"], gender=v["gender"],
            birth_date=v["birth_date"], email=v["email"], city=v["city"], custom=v["custom"], source=v["source"],
            enroll_request_id=v["enroll_request_id"], registered_at=v["registered_at"] or now)
            .returning(members.c.id)).scalar_one()
        conn.execute(insert(cards).values(number=v["card"], member_id=member_id, status="active",
                                          status_changed_at=now))
        conn.execute(insert(balances).values(member_id=member_id, active=0, pending=0, purchases_sum=0, tier=tier,
                                             updated_at=now))
        if v["subscriptions"]:
            conn.execute(insert(subscriptions), [
                {"member_id": member_id, "channel": ch, "on": on, "saved_on": None, "updated_at": now}
                for ch, on in sorted(v["subscriptions"].items())])
        self._event(conn, "member_registered", member_id, now, key=f"member_registered:{member_id}",
                    card=v["card"], source=v["source"])

    @_data_errors
    def update_member(self, request) -> processing_pb2.Member:
        """Set or clear the member's profile fields and phone, set or remove custom fields, switch
        subscriptions on or off (``UpdateMemberRequest``: what is left out stays). A phone another member has:
        ``AlreadyExists`` naming ``phone``. With ``request_id`` a retry, also a concurrent one, changes
        nothing more and answers the member as it is; the same key with another payload is ``AlreadyExists``.
        The member's cached context is dropped (its audiences may depend on the profile)."""
        v = validate_update(request)
        try:
            # A concurrent change that commits first (the same request id, or the same phone for another
            # member) fails our write; the second run sees it and replays, or names the phone.
            member_id, card = self._write_replaying(self._update_tx, v, _hash(request),
                                                    idempotent=v["request_id"] is not None)
        except IntegrityError:
            raise AlreadyExists("the phone is already registered to another member", field="phone") from None
        self.contexts.invalidate(member_id)
        return self._member_message(("card", card))

    def _update_tx(self, conn, v: dict, request_hash: str) -> tuple[int, str]:
        """``(member_id, card)`` of the member changed (or of the one the stored request changed)."""
        pg = conn.dialect.name == "postgresql"

        def stored():
            if v["request_id"] is None:
                return None
            done = conn.execute(select(member_updates.c.member_id, member_updates.c.request_hash)
                                .where(member_updates.c.request_id == v["request_id"])).first()
            if done is not None and done.request_hash != request_hash:
                raise AlreadyExists(f"request {v['request_id']} already updated a member with a different payload",
                                    field="request_id")
            return None if done is None else (done.member_id, self._card_of(conn, done.member_id))

        done = stored()
        if done is not None:
            return done
        try:
            ctx = find_member(conn, v["ref"])
            if ctx is None:
                raise NotFound(f"{'card' if v['ref'][0] == 'card' else 'phone'} {v['ref'][1]} was not found")
        except (NotFound, InvalidArgument):
            # An identical call that changed the very phone this one finds the member by may have committed
            # since the first look: replay it.
            done = stored()
            if done is not None:
                return done
            raise
        # The member's row is the lock of its profile (the scenario engine's profile steps take it too); a
        # concurrent call with this request id that held it has committed by now (SQLite: the write lock).
        stmt = select(members).where(members.c.id == ctx.member_id)
        row = conn.execute(stmt.with_for_update() if pg else stmt).one()._mapping
        if pg:
            done = stored()
            if done is not None:
                return done
        now = self.clock()
        changes, values = {}, {}
        for name, value in v["fields"].items():
            if name == "phone" and value is not None and value != row["phone"]:
                if conn.execute(select(members.c.id).where(members.c.phone == value)).first() is not None:
                    raise AlreadyExists(f"phone {value} is already registered to another member", field="phone")
            if value != row[name]:
                values[name] = value
                changes[name] = [_plain(row[name]), _plain(value)]
        custom = dict(row["custom"] or {})
        for name in v["clear_custom"]:
            if name in custom:
                changes[f"custom.{name}"] = [custom.pop(name), None]
        for name, value in v["custom"].items():
            if custom.get(name) != value:
                changes[f"custom.{name}"] = [custom.get(name), value]
                custom[name] = value
        if custom != (row["custom"] or {}):
            values["custom"] = custom
        if values:
            conn.execute(update(members).where(members.c.id == ctx.member_id).values(**values))
        if v["subscriptions"]:
            changes.update(self._set_subscriptions(conn, ctx.member_id, v["subscriptions"], now))
        conn.execute(insert(member_updates).values(request_id=v["request_id"], member_id=ctx.member_id,
                                                   request_hash=request_hash, changes=changes, created_at=now))
        return ctx.member_id, ctx.card

    def _set_subscriptions(self, conn, member_id: int, wanted: dict, now: dt.datetime) -> dict:
        """Switch the member's channels as ``wanted`` says; the changes as ``{"subscriptions.<ch>": [before,
        after]}``. While no card of the member is active (``_status_tx`` switched every channel off and keeps
        what was on in ``saved_on``), the choice goes to ``saved_on``: the channel stays off until a card is
        active again, and then it is what the member chose. The cards are locked first, as ``_status_tx``
        locks them, so a status change cannot pass between reading them and writing."""
        stmt = select(cards.c.status).where(cards.c.member_id == member_id)
        statuses = conn.execute(stmt.with_for_update() if conn.dialect.name == "postgresql" else stmt).scalars()
        live = "active" in set(statuses)
        subs = subscriptions.c
        current = {r.channel: r for r in conn.execute(select(subs.channel, subs.on, subs.saved_on)
                                                      .where(subs.member_id == member_id))}
        changes = {}
        for channel, on in sorted(wanted.items()):
            row = current.get(channel)
            before = None if row is None else (row.on if live or row.saved_on is None else row.saved_on)
            if before == on:
                continue
            changes[f"subscriptions.{channel}"] = [before, on]
            values = {"on": on, "saved_on": None} if live else {"on": False, "saved_on": on}
            if row is None:
                conn.execute(insert(subscriptions).values(member_id=member_id, channel=channel, updated_at=now,
                                                          **values))
            else:
                conn.execute(update(subscriptions).where(subs.member_id == member_id, subs.channel == channel)
                             .values(updated_at=now, **values))
        return changes

    @staticmethod
    def _card_of(conn, member_id: int) -> str:
        """The member's card a phone would find: the newest active one, else the newest."""
        return conn.execute(select(cards.c.number).where(cards.c.member_id == member_id)
                            .order_by((cards.c.status == "active").desc(), cards.c.id.desc()).limit(1)).scalar_one()

    @_data_errors
    def adjust_points(self, request) -> processing_pb2.AdjustPointsResponse:
        """``credit`` / ``top_up`` give ``points`` as an active lot (expiring after ``expiry_days`` or the
        program's), ``debit`` takes them (never below zero: ``FailedPrecondition(available_points=N)``); the
        ``reason`` is required (SPEC 5: audited).
        Idempotent by ``operation_id`` (required; concurrent calls with the same one: one operation is made,
        the others replay it)."""
        ref = validate_ref(request.member if request.HasField("member") else None, required=True)
        if request.kind not in ("credit", "debit", "top_up"):
            raise InvalidArgument("kind", f"expected credit, debit or top_up, got {quote(request.kind)}")
        if request.points <= 0:
            raise InvalidArgument("points", f"must be at least 1, got {request.points}")
        if request.points > 10**12:
            raise InvalidArgument("points", f"must be at most {10**12}, got {request.points}")
        operation_id = check_text("operation_id", request.operation_id.strip(), 100)
        if not operation_id:
            raise InvalidArgument("operation_id", "required: the idempotency key of this operation")
        check_text("reason", request.reason, REASON_LIMIT)
        if not request.reason.strip():
            raise InvalidArgument("reason", "required: why the points are given or taken, for the audit trail")
        expiry_days = None
        if request.HasField("expiry_days"):
            if request.kind == "debit":
                raise InvalidArgument("expiry_days", "only credits and top-ups expire")
            if not 1 <= request.expiry_days <= 36500:
                raise InvalidArgument("expiry_days", f"must be 1 to 36500, got {request.expiry_days}")
            expiry_days = request.expiry_days
        else:
            try:
                expiry_days = self.programs.current().program.expiry_days
            except FailedPrecondition:
                expiry_days = None
        response, member_id = self._write_replaying(self._adjust_tx, ref, request, operation_id, expiry_days,
                                                    _hash(request))
        self.contexts.invalidate(member_id)
        return processing_pb2.AdjustPointsResponse(**response)

    def _adjust_tx(self, conn, ref, request, operation_id: str, expiry_days: int | None, request_hash: str):
        def stored():
            done = conn.execute(select(operations.c.request_hash, operations.c.response, operations.c.member_id)
                                .where(operations.c.operation_id == operation_id)).first()
            if done is not None and done.request_hash != request_hash:
                raise AlreadyExists(f"operation {operation_id} was already made with a different payload",
                                    field="operation_id")
            # (its member's cached context is dropped by the caller: perhaps a replay after a lost COMMIT reply)
            return None if done is None else (dict(done.response, replayed=True), done.member_id)

        done = stored()
        if done is not None:
            return done
        ctx = find_member(conn, ref, lock=True)
        if ctx is None:
            raise NotFound(f"member {ref[1]} was not found")
        if conn.dialect.name == "postgresql":
            # Checked again under the member's lock: a concurrent call with this key that held it has
            # committed by now (SQLite held the write lock since the first check).
            done = stored()
            if done is not None:
                return done
        now = self.clock()
        points, kind = request.points, request.kind
        if kind == "debit":
            available = max(ctx.active, 0)
            if points > available:
                raise FailedPrecondition(f"not enough points: {points} to debit, {available} available",
                                         available_points=available)
            ledger.consume_active(conn, ctx.member_id, points)
            ledger.add_entry(conn, key=f"operation:{operation_id}", member_id=ctx.member_id, kind="adjustment",
                             active_delta=-points, now=now, operation_id=operation_id, reason=request.reason)
            delta = -points
        else:
            entry = ledger.add_entry(conn, key=f"operation:{operation_id}", member_id=ctx.member_id,
                                     kind="top_up" if kind == "top_up" else "adjustment", active_delta=points,
                                     now=now, operation_id=operation_id, reason=request.reason)
            ledger.new_lot(conn, member_id=ctx.member_id, points=points, entry_id=entry, state="active",
                           activates_at=now,
                           expires_at=now + dt.timedelta(days=expiry_days) if expiry_days else None)
            delta = points
        ledger.move_balance(conn, ctx.member_id, active=delta, now=now)
        if delta > 0 and ctx.active < 0:
            ledger.settle_debt(conn, ctx.member_id, ctx.active + delta)
        if kind == "top_up":
            self._event(conn, "top_up", ctx.member_id, now, key=f"top_up:{operation_id}", card=ctx.card,
                        points=points, reason=request.reason, operation_id=operation_id)
        response = {"operation_id": operation_id, "active_points": ctx.active + delta,
                    "pending_points": ctx.pending, "replayed": False}
        conn.execute(insert(operations).values(operation_id=operation_id, member_id=ctx.member_id, kind=kind,
                                               points=points, reason=request.reason, request_hash=request_hash,
                                               response=response, created_at=now))
        return response, ctx.member_id

    @_data_errors
    def set_card_status(self, request) -> processing_pb2.Member:
        """Change a card's status. Leaving ``active`` switches every subscription off and remembers which
        were on; returning to ``active`` restores exactly those. Emits ``card_status_changed``."""
        card = check_text("card", request.card.strip(), 64)
        if not card:
            raise InvalidArgument("card", "required")
        status = validate_status(request.status)
        check_text("reason", request.reason, REASON_LIMIT)
        member_id = self.db.run_write(self._status_tx, card, status, request.reason)
        self.contexts.invalidate(member_id)
        self.audience_index.announce()      # the other processes' cached contexts hold the old status
        return self._member_message(("card", card))

    def _status_tx(self, conn, card: str, status: str, reason: str) -> int:
        stmt = select(cards.c.member_id, cards.c.status).where(cards.c.number == card)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).first()
        if row is None:
            raise NotFound(f"card {card} was not found")
        before = row.status
        if before == status:
            return row.member_id
        now = self.clock()
        subs = subscriptions.c
        if before == "active":
            conn.execute(update(subscriptions).where(subs.member_id == row.member_id)
                         .values(saved_on=subs.on, on=False, updated_at=now))
        elif status == "active":
            conn.execute(update(subscriptions).where(subs.member_id == row.member_id, subs.saved_on.is_not(None))
                         .values(on=subs.saved_on, saved_on=None, updated_at=now))
        conn.execute(update(cards).where(cards.c.number == card).values(status=status, status_changed_at=now))
        self._event(conn, "card_status_changed", row.member_id, now, card=card, status_before=before,
                    status=status, reason=reason)
        bump_membership_version(conn, now)      # last: its row lock is held until the commit
        return row.member_id

    # ---- Admin service ------------------------------------------------------------------------------------

    def publish_program(self, request) -> admin_pb2.ProgramVersion:
        """Validate ``request.yaml`` (``InvalidArgument`` with the program path, e.g.
        ``promotions[3].effect``), store it as the next immutable version and switch every process to it.
        The file's ``segments:`` and ``audiences:`` are defined (and calculated) first, so a promotion of the
        new version never names an audience that does not exist yet; a bad segment publishes nothing."""
        check_text("yaml", request.yaml)
        check_text("comment", request.comment)
        try:
            source = load_program_text(request.yaml).source if request.yaml.strip() else None
        except ProgramError:
            source = None     # programs.publish reports it with its path
        if source and source.get("scenarios"):
            parse_scenarios(source["scenarios"])     # a bad scenario publishes nothing; workers apply them
        if source and (source.get("segments") or source.get("audiences")):
            SegmentService(self.db, clock=self.clock).apply_program(source)
        # Every process loads the memberships before it serves the version (ProgramRegistry.memberships),
        # and cached contexts of older versions are not used (their stamps).
        row = self.programs.publish(request.yaml, request.comment)
        budgeted = [p.id for p in self.programs.current().program.promotions
                    if p.limits.discount_budget is not None or p.limits.points_budget is not None]
        if budgeted:
            def seed(conn):
                have = set(conn.execute(select(promotion_budgets.c.promotion)
                                        .where(promotion_budgets.c.promotion.in_(budgeted))).scalars())
                missing = [{"promotion": p, "spent": 0} for p in budgeted if p not in have]
                if missing:
                    conn.execute(insert(promotion_budgets), missing)
            try:
                self.db.run_write(seed)
            except IntegrityError:   # another process seeded them at the same moment
                pass
        return _version_message(dict(row, current=True))

    def get_program(self, request) -> admin_pb2.ProgramVersion:
        """Version ``request.version`` (0: the current one) with its YAML; ``NotFound`` when absent."""
        if request.version < 0:
            raise InvalidArgument("version", f"must be 0 (the current one) or a version number, got {request.version}")
        return _version_message(self.programs.get(request.version))

    def list_program_versions(self, request) -> admin_pb2.ListProgramVersionsResponse:
        """Every version, newest first, without the YAML text."""
        return admin_pb2.ListProgramVersionsResponse(versions=[_version_message(r) for r in self.programs.versions()])

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def check_ready(self, timeout: float | None = None) -> bool:
        """True when storage answers a trivial query (within ``timeout`` seconds: a hung server is not ready;
        for the health service); never raises."""
        return self.db.ping(timeout)

    def close(self) -> None:
        """Stop the program listener and dispose of the connection pool."""
        if self._batcher is not None:
            self._batcher.close()
        if self._alone_executor is not None:
            self._alone_executor.shutdown(wait=True)
        self.programs.close()
        self.audience_index.close()
        self.db.dispose()

    # ---- helpers ------------------------------------------------------------------------------------------

    def _audiences(self, conn, member_id: int) -> tuple[str, ...]:
        """The member's audience ids; dynamic segments are evaluated for this member on ``conn`` now."""
        return tuple(sorted(self.audience_index.audiences_of(member_id, conn=conn)))

    def _load_context(self, conn, ref, snap: Snapshot, *, lock: bool) -> MemberContext:
        ctx = find_member(conn, ref, lock=lock)
        if ctx is None:
            raise NotFound(f"{'card' if ref[0] == 'card' else 'phone'} {ref[1]} was not found")
        limited = [p.id for p in snap.program.promotions if p.limits.uses_per_member is not None]
        if limited:
            ctx.usage = load_usage(conn, ctx.member_id, limited)
        ctx.audiences = self._audiences(conn, ctx.member_id)
        return ctx

    def _calculate(self, snap: Snapshot, receipt: dict, member: dict | None, conn=None, *,
                   budgets: dict | None = None) -> dict:
        """The core's answer; ``budgets`` (what budgeted promotions have spent) as the caller read them, or
        None to read them here (``_budgets``)."""
        if budgets is None:
            budgets = self._budgets(snap, conn)
        try:
            answer = snap.engine.calculate(receipt, member, budgets)
        except InputError as exc:
            raise InvalidArgument(exc.path, exc.reason) from None
        answer["program_version"] = snap.version
        return answer

    def _budgets(self, snap: Snapshot, conn=None) -> dict | None:
        """What budgeted promotions have spent.

        Without ``conn`` (CalculateReceipt, no side effects): read at most once a second per process.
        With ``conn`` (a confirm's write transaction): read now, never from the cache, the program's budget
        rows locked (PostgreSQL ``FOR UPDATE``, in promotion id order, always after the member's lock;
        SQLite's write lock already serialises) until the COMMIT that adds this receipt's spend, so no two
        confirms decide on the same figure and a budget ends at most one receipt's spend past its limit.
        (A group-commit batch reads them once, with ``_PGB_BUDGETS``, and adds what its earlier confirms
        spend.)"""
        ids = [p.id for p in snap.program.promotions
               if p.limits.discount_budget is not None or p.limits.points_budget is not None]
        if not ids:
            return None
        if conn is None:
            cached = self._budget_cache
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            with self.db.read() as read:
                used = dict(read.execute(select(promotion_budgets.c.promotion, promotion_budgets.c.spent)).all())
            self._budget_cache = (time.monotonic() + 1.0, used)
            return used
        stmt = (select(promotion_budgets.c.promotion, promotion_budgets.c.spent)
                .where(promotion_budgets.c.promotion.in_(ids)).order_by(promotion_budgets.c.promotion))
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return dict(conn.execute(stmt).all())

    def _receipt_at(self, receipt: dict) -> dt.datetime | None:
        """The receipt's local time (naive), checked: a valid time with a valid offset, not more than
        ``RECEIPT_AHEAD`` ahead of the server's clock (a till whose clock is years off would park its points
        and count its receipts in the wrong windows)."""
        if "at" not in receipt:
            raise InvalidArgument("receipt.at", "required")
        try:
            local, moment = parse_receipt_time(receipt["at"], "receipt.at")
        except InputError as exc:
            raise InvalidArgument(exc.path, exc.reason) from None
        if moment.year < 1900:
            raise InvalidArgument("receipt.at", f"before 1900: {quote(receipt['at'])}")
        if moment > self.clock() + RECEIPT_AHEAD:
            raise InvalidArgument("receipt.at", f"more than {RECEIPT_AHEAD.days} day ahead of the server's clock "
                                                f"({iso(self.clock())}): check the till's date and time")
        return local

    @staticmethod
    def _purchase_key(key, path: str) -> tuple[str, str, str]:
        for name in ("store", "terminal", "number"):
            if not getattr(key, name):
                raise InvalidArgument(f"{path}.{name}", "required")
            check_text(f"{path}.{name}", getattr(key, name), 64)
        return key.store, key.terminal, key.number

    def _member_message(self, ref) -> processing_pb2.Member:
        with self.db.read() as conn:
            view = member_view(conn, ref, self._audiences)
        if view is None:
            raise NotFound(f"{'card' if ref[0] == 'card' else 'phone'} {ref[1]} was not found")
        ctx, m = view["ctx"], view["member"]
        msg = processing_pb2.Member(
            member_id=str(ctx.member_id), card=ctx.card, phone=m["phone"] or "", status=ctx.status,
            active_points=ctx.active, pending_points=ctx.pending, purchases_sum=ctx.purchases_sum,
            next_expiry_points=view["next_expiry_points"], next_expiry_at=iso(view["next_expiry_at"]),
            subscriptions=view["subscriptions"], audiences=view["audiences"], source=m["source"],
            registered_at=iso(m["registered_at"]),
            profile=processing_pb2.Profile(first_name=m["first_name"], last_name=m["last_name"],
                                           gender=m["gender"], birth_date=iso(m["birth_date"]), email=m["email"],
                                           city=m["city"], custom={k: str(v) for k, v in (m["custom"] or {}).items()}))
        try:
            program = self.programs.current().program
        except FailedPrecondition:
            msg.tier = ctx.tier
            return msg
        msg.tier = effective_tier(program, ctx.tier, ctx.purchases_sum)
        name, missing = next_tier(program, ctx.purchases_sum)
        msg.next_tier = name
        if missing is not None:
            msg.to_next_tier = missing
        return msg

    def _event(self, conn, kind: str, member_id: int | None, now: dt.datetime, *, key: str | None = None,
               **payload) -> None:
        conn.execute(insert(events).values(kind=kind, key=key, member_id=member_id, payload=payload,
                                           created_at=now))


def _plain(value):
    """A column's value as JSON holds it (dates as ISO text), for the audit record of a change."""
    return value.isoformat() if isinstance(value, dt.date) else value


def _cum(total: int, done_qty: int, qty: int, quantity: int) -> int:
    """The part of ``total`` that belongs to ``done_qty + qty`` of ``quantity``, rounded down, cumulatively:
    partial refunds never sum to more than the line, and the last one takes exactly what is left."""
    return total * (done_qty + qty) // quantity


def _work_out_return(purchase, lines, wanted: dict) -> _Returned:
    """The amounts of a return, with every partial share taken cumulatively (``_cum``) so that the sum over
    all refunds of a line is exactly the line, whatever the order and sizes of the returns."""
    updates, payable, redeemed, taken_back = [], 0, 0, 0
    cum_redeemed_all = 0
    final = True
    for ln in lines:
        qty = wanted.get(ln.line, 0)
        done = ln.refunded_quantity + qty
        if done < ln.quantity:
            final = False
        if qty:
            if done == ln.quantity:
                d_pay = ln.payable - ln.refunded_payable
                d_red = ln.redeemed - ln.refunded_redeemed
                d_pts = ln.points - ln.refunded_points
            else:
                d_pay = _cum(ln.payable, ln.refunded_quantity, qty, ln.quantity) - ln.refunded_payable
                d_red = _cum(ln.redeemed, ln.refunded_quantity, qty, ln.quantity) - ln.refunded_redeemed
                d_pts = _cum(ln.points, ln.refunded_quantity, qty, ln.quantity) - ln.refunded_points
            updates.append({"b_line": ln.line, "refunded_quantity": done,
                            "refunded_payable": ln.refunded_payable + d_pay,
                            "refunded_redeemed": ln.refunded_redeemed + d_red,
                            "refunded_points": ln.refunded_points + d_pts})
            payable += d_pay
            redeemed += d_red
            taken_back += d_pts
            cum_redeemed_all += ln.refunded_redeemed + d_red
        else:
            cum_redeemed_all += ln.refunded_redeemed
    # Written-off points come back at the receipt level: a line's share of the write-off is in minor units and
    # need not be whole points. Cumulatively rounded down; the final return gives back exactly what is left.
    # The money returned is the rest of the returned part's payable, so money + points x point_value is
    # exactly what the customer paid for it: the fraction of a point not made whole is money; a later refund
    # that completes that point gives the point and correspondingly less money.
    returned, money = 0, payable - redeemed
    if purchase.redeemed_points:
        point_value = purchase.redeemed_amount // purchase.redeemed_points
        if final:
            returned = purchase.redeemed_points - purchase.returned_points
        else:
            returned = max(0, cum_redeemed_all // point_value - purchase.returned_points)
        money = payable - returned * point_value
        if money < 0:           # rare: the returned part was paid (almost) wholly with points
            short = -(money // point_value)         # ceil(-money / point_value) points become money
            returned -= short
            money += short * point_value
    return _Returned(updates, payable, redeemed, returned, taken_back, final, money)


def _version_message(row: dict) -> admin_pb2.ProgramVersion:
    return admin_pb2.ProgramVersion(version=row["version"], program=row["name"], yaml=row.get("yaml", ""),
                                    published_at=iso(row["published_at"]), comment=row.get("comment") or "",
                                    current=bool(row.get("current")), checksum=row["checksum"])
