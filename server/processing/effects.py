"""What a confirmed receipt does, decided once before anything is written: the balance check and the amounts
(``decide_effects``), then every row it writes (``purchase_rows``). The two writers only carry the rows out: row
by row through ``ledger`` (``confirm_write``) or set-based on PostgreSQL, alone or for a group-commit batch
(``confirm_sql``)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from loyalty.core.inputs import parse_receipt_time

from ..errors import FailedPrecondition
from ..members import MemberContext, in_tier_window, period_key, tier_for, tier_threshold
from ..programs import Snapshot


@dataclass(slots=True)
class Effects:
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


def activates_at(program, moment: dt.datetime, now: dt.datetime) -> dt.datetime:
    """When a receipt's points become active (SPEC 6): ``activation_days`` after the receipt's moment, at once
    (``now``) when that is already past; a receipt a little ahead of the server (a fast till) counts from now."""
    return max(min(moment, now) + dt.timedelta(days=program.activation_days), now)


def decide_effects(snap: Snapshot, receipt: dict, ctx: MemberContext | None, answer: dict, at, now) -> Effects:
    """The balance check (``FailedPrecondition`` with ``available_points``) and every amount the writes need."""
    program = snap.program
    totals, state = answer["totals"], answer["member"]
    counted = ctx is not None and not state["anonymous"]     # suspended / blocked cards are anonymous
    if counted and ctx.status == "active" and receipt["redeem_points"] > max(ctx.active_points, 0):
        available = max(ctx.active_points, 0)
        raise FailedPrecondition(
            f"not enough points: {receipt['redeem_points']} requested, {available} available",
            available_points=available)
    local, moment = parse_receipt_time(receipt["at"])      # validated with the request
    fx = Effects(counted=counted, member_id=ctx.member_id if counted else None, receipt_time=moment,
                  receipt_date=local.date(), metric=0, redeemed=0, accrued=0, is_pending=False, activates=None,
                  expires=None, active_delta=0, pending_delta=0, tier_before="",
                  reached="", upgrade=False, new_sum=0, settle=False, limited=[], budgets=[])
    if counted:
        fx.redeemed, fx.accrued = totals["redeemed_points"], totals["accrued_points"]
        fx.active_delta -= fx.redeemed
        if fx.accrued:
            # pending for the return window, or active at once for a receipt confirmed late; expiry counts from
            # activation
            fx.activates = activates_at(program, moment, now)
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
        fx.settle = bool(fx.accrued and not fx.pending_delta and ctx.active_points < 0)
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


@dataclass(slots=True)
class Entry:
    """One ledger entry of a confirm: its unique ``key`` (a retry cannot write it twice) and what it moves."""
    key: str
    kind: str                   # "redemption" or "accrual"
    active_delta: int
    pending_delta: int
    id: int | None = None       # drawn from the sequence beforehand by the set-based writer; None: the insert's


@dataclass(slots=True)
class NewLot:
    """The lot a confirm's accrual creates (its entry is the confirm's accrual ``Entry``)."""
    points: int
    state: str                  # "pending" (the return window) or "active" (a receipt confirmed late)
    activates_at: dt.datetime
    expires_at: dt.datetime | None


@dataclass(slots=True)
class PurchaseRows:
    """Every row one confirm writes, decided here once; the writers (row by row through ``ledger``,
    ``confirm_write.write_rows``, or set-based on PostgreSQL, ``confirm_sql.SetWrite``) only carry them out.

    The ledger's rules, in the order they apply: the points written off (``redeemed``) come from the member's
    active lots, earliest-expiring first (``ledger.WRITE_OFF_ORDER``), booked by a ``redemption`` entry; the
    points accrued make one lot (``lot``), pending or active, booked by an ``accrual`` entry; the balance moves by
    ``active_delta`` / ``pending_delta`` (the tier metric by ``metric``, the tier to ``tier`` on an upgrade); a
    member in debt whose new points are active at once settles it (``settle``: the active lots then hold what
    the balance says, ``ledger.settle_debt``)."""
    purchase_id: int | None
    member_id: int | None       # None: an anonymous (or suspended / blocked card's) purchase; no ledger rows
    purchase: dict              # the ``purchases`` row, by column name (without ``id``)
    lines: list[dict]           # the ``purchase_lines`` rows, by column name (without ``purchase_id``)
    redeemed: int
    entries: list[Entry]
    lot: NewLot | None
    active_delta: int
    pending_delta: int
    metric: int
    tier: str | None
    settle: bool
    active_after: int           # the member's active points once written (what ``settle`` leaves in the lots)
    usage: list[tuple[str, str]]    # (promotion, period key) used once more
    budgets: list[tuple[str, int]]  # (promotion, amount) spent, in program order (the order budgets are locked in)
    events: list[tuple[str, str, dict]]     # (kind, key, payload), in the order they are written
    now: dt.datetime


def purchase_row(snap: Snapshot, receipt: dict, ctx: MemberContext | None, fx: Effects, answer: dict,
                 request_hash: str, now: dt.datetime) -> dict:
    """The ``purchases`` row of a confirm, by column name (without ``id``)."""
    totals = answer["totals"]
    return {"store": receipt["store"], "terminal": receipt["terminal"], "number": receipt["number"],
            "member_id": fx.member_id, "card": ctx.card if ctx else None, "program_version": snap.version,
            "request_hash": request_hash, "answer": answer, "receipt_at": receipt.get("at", ""),
            "receipt_time": fx.receipt_time, "receipt_date": fx.receipt_date,
            "amount": totals["amount"], "discount": totals["discount"], "payable": totals["payable"],
            "redeemed_points": totals["redeemed_points"], "redeemed_amount": totals["redeemed_amount"],
            "accrued_points": totals["accrued_points"], "refunded_payable": 0, "refunded_amount": 0,
            "returned_points": 0, "taken_back_points": 0, "status": "confirmed", "created_at": now}


def purchase_rows(snap: Snapshot, receipt: dict, ctx: MemberContext | None, fx: Effects, answer: dict,
                  request_hash: str, now: dt.datetime, purchase_id: int | None,
                  entry_ids: tuple[int, int] | tuple[None, None] = (None, None)) -> PurchaseRows:
    """The rows of one confirm. ``purchase_id`` / ``entry_ids`` (redemption, accrual): the ids the set-based
    writer drew beforehand; the row-by-row writer inserts ``purchase_row`` first and passes its id, entries
    None."""
    rlines = receipt["lines"]
    entries = []
    if fx.redeemed:
        entries.append(Entry(f"purchase:{purchase_id}:redemption", "redemption", -fx.redeemed, 0, entry_ids[0]))
    lot = None
    if fx.accrued:
        entries.append(Entry(f"purchase:{purchase_id}:accrual", "accrual", 0 if fx.is_pending else fx.accrued,
                             fx.accrued if fx.is_pending else 0, entry_ids[1]))
        lot = NewLot(fx.accrued, "pending" if fx.is_pending else "active", fx.activates, fx.expires)
    return PurchaseRows(
        purchase_id=purchase_id, member_id=fx.member_id,
        purchase=purchase_row(snap, receipt, ctx, fx, answer, request_hash, now),
        lines=[{"line": i, "sku": ln["sku"], "quantity": rlines[i]["quantity"], "amount": ln["amount"],
                "payable": ln["payable"], "redeemed": ln["redeemed"], "points": ln["points"],
                "refunded_quantity": 0, "refunded_payable": 0, "refunded_redeemed": 0, "refunded_points": 0}
               for i, ln in enumerate(answer["lines"])],
        redeemed=fx.redeemed if fx.counted else 0, entries=entries if fx.counted else [],
        lot=lot if fx.counted else None, active_delta=fx.active_delta, pending_delta=fx.pending_delta,
        metric=fx.metric, tier=fx.reached if fx.upgrade else None, settle=fx.settle,
        active_after=(ctx.active_points + fx.active_delta) if fx.counted else 0, usage=list(fx.limited),
        budgets=list(fx.budgets), events=_confirm_events(purchase_id, snap, receipt, ctx, fx, answer), now=now)


def _confirm_events(purchase_id: int | None, snap: Snapshot, receipt: dict, ctx, fx: Effects,
                    answer: dict) -> list[tuple[str, str, dict]]:
    """(kind, key, payload) of the events a confirm emits (for its member, ``fx.member_id``), in order."""
    out = []
    if fx.upgrade:
        out.append(("tier_changed", f"tier:purchase:{purchase_id}",
                    {"card": ctx.card, "tier_before": fx.tier_before, "tier": fx.reached,
                     "purchases_sum": fx.new_sum, "reason": "purchase"}))
    totals = answer["totals"]
    out.append(("purchase_confirmed", f"purchase_confirmed:{purchase_id}",
                {"purchase_id": str(purchase_id), "card": ctx.card if ctx else None, "store": receipt["store"],
                 "terminal": receipt["terminal"], "number": receipt["number"], "payable": totals["payable"],
                 "redeemed_points": totals["redeemed_points"], "accrued_points": totals["accrued_points"],
                 "promotions": answer["promotions"], "program_version": snap.version,
                 "at": fx.receipt_time.isoformat()}))
    return out
