"""The pure-Python reference engine, step by step and end to end, on model objects built by hand (no YAML).

Every expected number is worked out in a comment beside it (or taken from SPEC section 4's examples), so a
failure means the reference disagrees with the arithmetic of docs/ENGINE.md, not with an earlier run.
"""
import datetime as dt

import pytest

from loyalty.core.model import (
    Conditions, Effect, Limits, Line, Member, ProductGroup, Program, Promotion, Receipt, Scope, Tier, Tiers,
    Validity,
)
from loyalty.core.reference import (
    ReferenceEngine, calculate_parsed, ceil_div, effect_text, line_floor, money_text, percent_text,
    quantity_text, round_half_up, split,
)

# ---- the SPEC section 3 program, as model objects --------------------------------------------------------

BASIC = Tier("Basic", 0, 300)
SILVER = Tier("Silver", 2_000_000, 500)
GOLD = Tier("Gold", 5_000_000, 700, redeem_max_bp=3000)
GROUPS = (
    ProductGroup("coffee", categories=frozenset({"coffee"})),
    ProductGroup("dairy", skus=frozenset({"milk-1l", "kefir-1l", "cheese-200"})),
    ProductGroup("bakery", categories=frozenset({"bread"})),
)
MONDAY_NOON = dt.datetime(2026, 3, 2, 12, 30)   # 2026-01-01 is a Thursday; +60 days = Monday 2 March


def program(promotions=(), **overrides) -> Program:
    settings = dict(name="demo", point_value=100, stacking="priority", redeem_max_bp=2000,
                    reduced=((2500, 1000),), min_payable_per_line=100, max_discount_bp=9900,
                    tiers=Tiers(levels=(BASIC, SILVER, GOLD)), product_groups=GROUPS,
                    promotions=tuple(promotions))
    settings.update(overrides)
    return Program(**settings)


def milk(**kw) -> Line:
    return Line("milk-1l", 2000, 8990, 17980, categories=("dairy",), **kw)


def cheese(**kw) -> Line:
    return Line("cheese-200", 1000, 45000, 45000, categories=("dairy",), **kw)


def coffee(**kw) -> Line:
    return Line("coffee-beans-1kg", 1000, 89900, 89900, categories=("coffee",), **kw)


def spec_lines(**coffee_kw):
    return [milk(), cheese(), coffee(**coffee_kw)]


def receipt(lines, **kw) -> Receipt:
    settings = dict(at=MONDAY_NOON, store="msk-01", channel="pos")
    settings.update(kw)
    return Receipt(lines=tuple(lines), **settings)


def member(**kw) -> Member:
    settings = dict(card="7000001", status="active", tier="Basic", active_points=1000)
    settings.update(kw)
    return Member(**settings)


def promo(pid, kind, value, per="", **kw) -> Promotion:
    return Promotion(id=pid, effect=Effect(kind, value, per), **kw)


def coffee_scope() -> Scope:
    return Scope(groups=("coffee",))


def run(prog, lines, who=None, budgets_used=None, **receipt_kw) -> dict:
    return calculate_parsed(prog, receipt(lines, **receipt_kw), who, budgets_used)


def given(answer) -> list[list[tuple[str, int]]]:
    return [[(d["promotion"], d["amount"]) for d in line["discounts"]] for line in answer["lines"]]


def column(answer, key) -> list[int]:
    return [line[key] for line in answer["lines"]]


# ---- integer helpers ------------------------------------------------------------------------------------

def test_round_half_up_and_ceil_div():
    assert round_half_up(5, 10) == 1        # 0.5 -> 1
    assert round_half_up(4, 10) == 0        # 0.4 -> 0
    assert round_half_up(59926500, 1000) == 59927   # 59926.5 -> 59927
    assert ceil_div(12345 * 100, 10000) == 124      # 123.45 -> 124
    assert ceil_div(100, 10) == 10


# ---- the split ------------------------------------------------------------------------------------------

def test_split_largest_remainder_ties_go_to_lower_index():
    # 10/3 = 3.33 each: floors 3+3+3 = 9, the one spare unit to the lowest index of the three equal remainders
    assert split(10, [1, 1, 1], [10, 10, 10]) == [4, 3, 3]


def test_split_spare_units_follow_largest_remainders():
    # W=7: 10/7=1.43, 20/7=2.86, 40/7=5.71 -> floors 1,2,5 (8); remainders 3,6,5 (of 7) -> 2 spare to idx 1, 2
    assert split(10, [1, 2, 4]) == [1, 3, 6]


def test_split_line_over_its_room_takes_room_and_rest_is_split_again():
    # 100/3 = 33.3 > room 10: idx 0 takes 10; 90 over [1,1] -> 45, 45
    assert split(100, [1, 1, 1], [10, 100, 100]) == [10, 45, 45]


def test_split_share_equal_to_room_is_not_over():
    # W=4: shares 25, 25, 50; only idx0 is over (25 > 10; idx1 25 <= 30). idx0 takes 10, then
    # 90 over weights [1, 2]: 30 and 60; 30 is exactly idx1's room, which is not "over"
    assert split(100, [1, 1, 2], [10, 30, 100]) == [10, 30, 60]


