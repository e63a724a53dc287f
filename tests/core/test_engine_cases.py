"""Hand-worked receipts, one behaviour each, over both engines (the ``engine_cls`` fixture).

Each test pins one rule of docs/ENGINE.md (the contract) or SPEC section 4 with a small inline program and
the arithmetic beside the expected numbers. Units: money in minor units, quantities in thousandths, points
whole; percentages in basis points (bp); ``D = 10000 x 100 x point_value`` is the points divisor (10^8 at the
default point_value 100), so a line's exact points are ``m x rate_bp x mult / D``. Programs without
``accrual.percent`` or ``tiers`` earn nothing and cap nothing (redeem.max_percent and max_discount_percent
default to 100), so a test sees only the rule it is about. The default receipt is Monday 2026-03-02 12:30.
"""
from __future__ import annotations

import pytest

from helpers.builders import line, load_program_cached, member, receipt
from loyalty.core import InputError

CARD = "7000001"


def discounts(answer: dict) -> list[list[tuple[str, int]]]:
    return [[(d["promotion"], d["amount"]) for d in ln["discounts"]] for ln in answer["lines"]]


def payables(answer: dict) -> list[int]:
    return [ln["payable"] for ln in answer["lines"]]


def redeemed(answer: dict) -> list[int]:
    return [ln["redeemed"] for ln in answer["lines"]]


def points(answer: dict) -> list[int]:
    return [ln["points"] for ln in answer["lines"]]


# ---- effects: percent_off -------------------------------------------------------------------------------

def test_percent_off_12_5_floors_each_line(calc):
    program = """
        program: t
        promotions:
          - {id: p125, effect: {percent_off: 12.5}}
    """
    answer = calc(program, receipt([line("a", 1000, 1999), line("b", 3000, 333)]), member())
    # 12.5% = 1250 bp. a: 1999 x 1250 // 10000 = 249 (249.875). b: amount 3 x 333 = 999 -> 124 (124.875).
    assert discounts(answer) == [[("p125", 249)], [("p125", 124)]]
    assert payables(answer) == [1999 - 249, 999 - 124]
    assert answer["totals"]["amount"] == 1999 + 999
    assert answer["totals"]["discount"] == 249 + 124
    assert answer["totals"]["payable"] == 1750 + 875
    assert answer["promotions"] == ["p125"]


# ---- amount_off -----------------------------------------------------------------------------------------

def test_amount_off_per_unit_multiplies_by_pieces_and_floors_on_weight_goods(calc):
    program = """
        program: t
        promotions:
          - {id: off70, effect: {amount_off: 70}}
    """
    lines = [line("pcs", 3000, 500), line("kg-a", 1999, 1000), line("kg-b", 1250, 1000)]
    answer = calc(program, receipt(lines), member())
    # pcs: 70 x 3000 / 1000 = 210. kg-a: floor(70 x 1999 / 1000 = 139.93) = 139 (rounding would give 140).
    # kg-b: floor(70 x 1250 / 1000 = 87.5) = 87 (round-half-up would give 88).
    assert discounts(answer) == [[("off70", 210)], [("off70", 139)], [("off70", 87)]]
    assert payables(answer) == [1500 - 210, 1999 - 139, 1250 - 87]


def test_amount_off_per_receipt_is_split_by_current_amounts_largest_remainder(calc):
    program = """
        program: t
        promotions:
          - {id: r1000, effect: {amount_off: 1000, per: receipt}}
    """
    lines = [line("a", 1000, 3000), line("b", 1000, 2000), line("c", 2000, 500)]
    answer = calc(program, receipt(lines), member())
    # weights 3000 / 2000 / 1000, W = 6000: shares 500 / 333.33 / 166.67 -> floors 500 + 333 + 166 = 999;
    # the one unit left goes to the largest remainder: c (.67) -> 500 / 333 / 167.
    assert discounts(answer) == [[("r1000", 500)], [("r1000", 333)], [("r1000", 167)]]
    assert answer["totals"]["discount"] == 1000
    assert payables(answer) == [2500, 1667, 833]


def test_amount_off_per_receipt_respects_room_and_leaves_out_no_discount_lines(calc):
    program = """
        program: t
        promotions:
          - {id: r1000, effect: {amount_off: 1000, per: receipt}}
    """
    lines = [line("a", 1000, 5000, min_price=4900), line("b", 1000, 5000), line("c", 1000, 5000, no_discount=True)]
    answer = calc(program, receipt(lines), member())
    # c takes no part. a, b: weights 5000 / 5000; a's share 500 exceeds its room 5000 - 4900 = 100, so a takes
    # 100 and leaves; the 900 left go to b (room 5000).
    assert discounts(answer) == [[("r1000", 100)], [("r1000", 900)], []]
    assert payables(answer) == [4900, 4100, 5000]


def test_amount_off_per_receipt_not_given_past_every_room(calc):
    program = """
        program: t
        promotions:
          - {id: r10000, effect: {amount_off: 10000, per: receipt}}
    """
    answer = calc(program, receipt([line("a", 1000, 5000)]), member())
    # the only line can take 5000 (floor 0); the other 5000 are not given.
    assert discounts(answer) == [[("r10000", 5000)]]
    assert payables(answer) == [0]
    assert answer["totals"]["discount"] == 5000


# ---- fixed_price ----------------------------------------------------------------------------------------

def test_fixed_price_per_unit_on_piece_goods(calc):
    program = """
        program: t
        promotions:
          - {id: fp999, effect: {fixed_price: 999}}
    """
    answer = calc(program, receipt([line("a", 2000, 1500)]), member())
    # amount 3000; new amount 999 x 2000 / 1000 = 1998; discount 3000 - 1998 = 1002.
    assert discounts(answer) == [[("fp999", 1002)]]
    assert payables(answer) == [1998]


def test_fixed_price_on_weight_goods_rounds_half_up(calc):
    program = """
        program: t
        promotions:
          - {id: fp333, effect: {fixed_price: 333}}
    """
    answer = calc(program, receipt([line("w", 1500, 999)]), member())
    # amount = round-half-up(1500 x 999 / 1000 = 1498.5) = 1499;
    # new amount = round-half-up(333 x 1500 / 1000 = 499.5) = 500 (a floor would give 499); discount 999.
    assert answer["lines"][0]["amount"] == 1499
    assert discounts(answer) == [[("fp333", 999)]]
    assert payables(answer) == [500]


def test_fixed_price_above_the_current_amount_gives_nothing(calc):
    program = """
        program: t
        promotions:
          - {id: fp700, effect: {fixed_price: 700}}
    """
    answer = calc(program, receipt([line("a", 1000, 500)]), member())
    # new amount 700 > 500: discount max(0, 500 - 700) = 0, never negative, not listed, not applied.
    assert discounts(answer) == [[]]
    assert payables(answer) == [500]
    assert answer["totals"]["discount"] == 0
    assert answer["promotions"] == []


# ---- nth_free -------------------------------------------------------------------------------------------

NTH_FREE_3 = """
    program: t
    product_groups:
      snacks: {skus: [a, b, c, d]}
    promotions:
      - {id: third-free, scope: {groups: [snacks]}, effect: {nth_free: 3}}
"""


def test_nth_free_gives_cheapest_units_and_ignores_weight_lines(calc):
    lines = [line("a", 2000, 300), line("b", 1000, 100), line("c", 3000, 200), line("d", 1500, 40)]
    answer = calc(NTH_FREE_3, receipt(lines), member())
    # piece units a 2 + b 1 + c 3 = 6 (d is 1.5 kg: not a piece line) -> 6 // 3 = 2 free.
    # unit prices a 300, b 100, c 200: b gives 1 unit (100 x 1 / 1 = 100), c the other (600 x 1 / 3 = 200).
    # (Counting d, unit price 60 or 40, would have taken a free unit from b or c.)
    assert discounts(answer) == [[], [("third-free", 100)], [("third-free", 200)], []]
    assert payables(answer) == [600, 0, 400, 60]


