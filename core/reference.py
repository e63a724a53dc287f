"""The receipt engine in plain Python: the reference the compiled core (``_engine.pyx``) is tested against.

It follows docs/ENGINE.md rule by rule, written for a reader rather than for speed: one small function per
step (eligibility, floors, each effect, the split, the two stacking modes, the write-off cap and its
allocation, accrual, hints, messages), Python integers throughout (they never overflow, so no 128-bit care
is needed here), and no shared state, so one ``ReferenceEngine`` may serve many threads. It reads the
validated model of ``loyalty.core.model``; turning JSON into that model is ``loyalty.core.inputs``' job.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from .errors import InputError
from .inputs import parse_budgets_used, parse_request
from .model import Effect, Line, Member, ProductGroup, Program, Promotion, Receipt, Scope, Tier, Validity

__all__ = [
    "ReferenceEngine", "calculate_parsed",
    # building blocks, public so that tests (and curious readers) can use them one by one
    "round_half_up", "ceil_div", "split", "line_floor", "in_group", "in_scope", "promotion_order",
    "valid_at", "failed_conditions", "effect_discounts", "nth_free_discounts", "priority_walk",
    "best_for_customer", "cap_percent_bp", "write_off_cap", "accrual_points", "fixed_extra_points",
    "hint_for", "effect_text", "money_text", "quantity_text", "percent_text",
]

BP = 10000                  # basis points in 100%
HUNDREDTHS = 100            # multiplier units in x1
ANONYMOUS_STATUSES = ("suspended", "blocked")


# ---- integer arithmetic ---------------------------------------------------------------------------------

def round_half_up(num: int, den: int) -> int:
    """``round-half-up(num / den)`` for ``num >= 0``, ``den > 0`` (ENGINE "Definitions")."""
    return (2 * num + den) // (2 * den)


def ceil_div(num: int, den: int) -> int:
    """``ceil(num / den)`` for ``den > 0``."""
    return -((-num) // den)


def split(total: int, weights: Sequence[int], rooms: Sequence[int] | None = None) -> list[int]:
    """Spread ``total`` in proportion to ``weights``, largest remainder, never past a line's room.

    ``rooms=None`` means no line has a limit. Lines with no weight or no room take nothing. A line whose
    exact share is strictly over its room takes its room and leaves, and the rest is split again from scratch
    over the others; what no line can take is not given (so the result may sum to less than ``total``).
    """
    n = len(weights)
    if rooms is None:
        rooms = [total] * n     # a room of the whole total can never be exceeded: as good as infinite
    alloc = [0] * n
    active = [i for i in range(n) if weights[i] > 0 and rooms[i] > 0]
    left = total
    while active and left > 0:
        weight_sum = sum(weights[i] for i in active)
        # exact share left*w/W strictly above room, compared without division
        over = [i for i in active if left * weights[i] > rooms[i] * weight_sum]
        if over:
            for i in over:
                alloc[i] = rooms[i]
                left -= rooms[i]
            active = [i for i in active if i not in over]
            continue
        remainders = {}
        for i in active:
            alloc[i], remainders[i] = divmod(left * weights[i], weight_sum)
        spare = left - sum(alloc[i] for i in active)
        # the units lost to flooring go one each to the largest remainders, ties to the lower index
        for i in sorted(active, key=lambda j: (-remainders[j], j))[:spare]:
            alloc[i] += 1
        break
    return alloc


# ---- lines, groups, scopes ------------------------------------------------------------------------------

def base_amount(line: Line) -> int:
    """What the line costs before loyalty discounts: its amount less the POS's or a partner's discount."""
    return line.amount - line.external_discount


def line_floor(line: Line, max_discount_bp: int) -> int:
    """The lowest amount loyalty discounts may take the line to: ``min_price`` per unit, and the share of the
    base that ``max_discount_percent`` keeps, each rounded up (so the customer never pays less than either)."""
    by_min_price = ceil_div(line.min_price * line.quantity, 1000)
    by_max_discount = ceil_div(base_amount(line) * (BP - max_discount_bp), BP)
    return max(by_min_price, by_max_discount)


def is_piece_line(line: Line) -> bool:
    """Piece goods come in whole thousandths; anything else is sold by weight. (Quantity is at least 1 after
    input validation; the ``> 0`` guard only keeps a hand-built zero-quantity line out of unit counting.)"""
    return line.quantity > 0 and line.quantity % 1000 == 0


def in_group(line: Line, group: ProductGroup) -> bool:
    return line.sku in group.skus or any(c in group.categories for c in line.categories)


def in_scope(line: Line, scope: Scope, groups: dict[str, ProductGroup]) -> bool:
    """Included (no include lists at all, or matching one of them) and matching none of the exclude lists."""
    def matches(group_names, skus, categories) -> bool:
        return (any(in_group(line, groups[g]) for g in group_names)
                or line.sku in skus
                or any(c in categories for c in line.categories))

    included = scope.is_all or matches(scope.groups, scope.skus, scope.categories)
    excluded = matches(scope.exclude_groups, scope.exclude_skus, scope.exclude_categories)
    return included and not excluded


def promotion_order(promotions: Sequence[Promotion]) -> tuple[Promotion, ...]:
    """Priority descending, then id ascending (Python string order)."""
    return tuple(sorted(promotions, key=lambda p: (-p.priority, p.id)))


# ---- eligibility (step 2) -------------------------------------------------------------------------------

def valid_at(validity: Validity, receipt: Receipt) -> bool:
    """Date range (``ends`` is already exclusive in the model), weekday, hours windows, store, channel."""
    at = receipt.at
    if validity.starts is not None and at < validity.starts:
        return False
    if validity.ends is not None and at >= validity.ends:
        return False
    if validity.weekdays and at.isoweekday() not in validity.weekdays:
        return False
    if validity.hours:
        second = at.hour * 3600 + at.minute * 60 + at.second
        if not any(_in_window(second, start, end) for start, end in validity.hours):
            return False
    if validity.stores and receipt.store not in validity.stores:
        return False
    if validity.channels and receipt.channel not in validity.channels:
        return False
    return True


def _in_window(second: int, start: int, end: int) -> bool:
    if end <= start:    # a window past midnight, such as 22:00-02:00
        return second >= start or second < end
    return start <= second < end


@dataclass(frozen=True)
class Customer:
    """Who the receipt is for, as the engine sees it: suspended and blocked cards are served as anonymous."""
    anonymous: bool
    member: Member | None       # as given (also for a suspended or blocked card, for the answer's card/status)
    tier: Tier | None           # None for anonymous
    audiences: frozenset[str]   # empty for anonymous: only public promotions

    @property
    def status(self) -> str | None:
        return self.member.status if self.member is not None else None


@dataclass(frozen=True)
class ReceiptFacts:
    """What eligibility reads about the receipt, computed once."""
    receipt: Receipt
    total: int                  # T = sum(base_i) over all lines
    customer: Customer
    budgets_used: dict


def group_quantity(lines: Sequence[Line], group: ProductGroup) -> int:
    """Thousandths of all the group's lines, whatever their flags."""
    return sum(line.quantity for line in lines if in_group(line, group))


