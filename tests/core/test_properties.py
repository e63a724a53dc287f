"""Properties every answer must have, checked with Hypothesis on generated programs and receipts, for both
the compiled core and the reference.

Both implementations run every property through the session fixture ``engine_cls`` of ``conftest.py``.
The generator (``loyalty.core.workload``) is driven by a Hypothesis-controlled ``Random``, so a failure
shrinks to a small program and receipt. Each property is recomputed here from the request and the program
dict alone (SPEC section 4, docs/ENGINE.md), never from the engine's internals: what was allocated sums
exactly, no line goes below its floor, the write-off respects the request, the balance and the cap
formula, nothing is negative, and best_for_customer never gives a line less than priority (for programs
without receipt-level effects, see ``test_best_for_customer_never_gives_a_line_less_than_priority``).
"""
from __future__ import annotations

import copy
import json
import random
from decimal import Decimal

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from loyalty.core import program_from_dict, workload

PRODUCTS = workload.catalogue(400, 24, seed=7)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RECEIPT_LEVEL_FREE = workload.ALL - set(workload.RECEIPT_LEVEL_KINDS)


@st.composite
def cases(draw, features=workload.ALL, max_promotions=25, min_lines=1, max_lines=12):
    """(program dict, (receipt, member, budgets_used)) drawn through the seeded workload generator."""
    # A Hypothesis-driven Random shrinks well but runs out of entropy on long receipts: there, a seed.
    if max_lines > 50:
        rng = random.Random(draw(st.integers(0, 2**32)))
    else:
        rng = draw(st.randoms(use_true_random=False))
    n_promotions = draw(st.integers(0, max_promotions))
    n_lines = draw(st.integers(min_lines, max_lines))
    program = workload.random_program(rng, n_promotions, features=features, products=PRODUCTS)
    request = workload.random_request(rng, program, n_lines, products=PRODUCTS)
    return program, request


def _note(text: str) -> None:
    """Hypothesis prints notes with a falsifying example; outside a Hypothesis test there is none."""
    try:
        note(text)
    except InvalidArgument:
        pass


def calculate(engine_cls, program: dict, request) -> dict:
    _note(f"program = {json.dumps(program, default=str)}")
    _note(f"request = {json.dumps(request)}")
    receipt, member, budgets = copy.deepcopy(request)
    answer = engine_cls(program_from_dict(copy.deepcopy(program))).calculate(receipt, member, budgets)
    _note(f"answer = {json.dumps(answer)}")
    return answer


# ---- independent arithmetic from the program dict (SPEC 4, ENGINE.md) -----------------------------------

def bp(percent) -> int:
    """A program percentage (``12.5``) in basis points, exactly."""
    return int(Decimal(str(percent)) * 100)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def line_amount(line: dict) -> int:
    return line["amount"] if "amount" in line else (2 * line["quantity"] * line["price"] + 1000) // 2000


def line_floor(program: dict, line: dict) -> int:
    base = line_amount(line) - line.get("external_discount", 0)
    max_discount = bp(program.get("max_discount_percent", 100))
    return max(ceil_div(line.get("min_price", 0) * line["quantity"], 1000),
               ceil_div(base * (10000 - max_discount), 10000))


def member_tier(program: dict, member: dict) -> dict:
    levels = program["tiers"]["levels"]
    name = member.get("tier") or levels[0]["name"]
    return next(level for level in levels if level["name"] == name)


def status_of(member: dict | None) -> str | None:
    return None if member is None else member.get("status", "active")


def is_anonymous(member: dict | None) -> bool:
    return status_of(member) in (None, "suspended", "blocked")