def test_nth_free_passes_over_a_line_already_at_its_floor(calc):
    lines = [line("a", 1000, 100, min_price=100), line("b", 1000, 200), line("c", 1000, 300)]
    answer = calc(NTH_FREE_3, receipt(lines), member())
    # 3 units -> 1 free; a is cheapest but has no room (floor 100): b takes it (200).
    assert discounts(answer) == [[], [("third-free", 200)], []]


def test_nth_free_unit_price_tie_goes_to_lower_line_index(calc):
    program = """
        program: t
        promotions:
          - {id: second-free, effect: {nth_free: 2}}
    """
    lines = [line("a", 2000, 100), line("b", 1000, 100)]
    answer = calc(program, receipt(lines), member())
    # units 2 + 1 = 3 -> 1 free; unit prices 200 / 2 = 100 and 100 / 1 = 100 tie -> a (index 0):
    # floor(200 x 1 / 2) = 100.
    assert discounts(answer) == [[("second-free", 100)], []]


# ---- points effects -------------------------------------------------------------------------------------

def test_points_multiplier_x1_5(calc):
    program = """
        program: t
        accrual: {percent: 5}
        promotions:
          - {id: x15, effect: {points_multiplier: 1.5}}
    """
    answer = calc(program, receipt([line("a", 1000, 12000)]), member())
    # 12000 x 500 bp x 150 / 10^8 = 9 (6 without the multiplier).
    assert points(answer) == [9]
    assert answer["totals"]["accrued_points"] == 9
    assert answer["promotions"] == ["x15"]


def test_largest_multiplier_in_scope_wins_not_their_product(calc):
    program = """
        program: t
        accrual: {percent: 5}
        promotions:
          - {id: mult-1.5, effect: {points_multiplier: 1.5}}
          - {id: mult-3, scope: {skus: [coffee]}, effect: {points_multiplier: 3}}
    """
    answer = calc(program, receipt([line("coffee", 1000, 10000), line("tea", 1000, 10000)]), member())
    # coffee: max(150, 300) = 300 -> 10000 x 500 x 300 / 10^8 = 15 (a product 4.5 would give 22.5).
    # tea: 150 -> 7.5. R = floor(22.5) = 22 = 15 + 7.
    assert points(answer) == [15, 7]
    assert answer["promotions"] == ["mult-1.5", "mult-3"]  # same priority: id order


def test_extra_points_percent_adds_to_the_rate_in_scope(calc):
    program = """
        program: t
        accrual: {percent: 3}
        promotions:
          - {id: extra2, scope: {skus: [coffee]}, effect: {extra_points_percent: 2}}
    """
    answer = calc(program, receipt([line("coffee", 1000, 10000), line("tea", 1000, 10000)]), member())
    # coffee: (300 + 200) bp x 10000 / 10^6 = 5; tea: 300 bp -> 3.
    assert points(answer) == [5, 3]
    assert answer["promotions"] == ["extra2"]


def test_points_multiplier_multiplies_tier_and_extra_percent(calc):
    program = """
        program: t
        accrual: {percent: 3}
        promotions:
          - {id: extra2, scope: {skus: [coffee]}, effect: {extra_points_percent: 2}}
          - {id: x2, scope: {skus: [coffee]}, effect: {points_multiplier: 2}}
    """
    answer = calc(program, receipt([line("coffee", 1000, 10000), line("tea", 1000, 10000)]), member())
    # coffee: 10000 x 500 x 200 / 10^8 = 10; tea: 10000 x 300 x 100 / 10^8 = 3.
    assert points(answer) == [10, 3]


def test_extra_points_per_receipt_split_over_earning_lines_in_scope(calc):
    program = """
        program: t
        promotions:
          - {id: bonus10, scope: {skus: [coffee-a, coffee-b]}, effect: {extra_points: 10}}
    """
    lines = [line("coffee-a", 1000, 3000), line("coffee-b", 1000, 1000), line("tea", 1000, 5000)]
    answer = calc(program, receipt(lines), member())
    # split(10, payable 3000 / 1000): 7.5 / 2.5 -> floors 7 + 2, the unit left: remainders tie (.5) -> index 0.
    assert points(answer) == [8, 2, 0]
    assert answer["totals"]["accrued_points"] == 10
    assert answer["promotions"] == ["bonus10"]


def test_extra_points_per_unit_on_piece_lines_only(calc):
    program = """
        program: t
        product_groups:
          coffee: {categories: [coffee]}
        promotions:
          - {id: five-per-pack, scope: {groups: [coffee]}, effect: {extra_points: 5, per: unit}}
    """
    lines = [line("beans", 3000, 1000, categories=["coffee"]), line("loose", 1500, 1000, categories=["coffee"]),
             line("tea", 2000, 1000)]
    answer = calc(program, receipt(lines), member())
    # beans: 5 x 3 = 15; loose is weight goods (not a piece line): 0; tea out of scope: 0.
    assert points(answer) == [15, 0, 0]


def test_extra_points_not_given_without_an_earning_line_in_scope(calc):
    program = """
        program: t
        promotions:
          - {id: bonus10, scope: {skus: [coffee]}, effect: {extra_points: 10}}
    """
    answer = calc(program, receipt([line("coffee", 1000, 3000, no_accrual=True), line("tea", 1000, 1000)]),
                  member())
    assert points(answer) == [0, 0]
    assert answer["promotions"] == []


def test_points_promotions_do_not_apply_to_anonymous_receipts(calc):
    program = """
        program: t
        accrual: {percent: 5}
        promotions:
          - {id: bonus10, effect: {extra_points: 10}}
          - {id: x2, effect: {points_multiplier: 2}}
    """
    answer = calc(program, receipt([line("a", 1000, 10000)]), None)
    assert points(answer) == [0]
    assert answer["promotions"] == []


# ---- stacking -------------------------------------------------------------------------------------------

def test_priority_exclusive_is_skipped_on_a_line_already_discounted(calc):
    program = """
        program: t
        promotions:
          - {id: P10, priority: 10, scope: {skus: [a]}, effect: {percent_off: 10}}
          - {id: X5, priority: 5, exclusive: true, effect: {percent_off: 20}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000), line("b", 1000, 1000)]), member())
    # a: P10 100, then X5 is blocked. b: nothing before, X5 20% = 200.
    assert discounts(answer) == [[("P10", 100)], [("X5", 200)]]
    assert payables(answer) == [900, 800]
    assert answer["promotions"] == ["P10", "X5"]


def test_priority_exclusive_with_a_discount_ends_the_line_walk(calc):
    program = """
        program: t
        promotions:
          - {id: X20, priority: 20, exclusive: true, scope: {skus: [a]}, effect: {percent_off: 20}}
          - {id: P10, priority: 10, effect: {percent_off: 10}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000), line("b", 1000, 1000)]), member())
    # a: X20 200 ends the walk, P10 is not applied; b: P10 100.
    assert discounts(answer) == [[("X20", 200)], [("P10", 100)]]
    assert answer["promotions"] == ["X20", "P10"]