def test_split_recomputes_from_scratch_after_an_over_line():
    # W=4: shares 50, 25, 25: idx1 25 > 20 -> takes 20, left 80 over weights [2, 1] (W=3):
    # 160/3 = 53.33 (rem 1), 80/3 = 26.67 (rem 2) -> floors 53 + 26 = 79, spare 1 to idx2 -> 27
    assert split(100, [2, 1, 1], [60, 20, 100]) == [53, 20, 27]


def test_split_never_gives_what_no_line_can_take():
    # both shares 50 exceed rooms 10 and 20: they take their rooms and 70 is not given
    assert split(100, [1, 1], [10, 20]) == [10, 20]


def test_split_zero_weight_and_zero_room_lines_take_nothing():
    # W=4 over idx 1, 2: 10/4 = 2.5, 30/4 = 7.5 -> floors 2, 7; equal remainders 2, 2 -> spare to idx1
    assert split(10, [0, 1, 3], [100, 100, 100]) == [0, 3, 7]
    assert split(10, [1, 1], [0, 100]) == [0, 10]
    assert split(0, [1, 2], [5, 5]) == [0, 0]
    assert split(10, [0, 0], [5, 5]) == [0, 0]


# ---- floors ---------------------------------------------------------------------------------------------

def test_line_floor_is_the_higher_of_min_price_and_max_discount_each_rounded_up():
    weighed = Line("cheese-w", 1500, 6000, 9000, min_price=5001)
    # min_price: ceil(5001 x 1500 / 1000) = ceil(7501.5) = 7502; max 99%: ceil(9000 x 100 / 10000) = 90
    assert line_floor(weighed, 9900) == 7502
    # max 99% of 12345: ceil(123.45) = 124
    assert line_floor(Line("x", 1000, 12345, 12345), 9900) == 124
    # with an external discount the base is 10000 - 4000 = 6000: 50% keeps ceil(3000) = 3000
    assert line_floor(Line("x", 1000, 10000, 10000, external_discount=4000), 5000) == 3000


def test_min_price_floor_cuts_a_percent_discount():
    prog = program([promo("half", "percent_off", 5000)])
    # 50% of 10000 = 5000, but min_price 7000 x 1 keeps 7000: discount cut to 10000 - 7000 = 3000
    answer = run(prog, [Line("x", 1000, 10000, 10000, min_price=7000)])
    assert given(answer) == [[("half", 3000)]]
    assert answer["lines"][0]["payable"] == 7000


def test_max_discount_percent_floor_cuts_an_amount_off():
    prog = program([promo("big", "amount_off", 20000, per="unit")])
    # 20000 off a 10000 line; 99% max keeps ceil(10000 x 1%) = 100: discount 9900
    assert given(run(prog, [Line("x", 1000, 10000, 10000)])) == [[("big", 9900)]]


def test_no_discount_line_is_untouched():
    prog = program([promo("p", "percent_off", 1000)])
    answer = run(prog, [milk(no_discount=True), cheese()])
    # cheese: 10% of 45000 = 4500; milk: nothing
    assert given(answer) == [[], [("p", 4500)]]


# ---- SPEC worked examples -------------------------------------------------------------------------------

def test_spec_example_a_cap_20_percent():
    answer = run(program(), spec_lines(), member(), redeem_points=500)
    # cap floor(152880 x 20%) = 30576; rooms sum 152880 - 3 x 100 = 152580 -> 30576; 305 points (< 1000)
    assert answer["totals"]["max_points"] == 305
    assert answer["totals"]["redeemed_points"] == 305
    assert answer["totals"]["redeemed_amount"] == 30500
    # 30500 x 17980/152880 = 3587.06, x 45000/... = 8977.63, x 89900/... = 17935.31 -> spare unit to cheese
    assert column(answer, "redeemed") == [3587, 8978, 17935]
    # money 14393 / 36022 / 71965 at 3%: 4.3179 / 10.8066 / 21.5895, sum 36.714 -> 36;
    # floors 4 + 10 + 21 = 35, the spare point to cheese (.8066)
    assert column(answer, "points") == [4, 11, 21]
    assert answer["totals"]["accrued_points"] == 36
    assert answer["messages"] == ["requested 500 points, 305 can be written off"]
    assert answer["member"]["active_after"] == 1000 - 305
    assert answer["member"]["pending_after"] == 36


def test_spec_example_b_reduced_cap():
    answer = run(program(), spec_lines(external_discount=40000), member(), redeem_points=500)
    # 40000 / 152880 = 26.16% > 25%: cap 10% of payable 152880 - 40000 = 112880 -> 11288 -> 112 points
    assert answer["totals"]["payable"] == 112880
    assert answer["totals"]["external_discount"] == 40000
    assert answer["totals"]["max_points"] == 112


def women_q1() -> Promotion:
    return promo("women-q1-20", "percent_off", 2000, priority=10, audience_include=("women-q1",),
                 valid=Validity(starts=dt.datetime(2026, 1, 1), ends=dt.datetime(2026, 4, 2),
                                weekdays=frozenset({1, 2, 3, 4, 5}), hours=((9 * 3600, 18 * 3600),),
                                stores=frozenset({"msk-01"}), channels=frozenset({"pos", "online"})),
                 when=Conditions(receipt_total_at_least=150000))


