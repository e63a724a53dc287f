"""ConfirmPurchase: recompute, check, write once per receipt key; a retry replays the stored answer.

One path decides (``effects``: the balance check, the amounts, every row) and two writers carry the rows out:
row by row through ``ledger`` (SQLite; on PostgreSQL the rare confirm a group hands back) and set-based on
PostgreSQL (``confirm_sql``: one round trip reads what a group of confirms needs, one statement writes all their
rows), for a group-commit batch or, with group commit off, a confirm alone as a group of one."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import os
import threading
import time

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from loyalty.v1 import processing_pb2

from ..batcher import Batcher
from ..convert import answer_to_proto, receipt_to_dict
from ..db import committing, current_deadline, deadline as db_deadline, driver_errors, loads
from ..errors import AlreadyExists, InvalidArgument, NotFound, ServiceError, Unavailable
from ..members import MemberContext, validate_ref
from ..programs import Snapshot
from ..security import limits as operation_limits
from .common import BATCH_MIN_TIME_S, _BudgetMoved, _check_receipt, _data_errors, _legacy_hashes, _receipt_hash, _Retry, log
from .confirm_sql import (
    _PGB_BUDGETS, _PGB_CONTEXT, _PGB_EXISTING, _PGB_IDS, _PGB_LOCK, _PGB_SPEND_BUDGET, _PGB_USAGE, SetWrite,
)
from .confirm_write import INSERT_PURCHASE, SELECT_PURCHASE, write_rows
from ..runtime import Runtime
from .context import MemberRef, Reads
from .effects import decide_effects, purchase_row, purchase_rows

_ALONE = object()       # a group's answer meaning: write this confirm row by row in a transaction of its own


@dataclasses.dataclass(frozen=True, slots=True)
class ConfirmRequest:
    """A validated confirm: the receipt (``convert.receipt_to_dict``'s shape), the member reference
    (``validate_ref``: ``(kind, value)`` or ``("card", card, phone)``; None: anonymous), the receipt's local
    time, the payload's hash and the card and phone as sent (to recognise an earlier release's hash)."""
    receipt: dict
    ref: tuple | None
    at: dt.datetime
    request_hash: str
    sent: tuple[str, str]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.receipt["store"], self.receipt["terminal"], self.receipt["number"]


@dataclasses.dataclass(frozen=True, slots=True)
class Confirmed:
    """A confirm's outcome: the purchase, the answer, whether it was replayed, and the member whose cached
    context the caller drops (None: anonymous, or a replay inside one group)."""
    purchase_id: int
    answer: dict
    replayed: bool
    member_id: int | None


def member_of(request: ConfirmRequest) -> tuple | None:
    """The batcher's key of a confirm: its member reference, whose balance row the group locks; two groups of
    one process never hold the same one (``Batcher``). A card and a phone of one member are two keys: those two
    groups meet at the balance row's lock, which keeps them correct, only slower."""
    return request.ref