def test_priority_exclusive_giving_zero_does_not_end_the_walk(calc):
    program = """
        program: t
        promotions:
          - {id: X20, priority: 20, exclusive: true, effect: {fixed_price: 2000}}
          - {id: P10, priority: 10, effect: {percent_off: 10}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000)]), member())
    # X20: max(0, 1000 - 2000) = 0, so the walk goes on: P10 100.
    assert discounts(answer) == [[("P10", 100)]]
    assert answer["promotions"] == ["P10"]


@pytest.mark.parametrize(("cascade_priority", "exclusive_priority", "winner"), [
    (10, 5, "N"),   # the cascade's first promotion N comes first in promotion order
    (5, 10, "X"),   # the exclusive comes first
])
def test_best_for_customer_tie_goes_to_the_higher_priority_candidate(calc, cascade_priority, exclusive_priority,
                                                                      winner):
    program = f"""
        program: t
        stacking: best_for_customer
        promotions:
          - {{id: N, priority: {cascade_priority}, effect: {{percent_off: 15}}}}
          - {{id: X, priority: {exclusive_priority}, exclusive: true, effect: {{amount_off: 150}}}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000)]), member())
    # cascade N: 1000 x 1500 // 10000 = 150; X alone: 150. Tie.
    assert discounts(answer) == [[(winner, 150)]]
    assert payables(answer) == [850]
    assert answer["promotions"] == [winner]


def test_best_for_customer_tie_between_exclusives_of_equal_priority_goes_to_lower_id(calc):
    program = """
        program: t
        stacking: best_for_customer
        promotions:
          - {id: xb, priority: 10, exclusive: true, effect: {percent_off: 15}}
          - {id: xa, priority: 10, exclusive: true, effect: {amount_off: 150}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000)]), member())
    # both give 150; promotion order (priority desc, id asc): xa before xb.
    assert discounts(answer) == [[("xa", 150)]]


def test_best_for_customer_larger_cascade_beats_an_exclusive(calc):
    program = """
        program: t
        stacking: best_for_customer
        promotions:
          - {id: N1, priority: 20, effect: {percent_off: 10}}
          - {id: N2, priority: 10, effect: {percent_off: 10}}
          - {id: X, priority: 30, exclusive: true, effect: {percent_off: 18}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000)]), member())
    # cascade: 100, then floor(900 x 10%) = 90 -> 190 > X alone 180.
    assert discounts(answer) == [[("N1", 100), ("N2", 90)]]
    assert payables(answer) == [810]


def test_best_for_customer_exclusive_receipt_split_on_base_amounts_kept_per_line(calc):
    program = """
        program: t
        stacking: best_for_customer
        promotions:
          - {id: N, priority: 10, scope: {skus: [a]}, effect: {percent_off: 50}}
          - {id: XR, priority: 5, exclusive: true, effect: {amount_off: 300, per: receipt}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000), line("b", 1000, 2000)]), member())
    # XR alone on base amounts: split 300 by 1000 / 2000 -> 100 / 200.
    # a: cascade 500 > XR 100 -> N. b: no cascade discount, XR 200. XR's 100 on a is not given.
    assert discounts(answer) == [[("N", 500)], [("XR", 200)]]
    assert answer["totals"]["discount"] == 700
    assert answer["promotions"] == ["N", "XR"]


def test_priority_receipt_split_sees_amounts_after_earlier_promotions(calc):
    program = """
        program: t
        promotions:
          - {id: P10, priority: 10, scope: {skus: [a]}, effect: {percent_off: 10}}
          - {id: R300, priority: 5, effect: {amount_off: 300, per: receipt}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000), line("b", 1000, 1000)]), member())
    # a is 900 after P10; split 300 by 900 / 1000 (W = 1900): 270000 // 1900 = 142 rem 200,
    # 300000 // 1900 = 157 rem 1700; the unit left goes to b -> 142 / 158.
    assert discounts(answer) == [[("P10", 100), ("R300", 142)], [("R300", 158)]]
    assert payables(answer) == [758, 842]


def test_priority_receipt_split_leaves_out_lines_whose_walk_an_exclusive_ended(calc):
    program = """
        program: t
        promotions:
          - {id: X20, priority: 20, exclusive: true, scope: {skus: [a]}, effect: {percent_off: 20}}
          - {id: R300, priority: 10, effect: {amount_off: 300, per: receipt}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000), line("b", 1000, 1000)]), member())
    # a's walk ended with X20 (200): the whole 300 goes to b.
    assert discounts(answer) == [[("X20", 200)], [("R300", 300)]]


def test_exclusive_points_promotion_counts_and_does_not_end_the_walk(calc):
    program = """
        program: t
        accrual: {percent: 10}
        promotions:
          - {id: XP, priority: 20, exclusive: true, effect: {points_multiplier: 2}}
          - {id: D10, priority: 10, effect: {percent_off: 10}}
    """
    answer = calc(program, receipt([line("a", 1000, 10000)]), member())
    # Points promotions take no part in the walk: D10 gives 1000 -> 9000; XP still doubles:
    # 9000 x 1000 bp x 200 / 10^8 = 18.
    assert discounts(answer) == [[("D10", 1000)]]
    assert points(answer) == [18]
    assert answer["promotions"] == ["XP", "D10"]


# ---- floors ---------------------------------------------------------------------------------------------

def test_min_price_floor_cuts_the_discount_and_rounds_up(calc):
    program = """
        program: t
        promotions:
          - {id: p20, effect: {percent_off: 20}}
    """
    lines = [line("a", 2000, 1000, min_price=900), line("w", 1500, 1000, min_price=901)]
    answer = calc(program, receipt(lines), member())
    # a: floor ceil(900 x 2000 / 1000) = 1800; 20% of 2000 = 400 cut to 200.
    # w: floor ceil(901 x 1500 / 1000 = 1351.5) = 1352; 20% of 1500 = 300 cut to 148.
    assert discounts(answer) == [[("p20", 200)], [("p20", 148)]]
    assert payables(answer) == [1800, 1352]


def test_max_discount_percent_floor_rounds_up(calc):
    program = """
        program: t
        max_discount_percent: 30
        promotions:
          - {id: p50, effect: {percent_off: 50}}
    """
    answer = calc(program, receipt([line("a", 1000, 999)]), member())
    # floor ceil(999 x 7000 / 10000 = 699.3) = 700; 50% = 499 cut to 299.
    assert discounts(answer) == [[("p50", 299)]]
    assert payables(answer) == [700]


def test_max_discount_floor_is_on_the_base_after_external_discount(calc):
    program = """
        program: t
        max_discount_percent: 50
        promotions:
          - {id: p80, effect: {percent_off: 80}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000, external_discount=200)]), member())
    # base 800; floor ceil(800 x 5000 / 10000) = 400; 80% of 800 = 640 cut to 400.
    assert discounts(answer) == [[("p80", 400)]]
    assert payables(answer) == [400]
    assert answer["totals"]["external_discount"] == 200
    assert answer["totals"]["discount"] == 400