def failed_conditions(promo: Promotion, facts: ReceiptFacts, groups: dict[str, ProductGroup]) -> list[str]:
    """Every eligibility condition the promotion fails, by name (empty: eligible). All are checked, none
    short-circuits, because a hint is given only when the receipt total or the group quantity is the one
    thing missing."""
    failed = []
    customer = facts.customer
    if not valid_at(promo.valid, facts.receipt):
        failed.append("valid")
    if (not all(a in customer.audiences for a in promo.audience_include)
            or any(a in customer.audiences for a in promo.audience_exclude)):
        failed.append("audience")
    if promo.tiers and (customer.tier is None or customer.tier.name not in promo.tiers):
        failed.append("tiers")
    when = promo.when
    if when.receipt_total_at_least is not None and facts.total < when.receipt_total_at_least:
        failed.append("receipt_total_at_least")
    if when.group_quantity_at_least is not None:
        group, quantity = when.group_quantity_at_least
        if group_quantity(facts.receipt.lines, groups[group]) < quantity:
            failed.append("group_quantity_at_least")
    if when.coupon is not None and when.coupon not in facts.receipt.coupons:
        failed.append("coupon")
    if not _within_limits(promo, facts):
        failed.append("limits")
    return failed


def _within_limits(promo: Promotion, facts: ReceiptFacts) -> bool:
    limits = promo.limits
    if limits.uses_per_member is not None:
        customer = facts.customer
        if customer.anonymous:      # uses cannot be counted without a card
            return False
        usage = customer.member.usage or {}
        if usage.get(promo.id, 0) >= limits.uses_per_member:
            return False
    for budget in (limits.discount_budget, limits.points_budget):
        if budget is not None and facts.budgets_used.get(promo.id, 0) >= budget:
            return False
    return True