class Confirmation:
    """ConfirmPurchase: one confirm alone or in a group-commit batch (PostgreSQL).

    ``group_commit`` is the largest batch (0: off, every confirm in its own transaction); None reads
    $LOYALTY_CONFIRM_BATCH (default 32). $LOYALTY_CONFIRM_BATCH_WINDOW_MS (default 4) is how long a batch waits
    to fill under load (``Batcher``; in interleaved runs of benchmarks/server.py, 4 ms instead of 1 made batches
    larger and took about a fifth off PostgreSQL's CPU per confirm, most of it spent per batch), and
    ``batch_threads`` or $LOYALTY_CONFIRM_BATCH_THREADS (default 2) how many batches run at once (each on its own
    connection)."""

    def __init__(self, rt: Runtime, reads: Reads, *, group_commit: int | None = None,
                 batch_threads: int | None = None):
        self.rt, self.reads = rt, reads
        env = os.environ.get
        if group_commit is None:
            group_commit = int(env("LOYALTY_CONFIRM_BATCH", "32") or 0)
        # PostgreSQL writes a confirm's rows set-based (``confirm_sql``), a group at a time or alone as a group
        # of one; SQLite row by row.
        self.set_based = rt.db.dialect_ops.group_commit
        self.batcher: Batcher | None = None
        if group_commit > 0 and self.set_based:
            self.batcher = Batcher(self._confirm_batch, max_batch=group_commit,
                                   window=float(env("LOYALTY_CONFIRM_BATCH_WINDOW_MS", "4") or 0) / 1000,
                                   threads=batch_threads or int(env("LOYALTY_CONFIRM_BATCH_THREADS", "2") or 2),
                                   name="confirm-batch", key=member_of)
        self._alone_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._alone_lock = threading.Lock()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self._alone_executor is not None:
            self._alone_executor.shutdown(wait=True)

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
        request = self._confirm_request(card, phone, receipt, fits)
        outcome = _ALONE if self.batcher is None else self.batcher.submit(request, current_deadline())
        if outcome is _ALONE:
            outcome = self._confirm_alone(request)
        return self._confirm_outcome(outcome)

    def watch_group_commit(self, make_on_batch) -> None:
        """With group commit, have ``make_on_batch()``'s function called with ``n`` for every batch of ``n``
        confirms (the metrics; from the batcher's threads); without (SQLite, ``LOYALTY_CONFIRM_BATCH=0``),
        nothing, and ``make_on_batch`` is not called (no series for what cannot happen)."""
        if self.batcher is not None:
            self.batcher.on_batch = make_on_batch()

    def trace_group_commit(self, capture, around) -> None:
        """With group commit, the batcher's trace hooks (``Batcher.capture`` / ``Batcher.around``): a batch's
        transaction runs under a span linked to the spans of the confirms it serves. Without, nothing: each
        confirm's transaction is already a child of its own span."""
        if self.batcher is not None:
            self.batcher.capture, self.batcher.around = capture, around

    def confirm_future(self, card: str, phone: str, receipt: dict, *,
                       fits: bool = False) -> concurrent.futures.Future | None:
        """``confirm_answer`` without a thread waiting for it, for an asyncio edge
        (``await asyncio.wrap_future(future)``): the request is validated now (``InvalidArgument`` raised
        here, without touching storage), the future completes from the batch's thread with
        ``(purchase_id, answer, replayed)`` or the error. None when group commit is off (SQLite,
        ``LOYALTY_CONFIRM_BATCH=0``): call ``confirm_answer`` in a thread instead."""
        if self.batcher is None:
            return None
        request = self._confirm_request(card, phone, receipt, fits)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()   # a caller that gives up cannot cancel a write already queued

        def done(slot) -> None:
            try:
                if slot.error is not None:
                    future.set_exception(slot.error)
                elif slot.value is _ALONE:      # rare: handed back by its group; its own transaction, off this thread
                    self._alone_pool().submit(self._confirm_alone_future, request, future, slot.deadline)
                else:
                    future.set_result(self._confirm_outcome(slot.value))
            except BaseException as exc:  # noqa: BLE001 - the waiter must hear of it
                if not future.done():
                    future.set_exception(exc)

        self.batcher.submit_nowait(request, done, current_deadline())
        return future

    def _alone_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._alone_lock:
            if self._alone_executor is None:
                self._alone_executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="confirm-alone")
            return self._alone_executor

    def _confirm_alone_future(self, request: ConfirmRequest, future: concurrent.futures.Future,
                              until: float | None = None) -> None:
        try:
            with db_deadline(until):
                future.set_result(self._confirm_outcome(self._confirm_alone(request)))
        except BaseException as exc:  # noqa: BLE001 - the waiter must hear of it
            future.set_exception(exc)

    def _confirm_request(self, card: str, phone: str, receipt: dict, fits: bool = False) -> ConfirmRequest:
        """The validated request; ``InvalidArgument`` naming the field. Touches no storage (the program snapshot
        is taken by the transaction that writes)."""
        for name in ("store", "terminal", "number"):
            if not receipt[name]:
                raise InvalidArgument(f"receipt.{name}", "required to confirm: store, terminal and number "
                                                         "identify the purchase")
        if not fits:
            _check_receipt(receipt)
        ref = validate_ref(MemberRef(card, phone))
        return ConfirmRequest(receipt, ref, self.reads.receipt_at(receipt), _receipt_hash(card, phone, receipt),
                              (card, phone))

    def _confirm_outcome(self, outcome: Confirmed) -> tuple[int, dict, bool]:
        if outcome.member_id is not None:   # written now, or replayed (perhaps after a lost COMMIT reply)
            self.rt.contexts.invalidate(outcome.member_id)
        return outcome.purchase_id, outcome.answer, outcome.replayed

    @_data_errors
    def _confirm_alone(self, request: ConfirmRequest) -> Confirmed:
        """One confirm in a transaction of its own: set-based as a group of one where storage offers it
        (PostgreSQL), else (or when the group hands it back) row by row."""
        snap = self.rt.programs.current()
        if self.set_based:
            outcome = self._run_group(snap, [request])[0]
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not _ALONE:
                return outcome
        for attempt in range(2):
            try:
                return self.rt.db.run_write(self._row_by_row_tx, snap, request, idempotent=True)
            except _Retry:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _decide(self, snap: Snapshot, request: ConfirmRequest, ctx: MemberContext | None, conn, *,
                budgets: dict | None = None):
        """The core's answer for ``request`` against ``ctx`` and what it does (``effects.decide_effects``:
        ``FailedPrecondition`` when the points are not there); ``(answer, effects, now)``."""
        member = ctx.as_core(snap.program, request.at) if ctx is not None else None
        answer = self.reads.calculate(snap, request.receipt, member, conn, budgets=budgets)
        now = self.rt.clock()
        return answer, decide_effects(snap, request.receipt, ctx, answer, request.at, now), now

    # ---- row by row ---------------------------------------------------------------------------------------

    def _row_by_row_tx(self, conn, snap: Snapshot, request: ConfirmRequest) -> Confirmed:
        """The confirm in the caller's transaction, row by row (``confirm_write``): the member locked, the
        budgets read locked (``_budgets``), the purchase inserted for its id, then its other rows."""
        receipt = request.receipt
        existing = conn.execute(SELECT_PURCHASE, dict(zip(("store", "terminal", "number"), request.key))).first()
        if existing is not None:
            return self._replay_purchase(existing.id, existing.request_hash, existing.answer, request,
                                         existing.member_id)
        ctx = self.reads.load_context(conn, request.ref, snap, lock=True) if request.ref is not None else None
        answer, fx, now = self._decide(snap, request, ctx, conn)
        breaches = operation_limits.check(conn, snap.program.operation_limits, now, receipt, fx, ctx)
        row = purchase_row(snap, receipt, ctx, fx, answer, request.request_hash, now)
        try:
            purchase_id = conn.execute(INSERT_PURCHASE, row).scalar_one()
        except IntegrityError:
            raise _Retry() from None    # a concurrent confirm of the key: run again to replay its answer
        write_rows(conn, purchase_rows(snap, receipt, ctx, fx, answer, request.request_hash, now, purchase_id))
        operation_limits.record(conn, breaches, purchase_id)
        return Confirmed(purchase_id, answer, False, ctx.member_id if ctx else None)

    # ---- set-based (PostgreSQL): a group-commit batch, or one confirm as a group of one -------------------

    def _confirm_batch(self, slots: list) -> None:
        """Run the confirms of ``slots`` (``ConfirmRequest``) in ONE transaction and answer each slot: its
        ``Confirmed``, its own ``ServiceError``, or ``_ALONE`` (run it in a transaction of its own).

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
            snap = self.rt.programs.current()      # one program for the whole batch
            with db_deadline(None if until is None else max(until, now + BATCH_MIN_TIME_S)):
                outcomes = self._run_group(snap, [s.item for s in slots])
        except ServiceError as exc:             # Unavailable: storage down or a lost connection; no program
            for s in slots:
                s.fail(exc)
            return
        for s, outcome in zip(slots, outcomes):
            if isinstance(outcome, BaseException):
                s.fail(outcome)
            else:
                s.set(outcome)

    def _run_group(self, snap: Snapshot, requests: list[ConfirmRequest]) -> list:
        """``_set_based_tx`` in a transaction of its own; when it rolls back (a budget spent meanwhile, a statement
        failing), every confirm of the group is ``_ALONE``. ``Unavailable`` (storage away) is raised."""
        try:
            return self.rt.db.run_write(self._set_based_tx, snap, requests, idempotent=True)
        except ServiceError:
            raise
        except _BudgetMoved as exc:
            log.info("confirm group of %d rolled back: budget of %s spent meanwhile; running each alone",
                     len(requests), ", ".join(exc.args[0]))
        except SQLAlchemyError:     # a concurrent confirm of a key, a deadlock: each alone gets its exact answer
            log.info("confirm group of %d rolled back; running each alone", len(requests), exc_info=True)
        except Exception:  # noqa: BLE001 - a defect: still answered (alone, row by row), and loud in the log
            log.exception("confirm group of %d failed; running each alone", len(requests))
        return [_ALONE] * len(requests)

    def _set_based_tx(self, conn, snap: Snapshot, requests: list[ConfirmRequest]) -> list:
        """A group's transaction in two round trips (see ``_confirm_batch``).

        1. the stored purchases under the group's keys, the ids the new rows need, every member of the group
           locked in member id order, then (each its own statement, read after the locks) the members'
           contexts, promotion usage and what the budgets have spent (not locked);
        2. only when a confirm applied a budgeted promotion: the budgets spent by the whole group, each on
           the condition that the figures the group decided on still hold (``_PGB_SPEND_BUDGET``; when one
           does not, ``_BudgetMoved``: the group rolls back and each confirm runs alone);
        3. after the calculations, in receipt-key order (the order every group inserts its purchases in):
           every row of the group in one statement (``SetWrite``), COMMIT.

        Two confirms of one member follow each other: the second is calculated and checked against the
        member as the first one's writes leave it. Two confirms of one key: the second replays the first
        (or is ``AlreadyExists``)."""
        dconn = conn.connection.driver_connection
        n = len(requests)
        order = sorted(range(n), key=lambda i: requests[i].key)
        refs_of = [r.ref for r in requests if r.ref is not None]
        cards = sorted({ref[1] for ref in refs_of if ref[0] == "card"})
        phones = sorted({ref[1] for ref in refs_of if ref[0] == "phone"})
        promotions = snap.program.promotions
        limited = sorted(p.id for p in promotions if p.limits.uses_per_member is not None)
        budgeted = sorted(p.id for p in promotions
                          if p.limits.discount_budget is not None or p.limits.points_budget is not None)
        with driver_errors(conn):
            with dconn.pipeline():
                keys = [r.key for r in requests]
                found = dconn.execute(_PGB_EXISTING, ([k[0] for k in keys], [k[1] for k in keys],
                                                      [k[2] for k in keys]))
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
            # what the budgets had spent when read; the group's confirms add theirs (``budgets``) as they go
            spent_before = dict(budget_rows.fetchall()) if budget_rows is not None else None
            refs, state = {}, {}        # ref -> (member_id, card, status); member_id -> its live context
            for kind, value, member_id, card, status, tier, active, pending, purchases_sum in (
                    context.fetchall() if context is not None else ()):
                refs[kind, value] = (member_id, card, status)
                if member_id not in state:
                    state[member_id] = MemberContext(member_id=member_id, card=card, status=status, tier=tier,
                                                     active_points=active, pending_points=pending,
                                                     purchases_sum=purchases_sum)
            if usage is not None:
                for member_id, promotion, key, uses in usage.fetchall():
                    if member_id in state:
                        state[member_id].usage[promotion, key] = uses
        for member_id, ctx in state.items():
            ctx.audiences = self.reads.audiences(conn, member_id)
        tally = operation_limits.Tally(conn, snap.program.operation_limits, self.rt.clock())
        tally.prefetch(set(state), {r.at.date() for r in requests}, {r.key[:2] for r in requests})

        outcomes: list = [None] * n
        firsts: dict = {}           # key -> index of the confirm of this group that writes it
        writes, budgets = SetWrite(), {}    # budgets: promotion -> what this group's confirms spend of it
        checks: dict = {}           # promotion -> what the group had spent before its last confirm applying it
        for k, i in enumerate(order):
            request = requests[i]
            key, ref = request.key, request.ref
            try:
                if key in firsts:
                    first = requests[firsts[key]]
                    self._replay_purchase(None, first.request_hash, None, request)  # or AlreadyExists
                    outcomes[i] = firsts[key]
                    continue
                if key in stored:
                    pid, stored_hash, stored_answer, stored_member = stored[key]
                    outcomes[i] = self._replay_purchase(pid, stored_hash, loads(stored_answer), request,
                                                        stored_member)
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
                                        tier=live.tier, active_points=live.active_points,
                                        pending_points=live.pending_points,
                                        purchases_sum=live.purchases_sum, audiences=live.audiences,
                                        usage=live.usage)
                # the budgets as this group's earlier confirms leave them
                used = None
                if spent_before is not None:
                    used = dict(spent_before)
                    for promotion, amount in budgets.items():
                        used[promotion] = used.get(promotion, 0) + amount
                answer, fx, now = self._decide(snap, request, ctx, conn, budgets=used)
                found = tally.check(request.receipt, fx, ctx and ctx.card)
            except ServiceError as exc:
                outcomes[i] = exc
                continue
            except SQLAlchemyError:         # storage (an audience lookup): the group's failure
                raise
            except Exception as exc:  # noqa: BLE001 - this confirm's own bug, not the group's
                log.exception("confirm %s/%s/%s failed in a group", *key)
                outcomes[i] = exc
                continue
            if fx.settle:                   # a member in debt: rare, after this group in its own transaction
                outcomes[i] = _ALONE
                continue
            purchase_id, entry_a, entry_b = ids[k]
            tally.add(request.receipt, fx, found, purchase_id)
            writes.add(purchase_rows(snap, request.receipt, ctx, fx, answer, request.request_hash, now,
                                     purchase_id, (entry_a, entry_b)))
            if spent_before is not None:
                for promotion in answer["promotions"]:
                    if promotion in spent_before:
                        checks[promotion] = budgets.get(promotion, 0)
            for promotion, spent in fx.budgets:
                budgets[promotion] = budgets.get(promotion, 0) + spent
            if fx.counted:                  # what the next confirm of this member sees
                live.active_points += fx.active_delta
                live.pending_points += fx.pending_delta
                live.purchases_sum = max(live.purchases_sum + fx.metric, 0)
                if fx.upgrade:
                    live.tier = fx.reached
                for pk in fx.limited:
                    live.usage[pk] = live.usage.get(pk, 0) + 1
            firsts[key] = i
            outcomes[i] = Confirmed(purchase_id, answer, False, ctx.member_id if ctx else None)
        if writes.confirms:
            tally.record()              # the soft limits the group's confirms passed
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
            if type(outcome) is int:        # the replay of the first confirm of its key in this group
                first = outcomes[outcome]
                outcomes[i] = Confirmed(first.purchase_id, first.answer, True, None)
        return outcomes

    @staticmethod
    def _replay_purchase(purchase_id: int | None, stored_hash: str, answer: dict | None, request: ConfirmRequest,
                         member_id: int | None = None) -> Confirmed:
        """The stored answer when the payloads are the same (``request.sent``: the card and phone as sent, to
        recognise a hash stored by an earlier release, ``_legacy_hashes``); ``AlreadyExists`` otherwise.
        ``member_id`` (the stored purchase's) is the member whose cached context the caller drops: a replay
        after a lost COMMIT reply is the first answer this member's till hears of the purchase."""
        if stored_hash != request.request_hash and stored_hash not in _legacy_hashes(*request.sent, request.receipt):
            raise AlreadyExists("purchase {}/{}/{} was already confirmed with a different payload".format(*request.key))
        return Confirmed(purchase_id, answer, True, member_id)
