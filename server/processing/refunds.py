"""RefundPurchase and CancelPurchase: what a return gives back (worked out before anything is written), written
once per refund id."""
from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from sqlalchemy import bindparam, case, func, insert, select, update

from loyalty.core.inputs import parse_at
from loyalty.v1 import processing_pb2

from .. import ledger
from ..dialects import dialect_of
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..limits import KEY_LIMIT, REASON_LIMIT
from ..members import check_text, in_tier_window, period_key
from ..models import ledger as ledger_entries, promotion_budgets, promotion_usage, purchase_lines, purchases, refunds
from ..runtime import Runtime
from .common import _data_errors, _hash
from .context import Reads


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


class Refunds:
    """RefundPurchase and CancelPurchase: what a return gives back, written once per refund id."""

    def __init__(self, rt: Runtime, reads: Reads):
        self.rt, self.reads = rt, reads

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
        refund_id = check_text("refund_id", request.refund_id.strip(), KEY_LIMIT)
        if not refund_id:
            raise InvalidArgument("refund_id", "required: the idempotency key of this refund")
        if refund_id.startswith("cancel:"):
            raise InvalidArgument("refund_id", "the prefix 'cancel:' is reserved")
        check_text("reason", request.reason, REASON_LIMIT)
        key = self.reads.purchase_key(request.purchase, "purchase")
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
        response, member_id = self.reads.write_replaying(
            self._refund_tx, refund_id, key, wanted, request.all_remaining, request.reason, _hash(request),
            False)
        self.rt.contexts.invalidate(member_id)
        return processing_pb2.RefundPurchaseResponse(**response)

    @_data_errors
    def cancel_purchase(self, request) -> processing_pb2.CancelPurchaseResponse:
        """Reverse what is left of a confirmed purchase, as a final refund does (promotion uses and discount
        budgets come back too). Idempotent by the purchase: calling it again (or concurrently) returns the
        stored answer with ``replayed=True``."""
        key = self.reads.purchase_key(request.purchase, "purchase")
        check_text("reason", request.reason, REASON_LIMIT)
        response, member_id = self.reads.write_replaying(
            self._refund_tx, None, key, {}, True, request.reason, "", True)
        self.rt.contexts.invalidate(member_id)
        response.pop("refund_id")
        response.pop("final")
        return processing_pb2.CancelPurchaseResponse(**response)

    def _refund_tx(self, conn, refund_id: str | None, key: tuple, wanted: dict, all_remaining: bool, reason: str,
                   request_hash: str, cancel: bool):
        """One refund (``cancel``: the purchase's cancellation, keyed ``cancel:<purchase id>``). The
        idempotency key is checked again once the purchase row is locked, so a concurrent call with the same
        key waits for the first one and replays it."""
        ops = dialect_of(conn)
        if not cancel:
            done = self._stored_refund(conn, refund_id, request_hash)
            if done is not None:
                return done
        stmt = select(purchases).where(purchases.c.store == key[0], purchases.c.terminal == key[1],
                                       purchases.c.number == key[2])
        purchase = conn.execute(ops.lock(stmt)).first()
        if purchase is None:
            raise NotFound(f"purchase {'/'.join(key)} was not found")
        if cancel:
            refund_id = f"cancel:{purchase.id}"
        if cancel or ops.locks_rows:       # (SQLite: the write lock was held since the first check)
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
        now = self.rt.clock()
        if member_id is not None and (ret.returned_points or ret.taken_back_points or ret.payable):
            ctx = self.reads.lock_balance(conn, member_id)
            active_delta = pending_delta = 0
            if ret.taken_back_points:
                from_pending, from_active = ledger.take_back(conn, member_id, ret.taken_back_points, purchase.id)
                ledger.add_entry(conn, key=f"refund:{refund_id}:reversal", member_id=member_id, kind="reversal",
                                 active_delta=-from_active, pending_delta=-from_pending, now=now,
                                 purchase_id=purchase.id, refund_id=refund_id, reason=reason)
                active_delta -= from_active
                pending_delta -= from_pending
            if ret.returned_points:
                program = self.rt.programs.current().program
                entry = ledger.add_entry(conn, key=f"refund:{refund_id}:refund", member_id=member_id, kind="refund",
                                         active_delta=ret.returned_points, now=now, purchase_id=purchase.id,
                                         refund_id=refund_id, reason=reason)
                ledger.new_lot(conn, member_id=member_id, points=ret.returned_points, entry_id=entry,
                               state="active", activates_at=now,
                               expires_at=now + dt.timedelta(days=program.expiry_days) if program.expiry_days
                               else None)
                active_delta += ret.returned_points
            try:
                in_window = in_tier_window(self.rt.programs.current().program, purchase.receipt_date, now)
            except FailedPrecondition:
                in_window = True
            ledger.move_balance(conn, member_id, active=active_delta, pending=pending_delta,
                                purchases_sum=-ret.payable if in_window else 0, now=now)
            if ret.returned_points:
                ledger.settle_debt(conn, member_id, ctx[0] + active_delta)
            balance = (ctx[0] + active_delta, ctx[1] + pending_delta)
        elif member_id is not None:
            balance = self.reads.lock_balance(conn, member_id)
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
        self.reads.event(conn, "refund", member_id, now, key=f"refund:{refund_id}", refund_id=refund_id,
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
        program = self.reads.program_version(conn, purchase.program_version)
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
        self.reads.budget_cache = None
