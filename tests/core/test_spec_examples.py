"""SPEC section 4's worked examples A-D, to the minor unit, over both engines.

The program is SPEC section 3's; the member is Basic with 1000 active points and no audience unless said;
the receipt is milk 2 x 89.90, cheese 1 x 450.00, coffee 1 x 899.00 (sum 152880) on Monday 2026-03-02 at
12:30 in store msk-01 over pos, inside the women-q1-20 window. Every expected number is worked out in the
comment beside it from SPEC section 4 and docs/ENGINE.md (D = 10000 x 100 x point_value = 10^8 for points).
"""
from __future__ import annotations

import pytest

from helpers.builders import line, member, receipt

SPEC_HEAD = """
program: demo
currency: RUB
point_value: 100
stacking: {stacking}
accrual:
  activation_days: 14
  expiry_days: 365
  on_redeemed_part: false
redeem:
  max_percent: 20
  reduced:
    - {{external_discount_over_percent: 25, max_percent: 10}}
  min_payable_per_line: 100
max_discount_percent: 99
tiers:
  metric: purchases_sum
  window_days: 365
  levels:
    - {{name: Basic,  from: 0,       accrual_percent: 3}}
    - {{name: Silver, from: 2000000, accrual_percent: 5}}
    - {{name: Gold,   from: 5000000, accrual_percent: 7, redeem_max_percent: 30}}
product_groups:
  coffee: {{categories: [coffee]}}
  dairy:  {{skus: [milk-1l, kefir-1l, cheese-200]}}
"""

SPEC_PROGRAM = SPEC_HEAD.format(stacking="priority") + """
promotions:
  - id: women-q1-20
    priority: 10
    exclusive: false
    audience: {include: [women-q1]}
    valid: {from: 2026-01-01, to: 2026-04-01, weekdays: [1,2,3,4,5], hours: "09:00-18:00",
            stores: [msk-01], channels: [pos, online]}
    when: {receipt_total_at_least: 150000}
    scope: all
    effect: {percent_off: 20}
"""

STACKING_PROMOTIONS = """
promotions:
  - {id: P20, priority: 20, scope: {groups: [coffee]}, effect: {percent_off: 10}}
  - {id: P10, priority: 10, scope: all, effect: {percent_off: 5}}
  - {id: X5, priority: 5, exclusive: true, scope: {groups: [coffee]}, effect: {percent_off: 15}}
"""


def spec_lines(coffee_price: int = 89900, coffee_external: int = 0) -> list[dict]:
    return [
        line("milk-1l", 2000, 8990, categories=["dairy"]),          # amount 2 x 8990 = 17980
        line("cheese-200", 1000, 45000, categories=["dairy"]),      # 45000
        line("coffee-beans", 1000, coffee_price, categories=["coffee"], external_discount=coffee_external),
    ]


def basic_member(**kw) -> dict:
    return member(tier="Basic", active_points=1000, **kw)


def lines_of(answer: dict) -> list[tuple]:
    """Each line as (sku, amount, external_discount, discounts, payable, redeemed, points)."""
    return [(ln["sku"], ln["amount"], ln["external_discount"],
             [(d["promotion"], d["amount"]) for d in ln["discounts"]], ln["payable"], ln["redeemed"], ln["points"])
            for ln in answer["lines"]]


def test_example_a_cap_20_percent_allocation_and_accrual(calc):
    answer = calc(SPEC_PROGRAM, receipt(spec_lines(), redeem_points=500), basic_member())
    # No audience: women-q1-20 is not eligible. payable = base = 17980 / 45000 / 89900, P = 152880.
    # cap_amount = min(152880 x 2000 // 10000 = 30576, rooms 17880 + 44900 + 89800) = 30576; max_points = 305.
    # applied = min(500, 305) = 305 -> 30500 split by payable: 30500 x 17980 / 152880 = 3587.06,
    # x 45000 -> 8977.63, x 89900 -> 17935.31; floors sum 30499, the one unit left goes to cheese (.63).
    # m = 14393 / 36022 / 71965; exact points m x 300 x 100 / 10^8 = 4.3179 / 10.8066 / 21.5895, sum 36.714
    # -> 36; floors 4 + 10 + 21 = 35, the one left to cheese (.8066).
    assert lines_of(answer) == [
        ("milk-1l", 17980, 0, [], 17980, 3587, 4),
        ("cheese-200", 45000, 0, [], 45000, 8978, 11),
        ("coffee-beans", 89900, 0, [], 89900, 17935, 21),
    ]
    assert answer["totals"] == {
        "amount": 152880, "external_discount": 0, "discount": 0, "payable": 152880, "max_points": 305,
        "redeemed_points": 305, "redeemed_amount": 30500, "accrued_points": 36,
    }
    assert answer["promotions"] == []
    assert answer["hints"] == []  # women-q1-20 fails on audience, not only on the total: no hint
    assert answer["messages"] == ["requested 500 points, 305 can be written off"]
    assert answer["member"] == {
        "card": "7000001", "status": "active", "tier": "Basic", "anonymous": False,
        "active_before": 1000, "active_after": 1000 - 305, "pending_before": 0, "pending_after": 36,
        "next_tier": None, "to_next_tier": None,  # no purchases_sum given
    }


