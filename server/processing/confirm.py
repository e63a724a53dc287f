"""ConfirmPurchase: recompute, check, write once per receipt key: alone (SQLite, or one PostgreSQL confirm in two
round trips) or in a group-commit batch on PostgreSQL; a retry replays the stored answer."""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import time

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from loyalty.v1 import processing_pb2

from .. import ledger
from ..convert import answer_to_proto, receipt_to_dict
from ..db import committing, current_deadline, deadline as db_deadline, driver_errors, loads
from ..errors import AlreadyExists, InvalidArgument, NotFound, ServiceError, Unavailable
from ..members import CONTEXT_PG, PHONE_MEMBER_PG, USAGE_PG, MemberContext, check_pair, increment_usage, validate_ref
from ..models import events, purchase_lines
from ..programs import Snapshot
from ..security import limits as operation_limits
from .common import (
    BATCH_MIN_TIME_S, _BudgetMoved, _check_receipt, _data_errors, _legacy_hashes, _receipt_hash, _Retry, log,
)
from .confirm_sql import (
    _ALONE, _INSERT_PURCHASE, _PG_EXISTING, _PG_SPEND_BUDGET, _PG_WRITE, _PGB_BUDGETS, _PGB_CONTEXT, _PGB_EXISTING,
    _PGB_IDS, _PGB_LOCK, _PGB_SPEND_BUDGET, _PGB_USAGE, _SELECT_PURCHASE, _SPEND_BUDGET, _as_json_params, _BatchWrite,
)
from .context import ContextCases
from .effects import _confirm_events, _Effects, _effects, _purchase_row


class ConfirmCases(ContextCases):
    """ConfirmPurchase, a part of ``ProcessingService``: one confirm alone or a group-commit batch."""

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
        breaches = operation_limits.check(conn, snap.program.operation_limits, now, receipt, fx, ctx)
        totals = answer["totals"]
        try:
            purchase_id = conn.execute(_INSERT_PURCHASE, _purchase_row(snap, receipt, ctx, fx, answer, totals,
                                                                       request_hash, now)).scalar_one()
        except IntegrityError:
            raise _Retry() from None
        operation_limits.record(conn, breaches, purchase_id)
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
        operation_limits.record(conn, operation_limits.check(conn, program.operation_limits, now, receipt, fx, ctx),
                                purchase_id)
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
        tally = operation_limits.Tally(conn, snap.program.operation_limits, self.clock())
        tally.prefetch(set(state), {it[2].date() for it in items},
                       {(it[0]["store"], it[0]["terminal"]) for it in items})
        breaches: list = []         # soft operation limits passed, written with the batch

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
                found = tally.check(receipt, fx, ctx and ctx.card)
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
            tally.add(receipt, fx)
            breaches += [{**row, "purchase_id": purchase_id} for row in found]
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
            operation_limits.record(conn, breaches)
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