def test_spec_example_c_audience_promotion():
    prog = program([women_q1()])
    answer = run(prog, spec_lines(), member(audiences=frozenset({"women-q1"})))
    # 20%: 17980 -> 3596, 45000 -> 9000, 89900 -> 17980; payable 152880 - 30576 = 122304
    assert given(answer) == [[("women-q1-20", 3596)], [("women-q1-20", 9000)], [("women-q1-20", 17980)]]
    assert answer["totals"]["payable"] == 122304
    assert answer["totals"]["discount"] == 30576
    assert answer["promotions"] == ["women-q1-20"]

    outsider = run(prog, spec_lines(), member())
    assert outsider["totals"]["discount"] == 0
    assert outsider["hints"] == []      # the audience fails too: no hint


def test_spec_example_c_hint_when_total_just_short():
    prog = program([women_q1()])
    # coffee 87019: T = 17980 + 45000 + 87019 = 149999, missing 1 <= 150000 x 20% = 30000
    lines = [milk(), cheese(), Line("coffee-beans-1kg", 1000, 87019, 87019, categories=("coffee",))]
    answer = run(prog, lines, member(audiences=frozenset({"women-q1"})))
    assert answer["totals"]["discount"] == 0
    assert answer["hints"] == [{"promotion": "women-q1-20", "condition": "receipt_total_at_least",
                                "missing": 1, "message": "add 0.01 to get 20% off"}]


def spec_d_promotions():
    return [
        promo("P20", "percent_off", 1000, priority=20, scope=coffee_scope()),
        promo("P10", "percent_off", 500, priority=10),
        promo("X5", "percent_off", 1500, priority=5, exclusive=True, scope=coffee_scope()),
    ]


def test_spec_example_d_priority_cascade_skips_the_exclusive():
    answer = run(program(spec_d_promotions()), spec_lines(), member())
    # coffee: 10% of 89900 = 8990 -> 80910; 5% of 80910 = 4045.5 -> 4045 -> 76865; X5 skipped (discounted)
    # milk: 5% of 17980 = 899; cheese: 5% of 45000 = 2250
    assert given(answer) == [[("P10", 899)], [("P10", 2250)], [("P20", 8990), ("P10", 4045)]]
    assert column(answer, "payable") == [17081, 42750, 76865]
    assert answer["promotions"] == ["P20", "P10"]


def test_spec_example_d_best_for_customer_exclusive_wins_on_coffee():
    answer = run(program(spec_d_promotions(), stacking="best_for_customer"), spec_lines(), member())
    # coffee: cascade 8990 + 4045 = 13035 vs X5 alone 15% of 89900 = 13485 -> X5 (76415)
    assert given(answer) == [[("P10", 899)], [("P10", 2250)], [("X5", 13485)]]
    assert column(answer, "payable") == [17081, 42750, 76415]
    assert answer["promotions"] == ["P10", "X5"]     # P20 no longer gives any line a discount


# ---- effects --------------------------------------------------------------------------------------------

def test_exclusive_in_priority_mode_ends_the_walk():
    prog = program([promo("X", "percent_off", 1000, priority=20, exclusive=True, scope=coffee_scope()),
                    promo("P", "percent_off", 500, priority=10)])
    answer = run(prog, spec_lines(), member())
    # coffee: X 10% = 8990 and its walk ends, P does not touch it; milk 5% = 899, cheese 2250
    assert given(answer) == [[("P", 899)], [("P", 2250)], [("X", 8990)]]


def test_exclusive_with_zero_discount_does_not_end_the_walk():
    # fixed price above the current amount gives 0: the line's walk goes on to P
    prog = program([promo("X", "fixed_price", 100000, per="unit", priority=20, exclusive=True,
                          scope=coffee_scope()),
                    promo("P", "percent_off", 500, priority=10, scope=coffee_scope())])
    # coffee: X gives max(0, 89900 - 100000) = 0 (not listed); P 5% of 89900 = 4495
    assert given(run(prog, spec_lines(), member())) == [[], [], [("P", 4495)]]


def test_fixed_price_on_weight_goods_rounds_half_up():
    prog = program([promo("fp", "fixed_price", 39951, per="unit")])
    # 1.5 kg at 500.00: amount 75000; new amount round-half-up(39951 x 1500 / 1000 = 59926.5) = 59927
    # discount 75000 - 59927 = 15073
    answer = run(prog, [Line("ham", 1500, 50000, 75000)])
    assert given(answer) == [[("fp", 15073)]]
    assert answer["lines"][0]["payable"] == 59927


def test_per_unit_amount_off_on_weight_goods_floors():
    prog = program([promo("ao", "amount_off", 999, per="unit")])
    # 1.234 kg: floor(999 x 1234 / 1000 = 1232.766) = 1232
    assert given(run(prog, [Line("apples", 1234, 5000, 6170)])) == [[("ao", 1232)]]
    # piece goods: 999 x 2 = 1998
    assert given(run(prog, [milk()])) == [[("ao", 1998)]]


def test_per_receipt_amount_off_split_by_current_amounts():
    prog = program([promo("r", "amount_off", 1000, per="receipt")])
    # W = 152880: 1000 x 17980/W = 117.61 (rem 93040), x 45000/W = 294.35 (rem 53280),
    # x 89900/W = 588.04 (rem 6560): floors 117 + 294 + 588 = 999, spare unit to milk -> 118 / 294 / 588
    assert given(run(prog, spec_lines())) == [[("r", 118)], [("r", 294)], [("r", 588)]]