# ---- line discounts (step 3) ----------------------------------------------------------------------------

def effect_discounts(effect: Effect, taking: Sequence[int], lines: Sequence[Line], current: Sequence[int],
                     floors: Sequence[int]) -> dict[int, int]:
    """What one discount promotion gives each of its taking lines (index -> discount, maybe 0), each line's
    discount at most its room ``current - floor``."""
    rooms = {i: max(0, current[i] - floors[i]) for i in taking}
    kind, value = effect.kind, effect.value
    if kind == "percent_off":
        return {i: min(rooms[i], current[i] * value // BP) for i in taking}
    if kind == "amount_off" and effect.per == "receipt":
        shares = split(value, [current[i] for i in taking], [rooms[i] for i in taking])
        return dict(zip(taking, shares))
    if kind == "amount_off":      # per unit: on weight goods the value is per 1000 thousandths, floored
        return {i: min(rooms[i], value * lines[i].quantity // 1000) for i in taking}
    if kind == "fixed_price":     # the new amount is rounded like `amount`; a price above current gives nothing
        return {i: min(rooms[i], max(0, current[i] - round_half_up(value * lines[i].quantity, 1000)))
                for i in taking}
    if kind == "nth_free":
        return nth_free_discounts(value, taking, lines, current, rooms)
    raise ValueError(f"not a discount effect: {kind}")


def nth_free_discounts(n: int, taking: Sequence[int], lines: Sequence[Line], current: Sequence[int],
                       rooms: dict[int, int]) -> dict[int, int]:
    """Every n-th piece unit free, the cheapest units first.

    Units are counted on all taking piece lines (a line at its floor still counts towards the free units,
    it just cannot give one); weight lines neither count nor give."""
    pieces = [i for i in taking if is_piece_line(lines[i])]
    units = {i: lines[i].quantity // 1000 for i in pieces}
    free_left = sum(units.values()) // n
    # the current unit price as an exact fraction: the same order as comparing current_i*u_j with current_j*u_i
    cheapest_first = sorted(pieces, key=lambda i: (Fraction(current[i], units[i]), i))
    given = {}
    for i in cheapest_first:
        if free_left == 0:
            break
        if rooms[i] == 0:
            continue
        k = min(free_left, units[i])
        free_left -= k
        given[i] = min(rooms[i], current[i] * k // units[i])
    return given


def priority_walk(promos: Sequence[Promotion], lines: Sequence[Line], floors: Sequence[int],
                  scopes: dict[str, list[bool]]) -> list[list[tuple[str, int]]]:
    """The ``priority`` cascade over ``promos`` (discount promotions, in promotion order): per line, the list
    of (promotion id, discount > 0) it received.

    Each promotion is computed across all its taking lines at its place, so a receipt-level effect sees the
    amounts left by the promotions before it. An exclusive promotion takes only lines with no discount yet,
    and a line it discounts takes nothing after it."""
    current = [base_amount(line) for line in lines]
    given: list[list[tuple[str, int]]] = [[] for _ in lines]
    ended = [False] * len(lines)
    for promo in promos:
        taking = [i for i, line in enumerate(lines)
                  if scopes[promo.id][i] and not line.no_discount and not ended[i]
                  and not (promo.exclusive and given[i])]
        for i, discount in effect_discounts(promo.effect, taking, lines, current, floors).items():
            if discount > 0:
                current[i] -= discount
                given[i].append((promo.id, discount))
                if promo.exclusive:
                    ended[i] = True
    return given


def best_for_customer(promos: Sequence[Promotion], lines: Sequence[Line], floors: Sequence[int],
                      scopes: dict[str, list[bool]]) -> list[list[tuple[str, int]]]:
    """Per line, the best of: the cascade of all non-exclusive promotions, and each exclusive one alone on the
    base amounts. The largest total discount wins; a tie goes to the candidate whose first promotion comes
    earlier in promotion order (``promos`` is in that order)."""
    rank = {promo.id: r for r, promo in enumerate(promos)}
    cascade = priority_walk([p for p in promos if not p.exclusive], lines, floors, scopes)
    # a walk of one promotion is exactly "that promotion alone on the base amounts"
    alone = [priority_walk([p], lines, floors, scopes) for p in promos if p.exclusive]
    result = []
    for i in range(len(lines)):
        candidates = [c for c in [cascade[i]] + [walk[i] for walk in alone] if c]
        if not candidates:
            result.append([])
            continue
        best = min(candidates, key=lambda c: (-sum(d for _, d in c), rank[c[0][0]]))
        result.append(best)
    return result


# ---- write-off (steps 4-5) ------------------------------------------------------------------------------

def cap_percent_bp(program: Program, tier: Tier | None, lines: Sequence[Line]) -> int:
    """The tier's cap (else the program's), lowered by every ``reduced`` threshold that the receipt's external
    discount share is strictly over; a reduction never raises the cap. The share is the whole receipt's,
    ``no_redeem`` lines included: a partner's discount is on the receipt whatever points may pay."""
    cap_bp = tier.redeem_max_bp if tier is not None and tier.redeem_max_bp is not None else program.redeem_max_bp
    external = sum(line.external_discount for line in lines)
    amount = sum(line.amount for line in lines)
    for threshold_bp, max_bp in program.reduced:
        if amount > 0 and external * BP > threshold_bp * amount:
            cap_bp = min(cap_bp, max_bp)
    return cap_bp


def write_off_cap(program: Program, tier: Tier | None, lines: Sequence[Line], payable: Sequence[int]) -> int:
    """``cap_amount``: the cap's share of the redeemable payable sum, and no more than the lines can give while
    each keeps ``min_payable_per_line``."""
    cap_bp = cap_percent_bp(program, tier, lines)
    redeemable = [i for i, line in enumerate(lines) if not line.no_redeem]
    payable_sum = sum(payable[i] for i in redeemable)
    by_percent = payable_sum * cap_bp // BP
    by_rooms = sum(max(0, payable[i] - program.min_payable_per_line) for i in redeemable)
    return min(by_percent, by_rooms)


def allocate_write_off(program: Program, lines: Sequence[Line], payable: Sequence[int], applied: int) -> list[int]:
    """``applied x point_value`` over the redeemable lines by payable, each keeping ``min_payable_per_line``."""
    redeemable = [i for i, line in enumerate(lines) if not line.no_redeem]
    shares = split(applied * program.point_value,
                   [payable[i] for i in redeemable],
                   [payable[i] - program.min_payable_per_line for i in redeemable])
    redeemed = [0] * len(lines)
    for i, share in zip(redeemable, shares):
        redeemed[i] = share
    return redeemed


# ---- accrual (step 6) -----------------------------------------------------------------------------------

def accrual_points(money: Sequence[int], rate_bp: Sequence[int], mult: Sequence[int], point_value: int) -> list[int]:
    """Rate points: ``floor`` of the receipt's exact sum, spread back by the largest remainder of each line's
    exact points (ties to the lower index). ``money[i]`` is 0 for lines that earn nothing."""
    denominator = BP * HUNDREDTHS * point_value
    numerators = [m * r * x for m, r, x in zip(money, rate_bp, mult)]
    receipt_points = sum(numerators) // denominator
    points = [n // denominator for n in numerators]
    spare = receipt_points - sum(points)
    by_remainder = sorted(range(len(money)), key=lambda i: (-(numerators[i] % denominator), i))
    for i in by_remainder[:spare]:
        points[i] += 1
    return points


def fixed_extra_points(effect: Effect, lines: Sequence[Line], payable: Sequence[int],
                       earning_in_scope: Sequence[int]) -> dict[int, int]:
    """``extra_points: P`` on the earning lines in scope: per receipt split by payable (no rooms), per unit
    ``P`` for each piece unit (weight lines get nothing)."""
    if effect.per == "unit":
        return {i: effect.value * (lines[i].quantity // 1000) for i in earning_in_scope if is_piece_line(lines[i])}
    shares = split(effect.value, [payable[i] for i in earning_in_scope])
    return dict(zip(earning_in_scope, shares))


# ---- hints and texts ------------------------------------------------------------------------------------

def money_text(value: int) -> str:
    return f"{value // 100}.{value % 100:02d}"


def quantity_text(quantity: int) -> str:
    if quantity % 1000 == 0:
        return f"{quantity // 1000} pcs"
    return f"{quantity // 1000}.{quantity % 1000:03d} kg"


def percent_text(hundredths: int) -> str:
    """Hundredths as a plain decimal without trailing zeros: 2000 -> "20", 1250 -> "12.5", 1205 -> "12.05"."""
    whole, fraction = divmod(hundredths, 100)
    return str(whole) if fraction == 0 else f"{whole}.{fraction:02d}".rstrip("0")


def effect_text(effect: Effect) -> str:
    kind, value = effect.kind, effect.value
    if kind == "percent_off":
        return f"{percent_text(value)}% off"
    if kind == "amount_off":
        return f"{money_text(value)} off" + (" per unit" if effect.per == "unit" else "")
    if kind == "fixed_price":
        return f"price {money_text(value)}"
    if kind == "nth_free":
        return f"1 of every {value} units free"
    if kind == "points_multiplier":
        return f"x{percent_text(value)} points"
    if kind == "extra_points_percent":
        return f"+{percent_text(value)}% points"
    if kind == "extra_points":
        return f"+{value} points"
    raise ValueError(f"unknown effect: {kind}")


def hint_for(promo: Promotion, failed: Sequence[str], facts: ReceiptFacts, groups: dict[str, ProductGroup],
             within_bp: int) -> dict | None:
    """A cashier hint when the receipt total or the group quantity is the only thing the promotion misses,
    and the gap is within ``within_bp`` of the threshold."""
    if not promo.effect.is_discount and facts.customer.anonymous:
        return None     # points promotions are hinted only to members
    if list(failed) == ["receipt_total_at_least"]:
        value = promo.when.receipt_total_at_least
        missing = value - facts.total
        if 0 < missing <= value * within_bp // BP:
            return {"promotion": promo.id, "condition": "receipt_total_at_least", "missing": missing,
                    "message": f"add {money_text(missing)} to get {effect_text(promo.effect)}"}
    elif list(failed) == ["group_quantity_at_least"]:
        group, quantity = promo.when.group_quantity_at_least
        missing = quantity - group_quantity(facts.receipt.lines, groups[group])
        if 0 < missing <= quantity * within_bp // BP:
            return {"promotion": promo.id, "condition": "group_quantity_at_least", "missing": missing,
                    "message": f"add {quantity_text(missing)} of {group} to get {effect_text(promo.effect)}"}
    return None


def messages_for(customer: Customer, receipt: Receipt, max_points: int) -> list[str]:
    member = customer.member
    requested = receipt.redeem_points
    if member is None:
        return ["no card: points cannot be written off"] if requested > 0 else []
    who = f"card {member.card}" if member.card else "member"
    if member.status in ANONYMOUS_STATUSES:
        return [f"{who} is {member.status}: served as anonymous"]
    if member.status == "restricted":
        return [f"{who} is restricted: points cannot be written off"] if requested > 0 else []
    if requested > max_points:
        return [f"requested {requested} points, {max_points} can be written off"]
    return []


def next_tier(program: Program, held: Tier | None, purchases_sum: int | None,
              payable_total: int) -> tuple[str | None, int | None]:
    """The first level above both the tier held and the tier metric after this receipt, and how far it is
    (a Gold member whose metric fell is not shown Silver as the next step)."""
    if purchases_sum is None:
        return None, None
    metric = purchases_sum + payable_total
    floor = held.threshold if held is not None else -1
    for level in program.tiers.levels:
        if level.threshold > metric and level.threshold > floor:
            return level.name, level.threshold - metric
    return None, None


# ---- the engine -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Prepared:
    """What depends on the program only: promotions in order, groups and tiers by name."""
    program: Program
    promotions: tuple[Promotion, ...]
    groups: dict[str, ProductGroup]
    tiers: dict[str, Tier]

    @classmethod
    def of(cls, program: Program) -> _Prepared:
        return cls(program=program, promotions=promotion_order(program.promotions),
                   groups={g.name: g for g in program.product_groups},
                   tiers={t.name: t for t in program.tiers.levels})


def _customer(prepared: _Prepared, member: Member | None) -> Customer:
    if member is None or member.status in ANONYMOUS_STATUSES:
        return Customer(anonymous=True, member=member, tier=None, audiences=frozenset())
    levels = prepared.program.tiers.levels
    if member.tier is None:
        tier = levels[0] if levels else None     # the model's "None: the lowest tier"
    elif member.tier in prepared.tiers:
        tier = prepared.tiers[member.tier]
    else:
        raise InputError("member.tier", f"unknown tier {member.tier!r}")
    return Customer(anonymous=False, member=member, tier=tier, audiences=frozenset(member.audiences))


def _calculate(prepared: _Prepared, receipt: Receipt, member: Member | None, budgets_used: dict | None) -> dict:
    program, groups = prepared.program, prepared.groups
    lines = receipt.lines
    customer = _customer(prepared, member)
    facts = ReceiptFacts(receipt=receipt, total=sum(base_amount(line) for line in lines), customer=customer,
                         budgets_used=budgets_used or {})

    # step 2: eligibility, and hints for the near misses
    eligible: list[Promotion] = []
    hints: list[dict] = []
    for promo in prepared.promotions:
        failed = failed_conditions(promo, facts, groups)
        if not failed:
            if promo.effect.is_discount or not customer.anonymous:
                eligible.append(promo)
        else:
            hint = hint_for(promo, failed, facts, groups, program.hint_within_bp)
            if hint is not None:
                hints.append(hint)
    scopes = {promo.id: [in_scope(line, promo.scope, groups) for line in lines] for promo in eligible}

    # step 3: line discounts
    floors = [line_floor(line, program.max_discount_bp) for line in lines]
    discount_promos = [p for p in eligible if p.effect.is_discount]
    if program.stacking == "best_for_customer":
        discounts = best_for_customer(discount_promos, lines, floors, scopes)
    else:
        discounts = priority_walk(discount_promos, lines, floors, scopes)
    payable = [base_amount(line) - sum(d for _, d in given) for line, given in zip(lines, discounts)]

    # steps 4-5: write-off
    if not customer.anonymous and member.status == "active":
        cap_amount = write_off_cap(program, customer.tier, lines, payable)
        max_points = min(cap_amount // program.point_value, member.active_points)
    else:
        max_points = 0      # restricted cards earn only; anonymous receipts have no points
    applied = min(receipt.redeem_points, max_points)
    redeemed = allocate_write_off(program, lines, payable, applied)

    # step 6: accrual
    points = [0] * len(lines)
    points_promos_applied: set[str] = set()
    if not customer.anonymous:
        points, points_promos_applied = _accrue(program, customer.tier, lines, payable, redeemed,
                                                [p for p in eligible if not p.effect.is_discount], scopes)

    # step 7: the answer
    gave_discount = {pid for given in discounts for pid, _ in given}
    applied_ids = [p.id for p in eligible if p.id in gave_discount or p.id in points_promos_applied]
    answer_lines = [
        {"sku": line.sku, "amount": line.amount, "external_discount": line.external_discount,
         "discounts": [{"promotion": pid, "amount": d} for pid, d in given],
         "payable": payable[i], "redeemed": redeemed[i], "points": points[i]}
        for i, (line, given) in enumerate(zip(lines, discounts))
    ]
    totals = {
        "amount": sum(line.amount for line in lines),
        "external_discount": sum(line.external_discount for line in lines),
        "discount": sum(d for given in discounts for _, d in given),
        "payable": sum(payable),
        "max_points": max_points,
        "redeemed_points": applied,
        "redeemed_amount": sum(redeemed),
        "accrued_points": sum(points),
    }
    return {
        "lines": answer_lines,
        "totals": totals,
        "promotions": applied_ids,
        "hints": hints,
        "messages": messages_for(customer, receipt, max_points),
        "member": _member_answer(program, customer, applied, totals),
    }


def _accrue(program: Program, tier: Tier | None, lines: Sequence[Line], payable: Sequence[int],
            redeemed: Sequence[int], points_promos: Sequence[Promotion],
            scopes: dict[str, list[bool]]) -> tuple[list[int], set[str]]:
    """Points per line (rate points plus fixed extra points) and the points promotions that took part: every
    eligible one with an earning line in its scope, exclusive or not."""
    n = len(lines)
    earning = [not line.no_accrual for line in lines]
    money = [0] * n
    for i in range(n):
        if earning[i]:
            money[i] = payable[i] if program.on_redeemed_part else payable[i] - redeemed[i]
    tier_bp = tier.accrual_bp if tier is not None else 0
    rate_bp = [tier_bp] * n
    mult = [HUNDREDTHS] * n
    took_part: set[str] = set()
    fixed: list[Promotion] = []
    for promo in points_promos:
        in_promo = [i for i in range(n) if earning[i] and scopes[promo.id][i]]
        if not in_promo:
            continue
        took_part.add(promo.id)
        if promo.effect.kind == "extra_points_percent":
            for i in in_promo:
                rate_bp[i] += promo.effect.value
        elif promo.effect.kind == "points_multiplier":
            for i in in_promo:
                mult[i] = max(mult[i], promo.effect.value)
        else:
            fixed.append(promo)
    points = accrual_points(money, rate_bp, mult, program.point_value)
    for promo in fixed:     # added on top of the rounded rate points
        in_promo = [i for i in range(n) if earning[i] and scopes[promo.id][i]]
        for i, extra in fixed_extra_points(promo.effect, lines, payable, in_promo).items():
            points[i] += extra
    return points, took_part


def _member_answer(program: Program, customer: Customer, applied: int, totals: dict) -> dict:
    member = customer.member
    if customer.anonymous:
        return {"card": member.card if member is not None else None, "status": customer.status, "tier": None,
                "anonymous": True, "active_before": 0, "active_after": 0, "pending_before": 0,
                "pending_after": 0, "next_tier": None, "to_next_tier": None}
    tier_name, to_next = next_tier(program, customer.tier, member.purchases_sum, totals["payable"])
    return {"card": member.card, "status": member.status,
            "tier": customer.tier.name if customer.tier is not None else None, "anonymous": False,
            "active_before": member.active_points, "active_after": member.active_points - applied,
            "pending_before": member.pending_points,
            "pending_after": member.pending_points + totals["accrued_points"],
            "next_tier": tier_name, "to_next_tier": to_next}


def calculate_parsed(program: Program, receipt: Receipt, member: Member | None,
                     budgets_used: dict | None = None) -> dict:
    """The whole engine on validated model objects: the answer of docs/ENGINE.md "Answer"."""
    return _calculate(_Prepared.of(program), receipt, member, budgets_used)


class ReferenceEngine:
    """The pure-Python engine with the compiled ``Engine``'s API. Immutable after construction; holds nothing
    per request, so one instance may serve any number of threads."""

    __slots__ = ("program", "_prepared")

    def __init__(self, program: Program):
        self.program = program
        self._prepared = _Prepared.of(program)

    def calculate(self, receipt: dict, member: dict | None = None, budgets_used: dict | None = None) -> dict:
        parsed_receipt, parsed_member = parse_request(receipt, member, self.program)
        return _calculate(self._prepared, parsed_receipt, parsed_member, parse_budgets_used(budgets_used))

    def __repr__(self) -> str:
        return f"ReferenceEngine(program={self.program.name!r})"