def test_no_discount_line_is_untouched(calc):
    program = """
        program: t
        promotions:
          - {id: p20, effect: {percent_off: 20}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000, no_discount=True), line("b", 1000, 1000)]), member())
    assert discounts(answer) == [[], [("p20", 200)]]
    assert payables(answer) == [1000, 800]


def test_line_already_at_its_floor_gets_no_discount(calc):
    program = """
        program: t
        promotions:
          - {id: p20, effect: {percent_off: 20}}
    """
    answer = calc(program, receipt([line("a", 1000, 500, min_price=500)]), member())
    # room = 500 - 500 = 0: a zero discount is not listed and the promotion is not applied.
    assert discounts(answer) == [[]]
    assert payables(answer) == [500]
    assert answer["promotions"] == []


# ---- write-off ------------------------------------------------------------------------------------------

def test_program_cap_limits_write_off_and_message_names_both_numbers(calc):
    program = """
        program: t
        redeem: {max_percent: 50}
    """
    answer = calc(program, receipt([line("a", 1000, 10001)], redeem_points=60), member(active_points=1000))
    # cap_amount = 10001 x 5000 // 10000 = 5000 -> max_points 50; applied min(60, 50) = 50 -> 5000.
    assert answer["totals"]["max_points"] == 50
    assert answer["totals"]["redeemed_points"] == 50
    assert answer["totals"]["redeemed_amount"] == 5000
    assert redeemed(answer) == [5000]
    assert answer["messages"] == ["requested 60 points, 50 can be written off"]
    assert answer["member"]["active_before"] == 1000
    assert answer["member"]["active_after"] == 950


def test_request_within_the_cap_is_applied_whole_without_message(calc):
    program = """
        program: t
        redeem: {max_percent: 50}
    """
    answer = calc(program, receipt([line("a", 1000, 10001)], redeem_points=30), member(active_points=1000))
    assert answer["totals"]["max_points"] == 50
    assert answer["totals"]["redeemed_points"] == 30
    assert redeemed(answer) == [3000]
    assert answer["messages"] == []


@pytest.mark.parametrize(("tier", "max_points"), [
    ("Gold", 30),   # tier redeem_max_percent 30: 10000 x 3000 // 10000 = 3000 -> 30
    ("Basic", 20),  # program max_percent 20: 2000 -> 20
])
def test_tier_redeem_max_percent_overrides_the_program_cap(calc, tier, max_points):
    program = """
        program: t
        redeem: {max_percent: 20}
        tiers:
          levels:
            - {name: Basic, from: 0, accrual_percent: 0}
            - {name: Gold, from: 5000000, accrual_percent: 0, redeem_max_percent: 30}
    """
    answer = calc(program, receipt([line("a", 1000, 10000)], redeem_points=100), member(tier=tier))
    assert answer["totals"]["max_points"] == max_points
    assert answer["totals"]["redeemed_points"] == max_points


REDUCED_25 = """
    program: t
    redeem:
      max_percent: 20
      reduced:
        - {external_discount_over_percent: 25, max_percent: 10}
"""


def test_external_share_exactly_at_threshold_does_not_reduce_the_cap(calc):
    answer = calc(REDUCED_25, receipt([line("a", 1000, 10000, external_discount=2500)], redeem_points=100),
                  member())
    # 2500 x 10000 = 2.5e7 is not strictly over 2500 bp x 10000 = 2.5e7: cap stays 20%.
    # payable 7500 -> 7500 x 2000 // 10000 = 1500 -> 15 points.
    assert answer["totals"]["max_points"] == 15


def test_external_share_over_threshold_reduces_the_cap(calc):
    answer = calc(REDUCED_25, receipt([line("a", 1000, 10000, external_discount=2501)], redeem_points=100),
                  member())
    # 25.01% > 25%: cap 10%; payable 7499 -> 749 -> 7 points.
    assert answer["totals"]["max_points"] == 7
    assert redeemed(answer) == [700]


@pytest.mark.parametrize(("external", "max_points"), [
    (1500, 17),  # 15% crosses only "over 10 -> 30", which never raises the 20% cap: 8500 x 20% = 1700 -> 17
    (6000, 2),   # 60% crosses all three: the lowest, 5%, of 4000 = 200 -> 2
])
def test_reduced_cap_is_the_lowest_crossed_and_never_raises(calc, external, max_points):
    program = """
        program: t
        redeem:
          max_percent: 20
          reduced:
            - {external_discount_over_percent: 10, max_percent: 30}
            - {external_discount_over_percent: 25, max_percent: 10}
            - {external_discount_over_percent: 50, max_percent: 5}
    """
    answer = calc(program, receipt([line("a", 1000, 10000, external_discount=external)], redeem_points=100),
                  member())
    assert answer["totals"]["max_points"] == max_points


# SPEC 4 step 4: the external share is the whole receipt's, no_redeem lines included, while the cap's
# amounts are the redeemable lines'. The tests below are receipts where that reading and the old one (the
# share over the redeemable lines only) part ways.

def test_external_share_over_redeemable_lines_alone_does_not_reduce_the_cap(calc):
    lines = [line("x", 1000, 10000, external_discount=3000), line("y", 1000, 10000, no_redeem=True)]
    answer = calc(REDUCED_25, receipt(lines, redeem_points=100), member())
    # Share over x alone 3000 / 10000 = 30% (it would reduce); over the whole receipt
    # E = 3000, A = 10000 + 10000 = 20000: 3000 x 10000 = 3.0e7 is not over 2500 x 20000 = 5.0e7 (15%).
    # Cap stays 20% of the redeemable payable P = 10000 - 3000 = 7000: 1400 -> 14 points, all on x
    # (the reduced reading would give 10% = 700 -> 7).
    assert answer["totals"]["max_points"] == 14
    assert redeemed(answer) == [1400, 0]


def test_external_discount_on_a_no_redeem_line_reduces_the_cap(calc):
    lines = [line("x", 1000, 10000, external_discount=6000, no_redeem=True), line("y", 1000, 10000)]
    answer = calc(REDUCED_25, receipt(lines, redeem_points=100), member())
    # Over y alone the share is 0; over the whole receipt E = 6000, A = 20000:
    # 6000 x 10000 = 6.0e7 > 2500 x 20000 = 5.0e7 (30%) -> cap 10%.
    # The cap's amounts stay over y: P = 10000 -> 1000 -> 10 points, all on y (x is no_redeem).
    # (The share over y alone would keep 20%: 2000 -> 20; 10% of the whole payable 14000 would be 14.)
    assert answer["totals"]["max_points"] == 10
    assert answer["totals"]["redeemed_points"] == 10
    assert redeemed(answer) == [0, 1000]


@pytest.mark.parametrize(("external", "max_points"), [
    # A = 10000 + 10000 = 20000; x (no_redeem) carries the external discount, y is redeemable, P = 10000.
    (5000, 20),  # 25.00% exactly: 5000 x 10000 = 5.0e7 = 2500 x 20000, not over -> 20% of 10000 -> 20
    (5001, 10),  # 25.005%: 50,010,000 > 50,000,000 -> 10% of 10000 = 1000 -> 10
])
def test_whole_receipt_share_of_exactly_25_percent_is_not_over(calc, external, max_points):
    lines = [line("x", 1000, 10000, external_discount=external, no_redeem=True), line("y", 1000, 10000)]
    answer = calc(REDUCED_25, receipt(lines, redeem_points=100), member())
    assert answer["totals"]["max_points"] == max_points


@pytest.mark.parametrize(("external", "max_points"), [
    # Threshold 12.25% = 1225 bp. x (no_redeem) 30000 with external 4900, y 10000 with external E - 4900;
    # A = 40000 and P = y's payable = 10000 - (E - 4900).
    (4900, 20),  # 4900 x 10000 = 4.9e7 = 1225 x 40000: not over -> 20% of 10000 = 2000 -> 20
    (4901, 9),   # 49,010,000 > 4.9e7: over -> 10% of 9999 = 999 -> 9 (over y alone, 0.01%: 1999 -> 19)
])
def test_threshold_with_two_decimals_compares_in_basis_points(calc, external, max_points):
    program = """
        program: t
        redeem:
          max_percent: 20
          reduced:
            - {external_discount_over_percent: 12.25, max_percent: 10}
    """
    lines = [line("x", 1000, 30000, external_discount=4900, no_redeem=True),
             line("y", 1000, 10000, external_discount=external - 4900)]
    answer = calc(program, receipt(lines, redeem_points=100), member())
    assert answer["totals"]["max_points"] == max_points


TIER_CAPS_REDUCED_10 = """
    program: t
    redeem:
      max_percent: 20
      reduced:
        - {external_discount_over_percent: 25, max_percent: 10}
    tiers:
      levels:
        - {name: Basic, from: 0, accrual_percent: 0}
        - {name: Gold, from: 5000000, accrual_percent: 0, redeem_max_percent: 5}
        - {name: Platinum, from: 9000000, accrual_percent: 0, redeem_max_percent: 30}