def test_example_b_external_discount_over_25_percent_reduces_cap_to_10(calc):
    answer = calc(SPEC_PROGRAM, receipt(spec_lines(coffee_external=40000), redeem_points=500), basic_member())
    # E = 40000, A = 152880: 40000 x 10000 = 4.0e8 > 2500 x 152880 = 3.822e8 (26.16% > 25%) -> cap 10%.
    # base = 17980 / 45000 / 49900, P = 112880; cap_amount = 112880 x 1000 // 10000 = 11288; max_points 112.
    # applied 112 -> 11200 split: 11200 x 17980 / 112880 = 1783.98, x 45000 -> 4464.92, x 49900 -> 4951.10;
    # floors 11198, two left: milk (.98) and cheese (.92) -> 1784 / 4465 / 4951.
    # m = 16196 / 40535 / 44949 -> 4.8588 / 12.1605 / 13.4847, sum 30.504 -> 30; floors 29, one to milk (.8588).
    assert lines_of(answer) == [
        ("milk-1l", 17980, 0, [], 17980, 1784, 5),
        ("cheese-200", 45000, 0, [], 45000, 4465, 12),
        ("coffee-beans", 89900, 40000, [], 49900, 4951, 13),
    ]
    assert answer["totals"] == {
        "amount": 152880, "external_discount": 40000, "discount": 0, "payable": 112880, "max_points": 112,
        "redeemed_points": 112, "redeemed_amount": 11200, "accrued_points": 30,
    }
    assert answer["promotions"] == []
    assert answer["messages"] == ["requested 500 points, 112 can be written off"]
    assert answer["member"]["active_after"] == 1000 - 112
    assert answer["member"]["pending_after"] == 30


def test_example_c_audience_promotion_20_percent_on_every_line(calc):
    answer = calc(SPEC_PROGRAM, receipt(spec_lines()), basic_member(audiences=["women-q1"]))
    # T = 152880 >= 150000, member in women-q1, Monday 12:30, msk-01, pos: 20% off every line.
    # 17980 x 2000 // 10000 = 3596; 45000 -> 9000; 89900 -> 17980 (floors at 1% of base are far below).
    # payable 14384 / 36000 / 71920 = 122304. max_points: 122304 x 2000 // 10000 = 24460 -> 244.
    # No write-off asked: m = payable -> 4.3152 / 10.8 / 21.576, sum 36.6912 -> 36; floors 35, one to cheese (.8).
    assert lines_of(answer) == [
        ("milk-1l", 17980, 0, [("women-q1-20", 3596)], 14384, 0, 4),
        ("cheese-200", 45000, 0, [("women-q1-20", 9000)], 36000, 0, 11),
        ("coffee-beans", 89900, 0, [("women-q1-20", 17980)], 71920, 0, 21),
    ]
    assert answer["totals"] == {
        "amount": 152880, "external_discount": 0, "discount": 3596 + 9000 + 17980, "payable": 122304,
        "max_points": 244, "redeemed_points": 0, "redeemed_amount": 0, "accrued_points": 36,
    }
    assert answer["promotions"] == ["women-q1-20"]
    assert answer["hints"] == []
    assert answer["messages"] == []
    assert answer["member"]["active_after"] == 1000
    assert answer["member"]["pending_after"] == 36


def test_example_c_member_outside_audience_gets_no_discount_and_no_hint(calc):
    answer = calc(SPEC_PROGRAM, receipt(spec_lines()), basic_member(audiences=["men-q1"]))
    assert [ln["discounts"] for ln in answer["lines"]] == [[], [], []]
    assert [ln["payable"] for ln in answer["lines"]] == [17980, 45000, 89900]
    assert answer["totals"]["discount"] == 0
    assert answer["totals"]["payable"] == 152880
    assert answer["promotions"] == []
    assert answer["hints"] == []  # audience fails: not a near miss on the total
    # 152880 x 2000 // 10000 = 30576 -> 305 points; points 5.394 / 13.5 / 26.97 (m x 3%) sum 45.864 -> 45:
    # floors 5 + 13 + 26 = 44, one left to the largest remainder, coffee (.97).
    assert answer["totals"]["max_points"] == 305
    assert [ln["points"] for ln in answer["lines"]] == [5, 13, 27]


def test_example_c_anonymous_receipt_gets_no_discount_no_points(calc):
    answer = calc(SPEC_PROGRAM, receipt(spec_lines()), None)
    assert lines_of(answer) == [
        ("milk-1l", 17980, 0, [], 17980, 0, 0),
        ("cheese-200", 45000, 0, [], 45000, 0, 0),
        ("coffee-beans", 89900, 0, [], 89900, 0, 0),
    ]
    assert answer["totals"] == {
        "amount": 152880, "external_discount": 0, "discount": 0, "payable": 152880, "max_points": 0,
        "redeemed_points": 0, "redeemed_amount": 0, "accrued_points": 0,
    }
    assert answer["promotions"] == []
    assert answer["hints"] == []
    assert answer["messages"] == []