def test_per_receipt_amount_off_leaves_out_no_discount_lines():
    prog = program([promo("r", "amount_off", 1000, per="receipt")])
    # cheese no_discount: W = 17980 + 89900 = 107880: 166.67 and 833.33 -> 166 + 833, spare to milk
    answer = run(prog, [milk(), cheese(no_discount=True), coffee()])
    assert given(answer) == [[("r", 167)], [], [("r", 833)]]


def test_per_receipt_exclusive_leaves_out_lines_already_discounted():
    prog = program([promo("P", "percent_off", 1000, priority=20, scope=coffee_scope()),
                    promo("E", "amount_off", 1000, per="receipt", priority=10, exclusive=True)])
    # coffee has P's 8990, so E splits over milk and cheese only, W = 62980:
    # 1000 x 17980 / 62980 = 285.49 (rem 30700), 1000 x 45000 / 62980 = 714.51 (rem 32280) -> spare to cheese
    assert given(run(prog, spec_lines())) == [[("E", 285)], [("E", 715)], [("P", 8990)]]


def test_per_receipt_amount_off_sees_the_amounts_left_by_earlier_promotions():
    prog = program([promo("P", "percent_off", 5000, priority=20, scope=coffee_scope()),
                    promo("R", "amount_off", 100, per="receipt", priority=10)])
    # coffee after P: 89900 - 44950 = 44950; W = 17980 + 45000 + 44950 = 107930
    # 100 x 17980 / W = 16.66 (rem 71120), 100 x 45000 / W = 41.69 (rem 74870), 100 x 44950 / W = 41.65
    # (rem 69870): floors 16 + 41 + 41 = 98, 2 spare -> cheese then milk
    assert given(run(prog, spec_lines())) == [[("R", 17)], [("R", 42)], [("P", 44950), ("R", 41)]]


def bakery_lines(**b_kw):
    return [
        Line("bread-a", 3000, 5000, 15000, categories=("bread",)),            # unit price 5000
        Line("bread-b", 2000, 3000, 6000, categories=("bread",), **b_kw),     # unit price 3000
        Line("bun-w", 1500, 2000, 3000, categories=("bread",)),               # weight: skipped
        Line("bread-c", 1000, 4000, 4000, categories=("bread",)),             # unit price 4000
    ]


def test_nth_free_takes_cheapest_units_first_and_skips_weight_lines():
    bakery = Scope(groups=("bakery",))
    prog = program([promo("n2", "nth_free", 2, scope=bakery)], max_discount_bp=10000)
    # piece units 3 + 2 + 1 = 6 (the 1.5 kg line does not count), free 6 // 2 = 3:
    # bread-b (3000) gives its 2 units: 6000; bread-c (4000) gives 1: 4000; bread-a none
    assert given(run(prog, bakery_lines())) == [[], [("n2", 6000)], [], [("n2", 4000)]]
    prog3 = program([promo("n3", "nth_free", 3, scope=bakery)], max_discount_bp=10000)
    # free 6 // 3 = 2: both from bread-b
    assert given(run(prog3, bakery_lines())) == [[], [("n3", 6000)], [], []]


def test_nth_free_passes_over_lines_at_their_floor():
    prog = program([promo("n3", "nth_free", 3, scope=Scope(groups=("bakery",)))], max_discount_bp=10000)
    # bread-b at min_price 3000 x 2 = 6000 = its amount: no room. Its 2 units still count: free 2.
    # bread-c gives 1 unit: 4000; bread-a gives 1 of 3: floor(15000 x 1 / 3) = 5000
    assert given(run(prog, bakery_lines(min_price=3000))) == [[("n3", 5000)], [], [], [("n3", 4000)]]


def test_nth_free_discount_is_cut_at_the_floor():
    prog = program([promo("n3", "nth_free", 3, scope=Scope(groups=("bakery",)))])   # 99% max
    # bread-b gives 2 units: floor(6000 x 2/2) = 6000, floor ceil(6000 x 1%) = 60 -> cut to 5940
    assert given(run(prog, bakery_lines())) == [[], [("n3", 5940)], [], []]


def test_nth_free_equal_unit_prices_go_to_lower_index():
    prog = program([promo("n3", "nth_free", 3)], max_discount_bp=10000)
    # unit prices 1000 and 1000; U = 3, free 1 from line 0: floor(2000 x 1 / 2) = 1000
    lines = [Line("x", 2000, 1000, 2000), Line("y", 1000, 1000, 1000)]
    assert given(run(prog, lines)) == [[("n3", 1000)], []]