"""


@pytest.mark.parametrize(("tier", "max_points"), [
    ("Gold", 35),       # min(tier 5%, reduced 10%) = 5%: the reduction never raises a cap; 3500 -> 35
    ("Platinum", 70),   # min(tier 30%, reduced 10%) = 10%: 7000 -> 70 (unreduced 30% would be 210)
    ("Basic", 70),      # min(program 20%, reduced 10%) = 10%: 7000 -> 70
])
def test_reduction_lowers_a_tier_cap_but_never_raises_it(calc, tier, max_points):
    # One line 100000 with an external 30000: share 30% > 25% crosses the rule; P = 70000.
    answer = calc(TIER_CAPS_REDUCED_10,
                  receipt([line("a", 1000, 100000, external_discount=30000)], redeem_points=1000),
                  member(tier=tier))
    assert answer["totals"]["max_points"] == max_points
    assert redeemed(answer) == [max_points * 100]


@pytest.mark.parametrize(("tier", "max_points"), [
    ("Gold", 37),       # 5% of 75000 = 3750 -> 37
    ("Platinum", 225),  # 30% of 75000 = 22500 -> 225
])
def test_tier_caps_stand_when_no_threshold_is_crossed(calc, tier, max_points):
    # External 25000 of 100000 is exactly 25%, not over: the tier cap alone applies; P = 75000.
    answer = calc(TIER_CAPS_REDUCED_10,
                  receipt([line("a", 1000, 100000, external_discount=25000)], redeem_points=1000),
                  member(tier=tier))
    assert answer["totals"]["max_points"] == max_points


def test_min_payable_per_line_limits_cap_and_allocation(calc):
    program = """
        program: t
        redeem: {max_percent: 100, min_payable_per_line: 100}
    """
    answer = calc(program, receipt([line("a", 1000, 150), line("b", 1000, 1000)], redeem_points=50), member())
    # cap_amount = min(1150, (150 - 100) + (1000 - 100) = 950) = 950 -> 9 points -> 900 to spread:
    # a's share 900 x 150 / 1150 = 117.4 > room 50 -> a takes 50; the 850 left go to b (room 900).
    assert answer["totals"]["max_points"] == 9
    assert redeemed(answer) == [50, 850]
    assert [p - r for p, r in zip(payables(answer), redeemed(answer))] == [100, 150]
    assert answer["messages"] == ["requested 50 points, 9 can be written off"]


def test_line_at_min_payable_takes_no_write_off(calc):
    program = """
        program: t
        redeem: {max_percent: 100, min_payable_per_line: 100}
    """
    answer = calc(program, receipt([line("a", 1000, 100), line("b", 1000, 10000)], redeem_points=50), member())
    # cap = min(10100, 0 + 9900) = 9900 -> 99 points; 50 applied -> 5000, a has no room: all on b.
    assert answer["totals"]["max_points"] == 99
    assert redeemed(answer) == [0, 5000]


def test_zero_active_balance_writes_off_nothing(calc):
    answer = calc("program: t\n", receipt([line("a", 1000, 10000)], redeem_points=10), member(active_points=0))
    # cap would allow 100 points, but max_points = min(100, 0) = 0.
    assert answer["totals"]["max_points"] == 0
    assert answer["totals"]["redeemed_points"] == 0
    assert redeemed(answer) == [0]
    assert answer["messages"] == ["requested 10 points, 0 can be written off"]


def test_point_value_scales_write_off_and_accrual(calc):
    program = """
        program: t
        point_value: 50
        accrual: {percent: 10}
        redeem: {max_percent: 10}
    """
    answer = calc(program, receipt([line("a", 1000, 10000)], redeem_points=100), member())
    # cap 1000 // 50 = 20 points -> 1000 written off; m = 9000; 9000 x 1000 x 100 / (10^6 x 50) = 18 points.
    assert answer["totals"]["max_points"] == 20
    assert answer["totals"]["redeemed_amount"] == 1000
    assert points(answer) == [18]


# ---- accrual --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("on_redeemed_part", "expected"), [
    ("false", 8),  # m = 10000 - 2000 = 8000 -> 10% = 800 -> 8 points
    ("true", 10),  # m = payable 10000 -> 10 points
])
def test_accrual_on_redeemed_part(calc, on_redeemed_part, expected):
    program = f"""
        program: t
        accrual: {{percent: 10, on_redeemed_part: {on_redeemed_part}}}
    """
    answer = calc(program, receipt([line("a", 1000, 10000)], redeem_points=20), member())
    assert redeemed(answer) == [2000]
    assert points(answer) == [expected]
    assert answer["member"]["pending_after"] == expected


def test_points_are_floor_of_the_receipt_sum_spread_by_largest_remainder(calc):
    program = """
        program: t
        accrual: {percent: 10}
    """
    lines = [line("a", 1000, 1700), line("b", 1000, 1500), line("c", 1000, 1800), line("d", 1000, 1500)]
    answer = calc(program, receipt(lines), member())
    # exact 1.7 / 1.5 / 1.8 / 1.5, sum 6.5 -> 6 (not the sum of floors, 4); the 2 left go to c (.8), a (.7).
    assert points(answer) == [2, 1, 2, 1]
    assert answer["totals"]["accrued_points"] == 6


def test_points_remainder_tie_goes_to_lower_line_index(calc):
    program = """
        program: t
        accrual: {percent: 10}
    """
    answer = calc(program, receipt([line("a", 1000, 1500), line("b", 1000, 1500), line("c", 1000, 1500)]), member())
    # 1.5 x 3 = 4.5 -> 4; floors 3, the one left: equal remainders -> a.
    assert points(answer) == [2, 1, 1]


def test_no_accrual_line_earns_nothing(calc):
    program = """
        program: t
        accrual: {percent: 10}
    """
    answer = calc(program, receipt([line("a", 1000, 10000, no_accrual=True), line("b", 1000, 10000)]), member())
    assert points(answer) == [0, 10]


TIERS_3_5_7 = """
    program: t
    tiers:
      levels:
        - {name: Basic, from: 0, accrual_percent: 3}
        - {name: Silver, from: 20000, accrual_percent: 5}
        - {name: Gold, from: 50000, accrual_percent: 7}
"""


def test_accrual_uses_the_tier_held_before_the_receipt(calc):
    answer = calc(TIERS_3_5_7, receipt([line("a", 1000, 10000)]), member(tier="Silver", purchases_sum=45000))
    # metric 45000 + 10000 = 55000 would reach Gold, but this receipt earns at Silver: 5% of 10000 = 5 points.
    assert points(answer) == [5]
    assert answer["member"]["tier"] == "Silver"
    assert answer["member"]["next_tier"] is None      # no level above 55000
    assert answer["member"]["to_next_tier"] is None


def test_progress_to_next_tier_counts_payable_before_write_off(calc):
    answer = calc(TIERS_3_5_7, receipt([line("a", 1000, 10000)], redeem_points=10),
                  member(tier="Basic", purchases_sum=5000))
    # metric = 5000 + payable 10000 = 15000 (the 1000 written off still counts) -> Silver at 20000: 5000 to go.
    # points: 3% of 10000 - 1000 = 270 -> 2.
    assert answer["member"]["next_tier"] == "Silver"
    assert answer["member"]["to_next_tier"] == 5000
    assert points(answer) == [2]
    assert answer["member"]["active_after"] == 1000 - 10
    assert answer["member"]["pending_after"] == 2


def test_progress_names_the_first_level_above_the_metric(calc):
    answer = calc(TIERS_3_5_7, receipt([line("a", 1000, 10000)]), member(tier="Basic", purchases_sum=25000))
    # metric 35000: the first level with threshold > 35000 is Gold, 15000 to go.
    assert answer["member"]["next_tier"] == "Gold"
    assert answer["member"]["to_next_tier"] == 15000


def test_progress_is_null_without_purchases_sum(calc):
    answer = calc(TIERS_3_5_7, receipt([line("a", 1000, 10000)]), member(tier="Basic"))
    assert answer["member"]["next_tier"] is None
    assert answer["member"]["to_next_tier"] is None


# ---- card statuses --------------------------------------------------------------------------------------

STATUS_PROGRAM = """
    program: t
    accrual: {percent: 10}
    promotions:
      - {id: pub, priority: 10, effect: {percent_off: 10}}
      - {id: vip, priority: 5, audience: {include: [vip]}, effect: {percent_off: 5}}