def test_example_c_total_149999_gets_no_discount_and_a_hint_for_the_near_miss(calc):
    # coffee at 87019: T = 17980 + 45000 + 87019 = 149999, one kopeck short of 150000.
    answer = calc(SPEC_PROGRAM, receipt(spec_lines(coffee_price=87019)), basic_member(audiences=["women-q1"]))
    assert [ln["discounts"] for ln in answer["lines"]] == [[], [], []]
    assert answer["totals"]["payable"] == 149999
    assert answer["totals"]["discount"] == 0
    assert answer["promotions"] == []
    # missing = 150000 - 149999 = 1 <= 150000 x 2000 // 10000 = 30000: hinted; money(1) = "0.01".
    assert answer["hints"] == [{
        "promotion": "women-q1-20", "condition": "receipt_total_at_least", "missing": 1,
        "message": "add 0.01 to get 20% off",
    }]


def test_example_c_hint_add_120_00_to_get_20_percent_off(calc):
    # SPEC's own hint text: coffee at 75020 gives T = 17980 + 45000 + 75020 = 138000, missing 12000 <= 30000.
    answer = calc(SPEC_PROGRAM, receipt(spec_lines(coffee_price=75020)), basic_member(audiences=["women-q1"]))
    assert answer["totals"]["discount"] == 0
    assert answer["hints"] == [{
        "promotion": "women-q1-20", "condition": "receipt_total_at_least", "missing": 12000,
        "message": "add 120.00 to get 20% off",
    }]


def test_example_d_priority_stacking_cascades_and_skips_the_exclusive(calc):
    program = SPEC_HEAD.format(stacking="priority") + STACKING_PROMOTIONS
    answer = calc(program, receipt(spec_lines()), basic_member())
    # Order P20, P10, X5. milk: P10 17980 x 500 // 10000 = 899 -> 17081. cheese: P10 2250 -> 42750.
    # coffee: P20 8990 -> 80910; P10 floor(80910 x 0.05 = 4045.5) = 4045 -> 76865; X5 skipped (already discounted).
    # P = 17081 + 42750 + 76865 = 136696; cap 136696 x 2000 // 10000 = 27339 -> max_points 273.
    # points (3%): 5.1243 / 12.825 / 23.0595, sum 41.0088 -> 41; floors 40, one to cheese (.825).
    assert lines_of(answer) == [
        ("milk-1l", 17980, 0, [("P10", 899)], 17081, 0, 5),
        ("cheese-200", 45000, 0, [("P10", 2250)], 42750, 0, 13),
        ("coffee-beans", 89900, 0, [("P20", 8990), ("P10", 4045)], 76865, 0, 23),
    ]
    assert answer["totals"] == {
        "amount": 152880, "external_discount": 0, "discount": 899 + 2250 + 8990 + 4045, "payable": 136696,
        "max_points": 273, "redeemed_points": 0, "redeemed_amount": 0, "accrued_points": 41,
    }
    assert answer["promotions"] == ["P20", "P10"]


def test_example_d_best_for_customer_exclusive_wins_on_coffee(calc):
    program = SPEC_HEAD.format(stacking="best_for_customer") + STACKING_PROMOTIONS
    answer = calc(program, receipt(spec_lines()), basic_member())
    # coffee: cascade P20 + P10 = 8990 + 4045 = 13035 vs X5 alone on base 89900 x 1500 // 10000 = 13485:
    # X5 wins -> 76415. milk and cheese: only the cascade (P10) -> 899 and 2250.
    # P = 17081 + 42750 + 76415 = 136246; cap 27249 -> max_points 272.
    # points: 5.1243 / 12.825 / 22.9245, sum 40.8738 -> 40; floors 39, one to coffee (.9245).
    assert lines_of(answer) == [
        ("milk-1l", 17980, 0, [("P10", 899)], 17081, 0, 5),
        ("cheese-200", 45000, 0, [("P10", 2250)], 42750, 0, 12),
        ("coffee-beans", 89900, 0, [("X5", 13485)], 76415, 0, 23),
    ]
    assert answer["totals"] == {
        "amount": 152880, "external_discount": 0, "discount": 899 + 2250 + 13485, "payable": 136246,
        "max_points": 272, "redeemed_points": 0, "redeemed_amount": 0, "accrued_points": 40,
    }
    # P20 gave no line a kept discount (coffee keeps X5 only): not applied.
    assert answer["promotions"] == ["P10", "X5"]


@pytest.mark.parametrize("stacking", ["priority", "best_for_customer"])
def test_example_d_milk_and_cheese_are_the_same_in_both_modes(calc, stacking):
    program = SPEC_HEAD.format(stacking=stacking) + STACKING_PROMOTIONS
    answer = calc(program, receipt(spec_lines()), basic_member())
    assert [ln["payable"] for ln in answer["lines"][:2]] == [17980 - 899, 45000 - 2250]