def test_best_for_customer_tie_goes_to_earlier_first_promotion():
    cascade_first = program([promo("A", "amount_off", 1000, per="unit", priority=20, scope=coffee_scope()),
                             promo("E", "amount_off", 1000, per="unit", priority=10, exclusive=True,
                                   scope=coffee_scope())], stacking="best_for_customer")
    # 1000 vs 1000: the cascade's first promotion A comes before E
    assert given(run(cascade_first, spec_lines()))[2] == [("A", 1000)]
    exclusive_first = program([promo("A", "amount_off", 1000, per="unit", priority=10, scope=coffee_scope()),
                               promo("E", "amount_off", 1000, per="unit", priority=30, exclusive=True,
                                     scope=coffee_scope())], stacking="best_for_customer")
    assert given(run(exclusive_first, spec_lines()))[2] == [("E", 1000)]
    # two exclusives with equal priority: id ascending decides ("E1" < "E2")
    two = program([promo("E2", "amount_off", 1000, per="unit", exclusive=True, scope=coffee_scope()),
                   promo("E1", "amount_off", 1000, per="unit", exclusive=True, scope=coffee_scope())],
                  stacking="best_for_customer")
    assert given(run(two, spec_lines()))[2] == [("E1", 1000)]


def test_best_for_customer_receipt_level_exclusive_is_split_on_base_amounts():
    prog = program([promo("C", "percent_off", 2500, priority=20, scope=coffee_scope()),
                    promo("E", "amount_off", 30000, per="receipt", priority=10, exclusive=True)],
                   stacking="best_for_customer")
    # E alone over all three lines, W = 152880: 3528.26 / 8830.41 / 17641.33 -> floors 29999, spare to
    # cheese -> 3528 / 8831 / 17641. Cascade: coffee 25% = 22475 > 17641, so coffee keeps C; milk and cheese
    # take E's shares (coffee's share of E is not given to anyone).
    answer = run(prog, spec_lines())
    assert given(answer) == [[("E", 3528)], [("E", 8831)], [("C", 22475)]]
    assert answer["totals"]["discount"] == 3528 + 8831 + 22475


# ---- eligibility ----------------------------------------------------------------------------------------

def dated(valid: Validity) -> Program:
    return program([promo("v", "amount_off", 100, per="unit", valid=valid)])


def applies(prog, at, **kw) -> bool:
    return run(prog, [milk()], member(), at=at, **kw)["promotions"] == ["v"]


def test_date_to_covers_its_last_second():
    # `to: 2026-04-01` is stored as the exclusive end 2026-04-02 00:00:00
    prog = dated(Validity(starts=dt.datetime(2026, 3, 1), ends=dt.datetime(2026, 4, 2)))
    assert applies(prog, dt.datetime(2026, 4, 1, 23, 59, 59))
    assert not applies(prog, dt.datetime(2026, 4, 2, 0, 0, 0))
    assert applies(prog, dt.datetime(2026, 3, 1, 0, 0, 0))       # from is inclusive
    assert not applies(prog, dt.datetime(2026, 2, 28, 23, 59, 59))


def test_hours_window_end_is_excluded():
    prog = dated(Validity(hours=((9 * 3600, 18 * 3600),)))
    assert applies(prog, dt.datetime(2026, 3, 2, 9, 0, 0))
    assert applies(prog, dt.datetime(2026, 3, 2, 17, 59, 59))
    assert not applies(prog, dt.datetime(2026, 3, 2, 18, 0, 0))
    assert not applies(prog, dt.datetime(2026, 3, 2, 8, 59, 59))


def test_hours_window_past_midnight():
    prog = dated(Validity(hours=((22 * 3600, 2 * 3600),)))
    assert applies(prog, dt.datetime(2026, 3, 2, 23, 0))
    assert applies(prog, dt.datetime(2026, 3, 2, 1, 59, 59))
    assert not applies(prog, dt.datetime(2026, 3, 2, 2, 0))
    assert not applies(prog, dt.datetime(2026, 3, 2, 12, 0))


def test_weekdays_monday_is_one():
    prog = dated(Validity(weekdays=frozenset({1, 2, 3, 4, 5})))
    assert applies(prog, dt.datetime(2026, 3, 2, 12, 0))         # Monday
    assert not applies(prog, dt.datetime(2026, 3, 7, 12, 0))     # Saturday (Monday + 5)
    assert applies(program([promo("v", "amount_off", 100, per="unit",
                                  valid=Validity(weekdays=frozenset({7})))]), dt.datetime(2026, 3, 8, 12, 0))


def test_store_and_channel_lists():
    prog = dated(Validity(stores=frozenset({"msk-01"}), channels=frozenset({"online"})))
    assert not applies(prog, MONDAY_NOON)                                 # channel pos
    assert applies(prog, MONDAY_NOON, channel="online")
    assert not applies(prog, MONDAY_NOON, channel="online", store="spb-02")


def test_coupon_tier_and_audience_exclude():
    coupon = program([promo("v", "amount_off", 100, per="unit", when=Conditions(coupon="WELCOME"))])
    assert not applies(coupon, MONDAY_NOON, coupons=("welcome",))       # case-sensitive
    assert applies(coupon, MONDAY_NOON, coupons=("WELCOME",))
    gold_only = program([promo("v", "amount_off", 100, per="unit", tiers=frozenset({"Gold"}))])
    assert run(gold_only, [milk()], member(tier="Gold"))["promotions"] == ["v"]
    assert run(gold_only, [milk()], member())["promotions"] == []
    assert run(gold_only, [milk()], None)["promotions"] == []
    excl = program([promo("v", "amount_off", 100, per="unit", audience_exclude=("staff",))])
    assert run(excl, [milk()], member(audiences=frozenset({"staff"})))["promotions"] == []
    assert run(excl, [milk()], None)["promotions"] == ["v"]             # anonymous holds no audience