"""


def test_active_card_earns_and_redeems(calc):
    answer = calc(STATUS_PROGRAM, receipt([line("a", 1000, 10000)], redeem_points=10),
                  member(status="active", audiences=["vip"]))
    # pub 1000 -> 9000; vip floor(9000 x 5%) = 450 -> 8550. cap 100% -> 85 points; 10 applied -> 1000.
    # m = 7550 -> 10% = 7.55 -> 7 points.
    assert discounts(answer) == [[("pub", 1000), ("vip", 450)]]
    assert answer["totals"]["max_points"] == 85
    assert redeemed(answer) == [1000]
    assert points(answer) == [7]
    assert answer["messages"] == []
    assert answer["member"] == {
        "card": CARD, "status": "active", "tier": "Basic", "anonymous": False, "active_before": 1000,
        "active_after": 990, "pending_before": 0, "pending_after": 7, "next_tier": None, "to_next_tier": None,
    }


def test_restricted_card_earns_only(calc):
    answer = calc(STATUS_PROGRAM, receipt([line("a", 1000, 10000)], redeem_points=10),
                  member(status="restricted", audiences=["vip"], pending_points=3))
    # Not anonymous: both promotions -> 8550. max_points 0, nothing written off; 10% of 8550 = 8.55 -> 8.
    assert discounts(answer) == [[("pub", 1000), ("vip", 450)]]
    assert answer["totals"]["max_points"] == 0
    assert answer["totals"]["redeemed_points"] == 0
    assert points(answer) == [8]
    assert answer["messages"] == [f"card {CARD} is restricted: points cannot be written off"]
    assert answer["member"]["anonymous"] is False
    assert answer["member"]["active_after"] == 1000
    assert answer["member"]["pending_before"] == 3
    assert answer["member"]["pending_after"] == 3 + 8


@pytest.mark.parametrize("status", ["suspended", "blocked"])
def test_suspended_or_blocked_card_is_served_as_anonymous_with_message(calc, status):
    answer = calc(STATUS_PROGRAM, receipt([line("a", 1000, 10000)]), member(status=status, audiences=["vip"]))
    # Anonymous: the public promotion only (an audience never matches), no points, no write-off.
    assert discounts(answer) == [[("pub", 1000)]]
    assert points(answer) == [0]
    assert answer["totals"]["max_points"] == 0
    assert answer["promotions"] == ["pub"]
    assert answer["messages"] == [f"card {CARD} is {status}: served as anonymous"]
    assert answer["member"] == {
        "card": CARD, "status": status, "tier": None, "anonymous": True, "active_before": 0, "active_after": 0,
        "pending_before": 0, "pending_after": 0, "next_tier": None, "to_next_tier": None,
    }


def test_blocked_card_asking_for_points_gets_only_the_status_message(calc):
    answer = calc(STATUS_PROGRAM, receipt([line("a", 1000, 10000)], redeem_points=10), member(status="blocked"))
    # The "no card" message is for a receipt with no member at all (ENGINE.md "messages"); this one has a card.
    assert answer["messages"] == [f"card {CARD} is blocked: served as anonymous"]
    assert answer["totals"]["redeemed_points"] == 0


def test_no_card_is_anonymous_and_cannot_write_off(calc):
    answer = calc(STATUS_PROGRAM, receipt([line("a", 1000, 10000)], redeem_points=10), None)
    assert discounts(answer) == [[("pub", 1000)]]
    assert points(answer) == [0]
    assert redeemed(answer) == [0]
    assert answer["totals"]["max_points"] == 0
    assert answer["messages"] == ["no card: points cannot be written off"]
    assert answer["member"] == {
        "card": None, "status": None, "tier": None, "anonymous": True, "active_before": 0, "active_after": 0,
        "pending_before": 0, "pending_after": 0, "next_tier": None, "to_next_tier": None,
    }


# ---- eligibility: validity ------------------------------------------------------------------------------

def discount_at(calc, valid: str, **receipt_kw) -> int:
    """The discount a 10% promotion with ``valid: {valid}`` gives a 1000 line under ``receipt_kw``."""
    program = f"""
        program: t
        promotions:
          - {{id: v, valid: {{{valid}}}, effect: {{percent_off: 10}}}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000)], **receipt_kw), member())
    return answer["totals"]["discount"]


@pytest.mark.parametrize(("at", "expected"), [
    ("2026-03-31T23:59:59", 100),   # the last second of the `to` date is covered
    ("2026-04-01T00:00:00", 0),     # the next midnight is not
])
def test_date_to_covers_its_whole_day(calc, at, expected):
    assert discount_at(calc, "to: 2026-03-31", at=at) == expected


@pytest.mark.parametrize(("at", "expected"), [
    ("2026-03-01T00:00:00", 100),
    ("2026-02-28T23:59:59", 0),
])
def test_date_from_is_inclusive_from_midnight(calc, at, expected):
    assert discount_at(calc, "from: 2026-03-01", at=at) == expected


@pytest.mark.parametrize(("at", "expected"), [
    ("2026-03-31T18:00:00", 100),   # a datetime `to` is inclusive
    ("2026-03-31T18:00:01", 0),
])
def test_datetime_to_is_inclusive(calc, at, expected):
    assert discount_at(calc, "to: 2026-03-31 18:00:00", at=at) == expected


@pytest.mark.parametrize(("at", "expected"), [
    ("2026-03-31T23:59:59-05:00", 100),  # wall clock as written; the offset is dropped, not converted
    ("2026-04-01T00:30:00+03:00", 0),    # 21:30 UTC on the 31st, but 1 April on the local wall clock
])
def test_validity_uses_the_local_wall_clock(calc, at, expected):
    assert discount_at(calc, "to: 2026-03-31", at=at) == expected


@pytest.mark.parametrize(("at", "expected"), [
    ("2026-03-02T09:00:00", 100),   # start included
    ("2026-03-02T08:59:59", 0),
    ("2026-03-02T17:59:59", 100),
    ("2026-03-02T18:00:00", 0),     # end excluded
])
def test_hours_start_included_end_excluded(calc, at, expected):
    assert discount_at(calc, 'hours: "09:00-18:00"', at=at) == expected


@pytest.mark.parametrize(("at", "expected"), [
    ("2026-03-02T22:00:00", 100),
    ("2026-03-02T01:59:59", 100),   # a window whose end is before its start wraps past midnight
    ("2026-03-02T02:00:00", 0),
    ("2026-03-02T21:59:59", 0),
])
def test_hours_window_wrapping_past_midnight(calc, at, expected):
    assert discount_at(calc, 'hours: "22:00-02:00"', at=at) == expected