def expected_max_points(program: dict, request, answer: dict) -> int:
    """SPEC 4 step 4 over the answer's payable amounts: the cap formula and the balance."""
    receipt, member, _ = request
    if status_of(member) != "active":
        return 0
    redeem = program.get("redeem", {})
    tier = member_tier(program, member)
    cap_bp = bp(tier["redeem_max_percent"]) if tier.get("redeem_max_percent") is not None \
        else bp(redeem.get("max_percent", 100))
    # The external share is the whole receipt's (no_redeem lines too); the cap's amounts are the redeemable lines'.
    external = sum(line.get("external_discount", 0) for line in receipt["lines"])
    amount = sum(line_amount(line) for line in receipt["lines"])
    pairs = [(line, out) for line, out in zip(receipt["lines"], answer["lines"]) if not line.get("no_redeem")]
    for threshold in redeem.get("reduced", []):
        if amount > 0 and external * 10000 > bp(threshold["external_discount_over_percent"]) * amount:
            cap_bp = min(cap_bp, bp(threshold["max_percent"]))
    min_payable = redeem.get("min_payable_per_line", 0)
    payable = sum(out["payable"] for _, out in pairs)
    cap_amount = min(payable * cap_bp // 10000, sum(max(0, out["payable"] - min_payable) for _, out in pairs))
    return min(cap_amount // program.get("point_value", 100), member.get("active_points", 0))


def check_answer(program: dict, request, answer: dict) -> None:
    receipt, member, _ = request
    point_value = program.get("point_value", 100)
    min_payable = program.get("redeem", {}).get("min_payable_per_line", 0)
    kinds = {p["id"]: workload.effect_kind(p) for p in program["promotions"]}
    values = {p["id"]: p["effect"].get("amount_off") for p in program["promotions"]}
    lines, totals = answer["lines"], answer["totals"]
    assert len(lines) == len(receipt["lines"])

    per_receipt_given: dict[str, int] = {}
    for i, (line, out) in enumerate(zip(receipt["lines"], lines)):
        amount = line_amount(line)
        base = amount - line.get("external_discount", 0)
        discount = sum(d["amount"] for d in out["discounts"])
        assert out["sku"] == line["sku"] and out["amount"] == amount, i
        # Discounts of zero are never listed, and what is listed is what the line lost.
        assert all(d["amount"] > 0 for d in out["discounts"]), (i, out["discounts"])
        assert out["payable"] == base - discount, i
        assert out["payable"] >= 0, i
        if line.get("no_discount"):
            assert out["discounts"] == [], i
        if discount > 0:
            # No line below its floor: ceil(min_price x qty / 1000) and ceil(base x (100 - max%) / 100).
            assert out["payable"] >= line_floor(program, line), (i, out["payable"], line_floor(program, line))
        for d in out["discounts"]:
            if kinds[d["promotion"]] == "amount_off_receipt":
                per_receipt_given[d["promotion"]] = per_receipt_given.get(d["promotion"], 0) + d["amount"]
        # Written-off money: never past the line's room, none on no_redeem lines.
        assert 0 <= out["redeemed"] <= max(0, out["payable"] - min_payable), i
        if line.get("no_redeem"):
            assert out["redeemed"] == 0, i
        # Points: never negative; none on no_accrual lines or for an anonymous receipt.
        assert out["points"] >= 0, i
        if line.get("no_accrual") or is_anonymous(member):
            assert out["points"] == 0, i

    # A per-receipt amount_off never gives more than its value, however it is split.
    for pid, given in per_receipt_given.items():
        assert given <= values[pid], (pid, given, values[pid])

    assert totals["amount"] == sum(out["amount"] for out in lines)
    assert totals["discount"] == sum(d["amount"] for out in lines for d in out["discounts"])
    assert totals["payable"] == sum(out["payable"] for out in lines) >= 0

    # The write-off: allocations sum exactly to what was applied, which respects request, balance and cap.
    max_points = expected_max_points(program, request, answer)
    assert totals["max_points"] == max_points
    requested = receipt.get("redeem_points", 0)
    assert totals["redeemed_points"] == min(requested, max_points)
    assert totals["redeemed_points"] <= requested
    if member is not None and not is_anonymous(member):
        assert totals["redeemed_points"] <= member.get("active_points", 0)
    assert totals["redeemed_amount"] == totals["redeemed_points"] * point_value
    assert sum(out["redeemed"] for out in lines) == totals["redeemed_amount"]

    assert totals["accrued_points"] == sum(out["points"] for out in lines) >= 0
    if is_anonymous(member):
        assert totals["accrued_points"] == 0
    else:
        # The tier's own rate is a lower bound: multipliers (>= x1), extra percents and fixed extra points
        # only add. exact = m x rate / point_value, summed, then floored (SPEC 4 step 6).
        tier_bp = bp(member_tier(program, member)["accrual_percent"])
        on_redeemed = program.get("accrual", {}).get("on_redeemed_part", False)
        money = sum(out["payable"] - (0 if on_redeemed else out["redeemed"])
                    for line, out in zip(receipt["lines"], lines) if not line.get("no_accrual"))
        assert totals["accrued_points"] >= money * tier_bp // (10000 * point_value)
        m = answer["member"]
        assert m["active_after"] == member.get("active_points", 0) - totals["redeemed_points"] >= 0
        assert m["pending_after"] == member.get("pending_points", 0) + totals["accrued_points"]


# ---- properties -----------------------------------------------------------------------------------------

@SETTINGS
@given(case=cases())
def test_every_answer_keeps_sums_floors_caps_and_signs(engine_cls, case):
    program, request = case
    check_answer(program, request, calculate(engine_cls, program, request))


@settings(SETTINGS, max_examples=80)
@given(case=cases(max_promotions=8, min_lines=60, max_lines=200))
def test_long_receipts_keep_the_same_properties(engine_cls, case):
    program, request = case
    check_answer(program, request, calculate(engine_cls, program, request))


# Why the restriction: with only per-line effects (percent_off, per-unit amount_off, fixed_price), what
# priority gives a line is exactly one of best_for_customer's candidates for that line: either the cascade
# of the non-exclusive promotions (no exclusive applied), or one exclusive alone on the base amount (an
# exclusive only applies to a line nothing was applied to yet, so it sees the base, and then ends the walk).
# best_for_customer takes the largest candidate, so it can never give less. Receipt-level effects
# (per-receipt amount_off, nth_free) break this: in priority mode an exclusive that ends line A's walk
# takes A out of a later receipt-level split, which then concentrates on the other lines, while
# best_for_customer's cascade splits over every line. test_receipt_level_split_can_give_a_line_more_under
# _priority shows it with numbers worked out by hand.
@SETTINGS
@given(case=cases(features=RECEIPT_LEVEL_FREE))
def test_best_for_customer_never_gives_a_line_less_than_priority(engine_cls, case):
    program, request = case
    by_priority = calculate(engine_cls, {**program, "stacking": "priority"}, request)
    by_best = calculate(engine_cls, {**program, "stacking": "best_for_customer"}, request)
    for i, (p, b) in enumerate(zip(by_priority["lines"], by_best["lines"])):
        given_p = sum(d["amount"] for d in p["discounts"])
        given_b = sum(d["amount"] for d in b["discounts"])
        assert given_b >= given_p, (i, p["discounts"], b["discounts"])


def split_program(stacking: str) -> dict:
    return {
        "program": "receipt-level-counterexample",
        "stacking": stacking,
        "promotions": [
            {"id": "x-first", "priority": 20, "exclusive": True, "scope": {"skus": ["a"]},
             "effect": {"percent_off": 20}},
            {"id": "r-split", "priority": 10, "scope": "all", "effect": {"amount_off": 2000, "per": "receipt"}},
        ],
    }


SPLIT_RECEIPT = {"at": "2026-03-02T12:30:00", "lines": [
    {"sku": "a", "quantity": 1000, "price": 10000},
    {"sku": "b", "quantity": 1000, "price": 10000},
]}


def test_receipt_level_split_can_give_a_line_more_under_priority(engine_cls):
    # priority: x-first takes 20% of a's 10000 = 2000 and ends a's walk, so r-split's 2000 goes to the only
    # taking line, b: a pays 8000, b pays 8000.
    # best_for_customer: the cascade splits r-split over a and b by current amounts 10000 : 10000 = 1000
    # each; on a, x-first alone (2000) beats the cascade (1000); b keeps its cascade share of 1000: b pays
    # 9000, less discount on b than under priority.
    by_priority = calculate(engine_cls, split_program("priority"), (SPLIT_RECEIPT, None, {}))
    by_best = calculate(engine_cls, split_program("best_for_customer"), (SPLIT_RECEIPT, None, {}))
    assert [(line["discounts"], line["payable"]) for line in by_priority["lines"]] == [
        ([{"promotion": "x-first", "amount": 2000}], 8000),
        ([{"promotion": "r-split", "amount": 2000}], 8000),
    ]
    assert [(line["discounts"], line["payable"]) for line in by_best["lines"]] == [
        ([{"promotion": "x-first", "amount": 2000}], 8000),
        ([{"promotion": "r-split", "amount": 1000}], 9000),
    ]
    assert by_priority["totals"]["discount"] == 4000 and by_best["totals"]["discount"] == 3000