def test_group_quantity_counts_all_group_lines():
    prog = program([promo("v", "amount_off", 100, per="unit",
                          when=Conditions(group_quantity_at_least=("dairy", 3000)))])
    # milk 2000 + cheese 1000 = 3000 >= 3000, even with cheese no_discount
    assert run(prog, [milk(), cheese(no_discount=True)], member())["promotions"] == ["v"]
    assert run(prog, [milk(), coffee()], member())["promotions"] == []


def test_usage_limit_used_up():
    prog = program([promo("v", "amount_off", 100, per="unit", limits=Limits(uses_per_member=1))])
    assert run(prog, [milk()], member(usage={"v": 0}))["promotions"] == ["v"]
    assert run(prog, [milk()], member())["promotions"] == ["v"]                # no usage: 0 uses
    assert run(prog, [milk()], member(usage={"v": 1}))["promotions"] == []
    assert run(prog, [milk()], None)["promotions"] == []                       # anonymous: never


def test_budget_exhausted():
    prog = program([promo("v", "amount_off", 100, per="unit", limits=Limits(discount_budget=5000)),
                    promo("pts", "extra_points", 7, limits=Limits(points_budget=10))])
    assert run(prog, [milk()], member(), budgets_used={"v": 4999, "pts": 9})["promotions"] == ["pts", "v"]
    assert run(prog, [milk()], member(), budgets_used={"v": 5000, "pts": 10})["promotions"] == []


# ---- write-off ------------------------------------------------------------------------------------------

def test_reduced_cap_needs_strictly_more_than_the_threshold():
    one = lambda ext: [Line("tv", 1000, 100000, 100000, external_discount=ext)]   # noqa: E731
    # exactly 25%: 25000 x 10000 = 2500 x 100000 -> not over: cap 20% of 75000 = 15000 -> 150 points
    assert run(program(), one(25000), member())["totals"]["max_points"] == 150
    # 25001: over -> 10% of 74999 = 7499 -> 74 points
    assert run(program(), one(25001), member())["totals"]["max_points"] == 74


def test_tier_redeem_max_percent():
    answer = run(program(), spec_lines(), member(tier="Gold"), redeem_points=500)
    # Gold 30%: floor(152880 x 30%) = 45864 -> 458 points, request 500 -> 458
    assert answer["totals"]["max_points"] == 458
    assert answer["totals"]["redeemed_points"] == 458
    # a crossed reduced threshold still lowers it: 10% of 112880 = 11288 -> 112
    reduced = run(program(), spec_lines(external_discount=40000), member(tier="Gold"))
    assert reduced["totals"]["max_points"] == 112


def test_write_off_limited_by_min_payable_and_balance():
    prog = program(redeem_max_bp=10000, min_payable_per_line=100)
    # 100% cap: floor(17980 x 100%) = 17980, but each line keeps 100: cap_amount 17880 -> 178 points
    assert run(prog, [milk()], member(active_points=1000))["totals"]["max_points"] == 178
    assert run(prog, [milk()], member(active_points=50))["totals"]["max_points"] == 50


def test_no_redeem_lines_are_out_of_the_cap_and_allocation():
    answer = run(program(), [milk(no_redeem=True), cheese(), coffee()], member(), redeem_points=1000)
    # P = 45000 + 89900 = 134900 -> 20% = 26980 -> 269 points -> 26900 over cheese/coffee:
    # 26900 x 45000/134900 = 8973.31 (rem), x 89900/134900 = 17926.69 -> 8973 + 17926 = 26899, spare to coffee
    assert answer["totals"]["max_points"] == 269
    assert column(answer, "redeemed") == [0, 8973, 17927]


# ---- card statuses and messages -------------------------------------------------------------------------

def test_restricted_earns_but_cannot_redeem():
    answer = run(program(), spec_lines(), member(status="restricted"), redeem_points=500)
    assert answer["totals"]["max_points"] == 0
    assert answer["totals"]["redeemed_points"] == 0
    assert answer["messages"] == ["card 7000001 is restricted: points cannot be written off"]
    # 3% of 17980 / 45000 / 89900 in points: 5.394 / 13.5 / 26.97, sum 45.864 -> 45;
    # floors 5 + 13 + 26 = 44, spare to coffee (.97)
    assert column(answer, "points") == [5, 13, 27]
    assert answer["member"]["anonymous"] is False
    assert answer["member"]["active_after"] == 1000
    assert answer["member"]["pending_after"] == 45


@pytest.mark.parametrize("status", ["suspended", "blocked"])
def test_suspended_and_blocked_are_served_as_anonymous(status):
    prog = program([women_q1(), promo("pub", "percent_off", 100, priority=1)])
    answer = run(prog, spec_lines(), member(status=status, audiences=frozenset({"women-q1"})),
                 redeem_points=500)
    # only the public 1%: 179 / 450 / 899; no audience promotion, no points
    assert given(answer) == [[("pub", 179)], [("pub", 450)], [("pub", 899)]]
    assert answer["totals"]["accrued_points"] == 0
    assert answer["totals"]["max_points"] == 0
    assert answer["messages"] == [f"card 7000001 is {status}: served as anonymous"]
    assert answer["member"] == {"card": "7000001", "status": status, "tier": None, "anonymous": True,
                                "active_before": 0, "active_after": 0, "pending_before": 0,
                                "pending_after": 0, "next_tier": None, "to_next_tier": None}