@pytest.mark.parametrize(("at", "expected"), [
    ("2026-03-06T12:00:00", 100),   # Friday = 5
    ("2026-03-07T12:00:00", 0),     # Saturday = 6
    ("2026-03-02T12:00:00", 100),   # Monday = 1
])
def test_weekdays_monday_is_1(calc, at, expected):
    assert discount_at(calc, "weekdays: [1, 2, 3, 4, 5]", at=at) == expected


@pytest.mark.parametrize(("store", "expected"), [("msk-01", 100), ("spb-01", 0)])
def test_stores(calc, store, expected):
    assert discount_at(calc, "stores: [msk-01]", store=store) == expected


@pytest.mark.parametrize(("channel", "expected"), [("online", 100), ("pos", 0)])
def test_channels(calc, channel, expected):
    assert discount_at(calc, "channels: [online]", channel=channel) == expected


def test_channel_defaults_to_pos(calc):
    program = """
        program: t
        promotions:
          - {id: v, valid: {channels: [pos]}, effect: {percent_off: 10}}
    """
    bare = {"at": "2026-03-02T12:30:00", "lines": [line("a", 1000, 1000)]}
    assert calc(program, bare, member())["totals"]["discount"] == 100


# ---- eligibility: audience, tiers, coupon, conditions ---------------------------------------------------

AUDIENCE_PROGRAM = """
    program: t
    promotions:
      - {id: ab, audience: {include: [a, b], exclude: [x]}, effect: {percent_off: 10}}
"""


@pytest.mark.parametrize(("audiences", "expected"), [
    (["a"], 0),             # include means all of them
    (["a", "b"], 100),
    (["a", "b", "c"], 100),
    (["a", "b", "x"], 0),   # in an excluded audience
])
def test_audience_include_all_and_exclude_none(calc, audiences, expected):
    answer = calc(AUDIENCE_PROGRAM, receipt([line("s", 1000, 1000)]), member(audiences=audiences))
    assert answer["totals"]["discount"] == expected


def test_audience_include_never_matches_anonymous(calc):
    answer = calc(AUDIENCE_PROGRAM, receipt([line("s", 1000, 1000)]), None)
    assert answer["totals"]["discount"] == 0


def test_exclude_only_audience_matches_anonymous(calc):
    program = """
        program: t
        promotions:
          - {id: not-staff, audience: {exclude: [staff]}, effect: {percent_off: 10}}
    """
    assert calc(program, receipt([line("s", 1000, 1000)]), None)["totals"]["discount"] == 100
    assert calc(program, receipt([line("s", 1000, 1000)]), member(audiences=["staff"]))["totals"]["discount"] == 0


@pytest.mark.parametrize(("who", "expected"), [("Gold", 100), ("Basic", 0), (None, 0)])
def test_tier_restricted_promotion(calc, who, expected):
    program = """
        program: t
        tiers:
          levels:
            - {name: Basic, from: 0, accrual_percent: 0}
            - {name: Gold, from: 50000, accrual_percent: 0}
        promotions:
          - {id: gold-only, tiers: [Gold], effect: {percent_off: 10}}
    """
    who_member = None if who is None else member(tier=who)
    assert calc(program, receipt([line("s", 1000, 1000)]), who_member)["totals"]["discount"] == expected


@pytest.mark.parametrize(("coupons", "expected"), [
    (["SPRING"], 100),
    (["OTHER", "SPRING"], 100),
    (["spring"], 0),   # exact, case-sensitive
    ([], 0),
])
def test_coupon_condition(calc, coupons, expected):
    program = """
        program: t
        promotions:
          - {id: c, when: {coupon: SPRING}, effect: {percent_off: 10}}
    """
    answer = calc(program, receipt([line("s", 1000, 1000)], coupons=coupons), member())
    assert answer["totals"]["discount"] == expected


RECEIPT_TOTAL_PROGRAM = """
    program: t
    promotions:
      - {id: big, when: {receipt_total_at_least: 150000}, effect: {percent_off: 10}}
"""


def test_receipt_total_exactly_at_threshold_applies(calc):
    answer = calc(RECEIPT_TOTAL_PROGRAM, receipt([line("s", 1000, 150000)]), member())
    assert discounts(answer) == [[("big", 15000)]]   # 10% of 150000
    assert answer["hints"] == []


def test_receipt_total_is_counted_after_external_discount(calc):
    answer = calc(RECEIPT_TOTAL_PROGRAM, receipt([line("s", 1000, 150000, external_discount=1)]), member())
    # T = 150000 - 1 = 149999 < 150000: not applied; missing 1 is well within 20% of 150000.
    assert answer["totals"]["discount"] == 0
    assert answer["hints"] == [{"promotion": "big", "condition": "receipt_total_at_least", "missing": 1,
                                "message": "add 0.01 to get 10% off"}]


CHEESE_BY_WEIGHT = """
    program: t
    product_groups:
      cheese: {categories: [cheese]}
    promotions:
      - id: cheese-kg
        when: {group_quantity_at_least: {group: cheese, quantity: 1000}}
        scope: {groups: [cheese]}
        effect: {percent_off: 10}
"""


def test_group_quantity_sums_weight_lines(calc):
    lines = [line("gouda", 600, 1000, categories=["cheese"]), line("brie", 400, 1000, categories=["cheese"])]
    answer = calc(CHEESE_BY_WEIGHT, receipt(lines), member())
    # 600 + 400 = 1000 thousandths >= 1000: 10% of 600 = 60, of 400 = 40.
    assert discounts(answer) == [[("cheese-kg", 60)], [("cheese-kg", 40)]]


def test_group_quantity_short_by_one_gram_hints_in_kg(calc):
    lines = [line("gouda", 600, 1000, categories=["cheese"]), line("brie", 399, 1000, categories=["cheese"])]
    answer = calc(CHEESE_BY_WEIGHT, receipt(lines), member())
    # 999 < 1000; missing 1 <= 1000 x 2000 // 10000 = 200; qty(1) = "0.001 kg".
    assert answer["totals"]["discount"] == 0
    assert answer["hints"] == [{"promotion": "cheese-kg", "condition": "group_quantity_at_least", "missing": 1,
                                "message": "add 0.001 kg of cheese to get 10% off"}]


YOGURT_5TH_FREE = """
    program: t
    product_groups:
      yogurt: {skus: [yogurt]}
    promotions:
      - id: yogurt-5th
        when: {group_quantity_at_least: {group: yogurt, quantity: 5000}}
        scope: {groups: [yogurt]}
        effect: {nth_free: 5}
"""


def test_group_quantity_hint_in_pieces(calc):
    answer = calc(YOGURT_5TH_FREE, receipt([line("yogurt", 4000, 100)]), member())
    # missing 1000 <= 5000 x 2000 // 10000 = 1000 (at the edge): hinted; qty(1000) = "1 pcs".
    assert answer["hints"] == [{"promotion": "yogurt-5th", "condition": "group_quantity_at_least",
                                "missing": 1000, "message": "add 1 pcs of yogurt to get 1 of every 5 units free"}]


def test_group_quantity_beyond_reach_is_not_hinted(calc):
    answer = calc(YOGURT_5TH_FREE, receipt([line("yogurt", 3000, 100)]), member())
    # missing 2000 > 1000.
    assert answer["hints"] == []


# ---- limits ---------------------------------------------------------------------------------------------

USES_PROGRAM = """
    program: t
    promotions:
      - {id: twice, limits: {uses_per_member: 2}, effect: {percent_off: 10}}
"""


@pytest.mark.parametrize(("usage", "expected"), [
    ({"twice": 2}, 0),     # used up: usage equal to the limit
    ({"twice": 1}, 100),   # one below
    ({}, 100),
])
def test_uses_per_member(calc, usage, expected):
    answer = calc(USES_PROGRAM, receipt([line("s", 1000, 1000)]), member(usage=usage))
    assert answer["totals"]["discount"] == expected


def test_uses_per_member_never_for_anonymous(calc):
    assert calc(USES_PROGRAM, receipt([line("s", 1000, 1000)]), None)["totals"]["discount"] == 0


@pytest.mark.parametrize(("used", "expected"), [
    (100000, 0),      # budget spent: not eligible
    (99999, 2000),    # still eligible; ENGINE.md makes the budget an eligibility test, the discount is whole
])
def test_discount_budget(calc, used, expected):
    program = """
        program: t
        promotions:
          - {id: budgeted, limits: {discount_budget: 100000}, effect: {percent_off: 20}}
    """
    answer = calc(program, receipt([line("s", 1000, 10000)]), member(), {"budgeted": used})
    assert answer["totals"]["discount"] == expected


@pytest.mark.parametrize(("used", "expected"), [(50, 0), (49, 10)])
def test_points_budget(calc, used, expected):
    program = """
        program: t
        promotions:
          - {id: bonus, limits: {points_budget: 50}, effect: {extra_points: 10}}
    """
    answer = calc(program, receipt([line("s", 1000, 10000)]), member(), {"bonus": used})
    assert answer["totals"]["accrued_points"] == expected


# ---- hints ----------------------------------------------------------------------------------------------

NEAR_10000 = """
    program: t
    promotions:
      - {id: near, when: {receipt_total_at_least: 10000}, effect: {percent_off: 10}}
"""


@pytest.mark.parametrize(("price", "hints"), [
    (8000, [{"promotion": "near", "condition": "receipt_total_at_least", "missing": 2000,
             "message": "add 20.00 to get 10% off"}]),   # missing 2000 = 10000 x 2000 // 10000: within
    (7999, []),                                         # missing 2001: beyond 20%
    (10000, []),                                        # applied, nothing missing
])
def test_receipt_total_hint_within_20_percent(calc, price, hints):
    answer = calc(NEAR_10000, receipt([line("s", 1000, price)]), member())
    assert answer["hints"] == hints


@pytest.mark.parametrize(("price", "hinted"), [(9500, True), (9499, False)])
def test_hint_nearness_follows_hints_within_percent(calc, price, hinted):
    program = """
        program: t
        hints: {within_percent: 5}
        promotions:
          - {id: near, when: {receipt_total_at_least: 10000}, effect: {percent_off: 10}}
    """
    # 5% of 10000 = 500: missing 500 is hinted, 501 is not.
    answer = calc(program, receipt([line("s", 1000, price)]), member())
    assert [h["promotion"] for h in answer["hints"]] == (["near"] if hinted else [])


def test_no_hint_when_another_condition_also_fails(calc):
    program = """
        program: t
        promotions:
          - {id: coupon-and-total, when: {receipt_total_at_least: 10000, coupon: SPRING}, effect: {percent_off: 10}}
          - {id: used-up, limits: {uses_per_member: 1}, when: {receipt_total_at_least: 10000},
             effect: {percent_off: 10}}
    """
    answer = calc(program, receipt([line("s", 1000, 9000)]), member(usage={"used-up": 1}))
    assert answer["hints"] == []


HINT_TEXTS = """
    program: t
    promotions:
      - {id: h0, priority: 9, when: {receipt_total_at_least: 10000}, effect: {percent_off: 12.05}}
      - {id: h1, priority: 8, when: {receipt_total_at_least: 10000}, effect: {percent_off: 12.5}}
      - {id: h2, priority: 7, when: {receipt_total_at_least: 10000}, effect: {amount_off: 150, per: receipt}}
      - {id: h3, priority: 6, when: {receipt_total_at_least: 10000}, effect: {amount_off: 150}}
      - {id: h4, priority: 5, when: {receipt_total_at_least: 10000}, effect: {fixed_price: 9990}}
      - {id: h5, priority: 4, when: {receipt_total_at_least: 10000}, effect: {nth_free: 3}}
      - {id: h6, priority: 3, when: {receipt_total_at_least: 10000}, effect: {points_multiplier: 1.5}}
      - {id: h7, priority: 2, when: {receipt_total_at_least: 10000}, effect: {extra_points_percent: 2}}
      - {id: h8, priority: 1, when: {receipt_total_at_least: 10000}, effect: {extra_points: 50}}
      - {id: h9, priority: 0, when: {receipt_total_at_least: 10000}, effect: {points_multiplier: 2}}
"""

# T = 9000: each promotion misses 1000 <= 2000, "add 10.00 to get ..."
HINT_MESSAGES = [
    ("h0", "add 10.00 to get 12.05% off"),
    ("h1", "add 10.00 to get 12.5% off"),
    ("h2", "add 10.00 to get 1.50 off"),
    ("h3", "add 10.00 to get 1.50 off per unit"),
    ("h4", "add 10.00 to get price 99.90"),
    ("h5", "add 10.00 to get 1 of every 3 units free"),
    ("h6", "add 10.00 to get x1.5 points"),
    ("h7", "add 10.00 to get +2% points"),
    ("h8", "add 10.00 to get +50 points"),
    ("h9", "add 10.00 to get x2 points"),
]


def test_hint_texts_for_every_effect_in_promotion_order(calc):
    answer = calc(HINT_TEXTS, receipt([line("s", 1000, 9000)]), member())
    assert answer["hints"] == [
        {"promotion": pid, "condition": "receipt_total_at_least", "missing": 1000, "message": message}
        for pid, message in HINT_MESSAGES
    ]


def test_points_promotions_are_not_hinted_to_anonymous(calc):
    answer = calc(HINT_TEXTS, receipt([line("s", 1000, 9000)]), None)
    assert [h["promotion"] for h in answer["hints"]] == ["h0", "h1", "h2", "h3", "h4", "h5"]


# ---- input errors ---------------------------------------------------------------------------------------

def test_bad_line_quantity_is_an_input_error_naming_the_field(engine_cls):
    engine = engine_cls(load_program_cached("program: t\n"))
    with pytest.raises(InputError) as err:
        engine.calculate(receipt([line("a", 1000, 100), line("b", 0, 100)]), member(), None)
    assert err.value.path == "receipt.lines[1].quantity"


def test_bad_member_status_is_an_input_error_naming_the_field(engine_cls):
    engine = engine_cls(load_program_cached("program: t\n"))
    with pytest.raises(InputError) as err:
        engine.calculate(receipt([line("a", 1000, 100)]), member(status="frozen"), None)
    assert err.value.path == "member.status"


@pytest.mark.parametrize("offset", ["+25:00", "+03:60", "+18:30", "-19:00", "+2500"])
def test_impossible_utc_offset_is_an_input_error_naming_receipt_at(engine_cls, offset):
    # java.time.ZoneOffset's bound: at most 18:00 either way, minutes 00-59.
    engine = engine_cls(load_program_cached("program: t\n"))
    with pytest.raises(InputError) as err:
        engine.calculate(receipt([line("a", 1000, 100)], at=f"2026-03-02T12:30:00{offset}"), member(), None)
    assert err.value.path == "receipt.at"
    assert "offset" in err.value.reason


@pytest.mark.parametrize("offset", ["+14:00", "-12:00", "Z", "+0300", "+18:00", "-18:00", ""])
def test_real_and_boundary_utc_offsets_are_accepted_and_dropped(calc, offset):
    program = """
        program: t
        promotions:
          - {id: lunch, valid: {hours: "12:00-13:00"}, effect: {percent_off: 10}}
    """
    answer = calc(program, receipt([line("a", 1000, 1000)], at=f"2026-03-02T12:30:00{offset}"), member())
    # 12:30 on the wall clock as written whatever the offset: inside 12:00-13:00, 10% of 1000.
    assert answer["totals"]["discount"] == 100