def test_no_card_messages_and_member_block():
    answer = run(program(), spec_lines(), None, redeem_points=500)
    assert answer["messages"] == ["no card: points cannot be written off"]
    assert answer["member"]["card"] is None and answer["member"]["status"] is None
    assert answer["member"]["anonymous"] is True
    assert answer["totals"]["accrued_points"] == 0
    assert run(program(), spec_lines(), None)["messages"] == []


def test_no_message_when_request_fits():
    assert run(program(), spec_lines(), member(), redeem_points=305)["messages"] == []


# ---- accrual --------------------------------------------------------------------------------------------

def test_accrual_rounding_spread_by_largest_remainder():
    lines = [Line("a", 1000, 3333, 3333), Line("b", 1000, 3333, 3333), Line("c", 1000, 3334, 3334)]
    answer = run(program(min_payable_per_line=0), lines, member())
    # 3%: 0.9999 / 0.9999 / 1.0002 points, sum exactly 3 -> floors 0 + 0 + 1 = 1, 2 spare to a and b
    assert column(answer, "points") == [1, 1, 1]


def test_on_redeemed_part_true_earns_on_the_whole_payable():
    answer = run(program(on_redeemed_part=True), spec_lines(), member(), redeem_points=500)
    # written-off part earns too: same as restricted example: 5 / 13 / 27 = 45
    assert column(answer, "points") == [5, 13, 27]


def test_no_accrual_line_earns_nothing():
    answer = run(program(), [milk(no_accrual=True), cheese(), coffee()], member())
    # 13.5 + 26.97 = 40.47 -> 40: floors 13 + 26, spare to coffee
    assert column(answer, "points") == [0, 13, 27]


def test_extra_points_per_receipt_split_by_payable_over_earning_lines_in_scope():
    prog = program([promo("x10", "extra_points", 10, per="receipt", scope=Scope(groups=("dairy",)))])
    answer = run(prog, spec_lines(), member())
    # rate points as above 5 / 13 / 27; extra 10 over milk and cheese, W = 62980:
    # 10 x 17980 / 62980 = 2.85, 10 x 45000 / 62980 = 7.15 -> 2 + 7, spare to milk -> 3 / 7
    assert column(answer, "points") == [5 + 3, 13 + 7, 27]
    assert answer["promotions"] == ["x10"]


def test_extra_points_per_unit_on_piece_lines_only():
    prog = program([promo("u5", "extra_points", 5, per="unit")],
                   tiers=Tiers(levels=(Tier("Basic", 0, 0),)))
    lines = [milk(), Line("apples", 1500, 10000, 15000)]
    # milk 2 pcs x 5 = 10; the weight line gets nothing; no rate points (0%)
    assert column(run(prog, lines, member()), "points") == [10, 0]


def test_points_promotion_without_earning_line_in_scope_is_not_applied():
    prog = program([promo("x10", "extra_points", 10, scope=coffee_scope())])
    answer = run(prog, [milk(), coffee(no_accrual=True)], member())
    # milk 3% = 5.394 -> 5; coffee earns nothing and is the only line in scope
    assert column(answer, "points") == [5, 0]
    assert answer["promotions"] == []


def test_points_multiplier_one_and_a_half():
    prog = program([promo("m15", "points_multiplier", 150, scope=coffee_scope())])
    answer = run(prog, spec_lines(), member())
    # milk 5.394, cheese 13.5, coffee 26.97 x 1.5 = 40.455: sum 59.349 -> 59; floors 5 + 13 + 40 = 58,
    # spare to the largest remainder: cheese (.5 > .455 > .394)
    assert column(answer, "points") == [5, 14, 40]
    assert answer["promotions"] == ["m15"]


def test_largest_multiplier_wins_and_extra_percent_adds_up():
    prog = program([promo("m15", "points_multiplier", 150), promo("m2", "points_multiplier", 200),
                    promo("e2", "extra_points_percent", 200)])
    answer = run(prog, [Line("x", 1000, 10000, 10000)], member())
    # rate 3% + 2% = 5%, multiplier max(1.5, 2) = 2: 10000 x 5% x 2 / 100 = 10 points
    assert column(answer, "points") == [10]
    assert answer["promotions"] == ["e2", "m15", "m2"]       # all priority 0: id order


def test_points_promotions_are_not_applied_to_anonymous():
    prog = program([promo("m2", "points_multiplier", 200)])
    answer = run(prog, spec_lines(), None)
    assert answer["promotions"] == []
    assert answer["totals"]["accrued_points"] == 0


# ---- hints ----------------------------------------------------------------------------------------------

def total_promo():
    return promo("t", "percent_off", 1000, when=Conditions(receipt_total_at_least=150000))


def test_hint_within_twenty_percent_and_not_beyond():
    prog = program([total_promo()])
    # 150000 x 20% = 30000: T = 120000 misses by 30000 -> hinted; T = 119999 misses by 30001 -> not
    near = run(prog, [Line("x", 1000, 120000, 120000)], member())
    assert near["hints"] == [{"promotion": "t", "condition": "receipt_total_at_least", "missing": 30000,
                              "message": "add 300.00 to get 10% off"}]
    assert run(prog, [Line("x", 1000, 119999, 119999)], member())["hints"] == []
    assert run(prog, [Line("x", 1000, 150000, 150000)], member())["hints"] == []   # met: applied


def test_hint_only_when_the_total_is_the_only_condition_missed():
    prog = program([promo("t", "percent_off", 1000, when=Conditions(receipt_total_at_least=150000, coupon="C"))])
    # T = 140000 misses by 10000 (within 30000), but the coupon is missing too: no hint until it is given
    assert run(prog, [Line("x", 1000, 140000, 140000)], member())["hints"] == []
    assert len(run(prog, [Line("x", 1000, 140000, 140000)], member(), coupons=("C",))["hints"]) == 1


def test_group_quantity_hint():
    prog = program([promo("g", "extra_points", 10, when=Conditions(group_quantity_at_least=("dairy", 3500)))])
    # dairy 3000 of 3500: missing 500 <= 3500 x 20% = 700
    answer = run(prog, spec_lines(), member())
    assert answer["hints"] == [{"promotion": "g", "condition": "group_quantity_at_least", "missing": 500,
                                "message": "add 0.500 kg of dairy to get +10 points"}]
    # anonymous: points promotions are not hinted
    assert run(prog, spec_lines(), None)["hints"] == []
    piece = program([promo("g", "percent_off", 500, when=Conditions(group_quantity_at_least=("dairy", 4000)))],
                    hint_within_bp=5000)
    # missing 1000 <= 4000 x 50% = 2000
    assert run(piece, spec_lines(), None)["hints"][0]["message"] == "add 1 pcs of dairy to get 5% off"


def test_texts():
    assert money_text(12000) == "120.00" and money_text(5) == "0.05"
    assert quantity_text(2000) == "2 pcs" and quantity_text(1500) == "1.500 kg" and quantity_text(5) == "0.005 kg"
    assert percent_text(2000) == "20" and percent_text(1250) == "12.5" and percent_text(1205) == "12.05"
    assert effect_text(Effect("amount_off", 12000, "unit")) == "120.00 off per unit"
    assert effect_text(Effect("amount_off", 12000, "receipt")) == "120.00 off"
    assert effect_text(Effect("fixed_price", 19900, "unit")) == "price 199.00"
    assert effect_text(Effect("nth_free", 3)) == "1 of every 3 units free"
    assert effect_text(Effect("points_multiplier", 150)) == "x1.5 points"
    assert effect_text(Effect("extra_points_percent", 500)) == "+5% points"
    assert effect_text(Effect("extra_points", 50, "receipt")) == "+50 points"


# ---- progress to the next tier ------------------------------------------------------------------------

def test_progress_to_next_tier():
    # 1800000 + payable 152880 = 1952880 < Silver 2000000: 47120 to go
    answer = run(program(), spec_lines(), member(purchases_sum=1_800_000))
    assert (answer["member"]["next_tier"], answer["member"]["to_next_tier"]) == ("Silver", 47120)
    # 1900000 + 152880 = 2052880: Gold at 5000000 - 2052880 = 2947120
    answer = run(program(), spec_lines(), member(tier="Silver", purchases_sum=1_900_000))
    assert (answer["member"]["next_tier"], answer["member"]["to_next_tier"]) == ("Gold", 2947120)
    top = run(program(), spec_lines(), member(tier="Gold", purchases_sum=6_000_000))["member"]
    assert (top["next_tier"], top["to_next_tier"]) == (None, None)
    unknown = run(program(), spec_lines(), member())["member"]
    assert (unknown["next_tier"], unknown["to_next_tier"]) == (None, None)


# ---- the engine object and the answer's shape ---------------------------------------------------------

def test_reference_engine_parses_json_and_answers_like_calculate_parsed():
    engine = ReferenceEngine(program())
    answer = engine.calculate(
        {"store": "msk-01", "channel": "pos", "at": "2026-03-02T12:30:00+03:00", "redeem_points": 500,
         "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 2000, "price": 8990},
                   {"sku": "cheese-200", "categories": ["dairy"], "quantity": 1000, "price": 45000},
                   {"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000, "price": 89900}]},
        {"card": "7000001", "status": "active", "tier": "Basic", "active_points": 1000})
    assert engine.program.name == "demo"
    assert column(answer, "redeemed") == [3587, 8978, 17935]      # SPEC example A
    assert column(answer, "points") == [4, 11, 21]
    assert answer == run(program(), spec_lines(), member(), redeem_points=500)


def test_answer_keys_in_contract_order():
    answer = run(program(), spec_lines(), member())
    assert list(answer) == ["lines", "totals", "promotions", "hints", "messages", "member"]
    assert list(answer["lines"][0]) == ["sku", "amount", "external_discount", "discounts", "payable",
                                        "redeemed", "points"]
    assert list(answer["totals"]) == ["amount", "external_discount", "discount", "payable", "max_points",
                                      "redeemed_points", "redeemed_amount", "accrued_points"]
    assert list(answer["member"]) == ["card", "status", "tier", "anonymous", "active_before", "active_after",
                                      "pending_before", "pending_after", "next_tier", "to_next_tier"]
