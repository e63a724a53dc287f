"""End-to-end checks of the compiled core (``loyalty.core._engine.Engine``) on SPEC section 4's worked
examples A-D, with the program built directly from ``loyalty.core.model`` objects (no YAML), plus the
paths that only the compiled core has: the fallback to ``inputs.parse_request`` on an unusual request,
the heap work area of a large receipt (released GIL), and many threads sharing one Engine.

Expected numbers are SPEC's or worked out by hand in the comments; the thorough tests (both engines,
generated receipts) live elsewhere.
"""
from __future__ import annotations

import datetime as dt
import json
import threading

import pytest

from loyalty.core.errors import InputError
from loyalty.core.model import (
    Conditions, Effect, ProductGroup, Program, Promotion, Scope, Tier, Tiers, Validity,
)

_engine = pytest.importorskip("loyalty.core._engine", reason="the compiled core is not built")
Engine = _engine.Engine

AT = "2026-03-02T12:30:00+03:00"     # a Monday, 12:30 local

WOMEN_Q1 = Promotion(
    id="women-q1-20", priority=10, audience_include=("women-q1",),
    valid=Validity(starts=dt.datetime(2026, 1, 1), ends=dt.datetime(2026, 4, 2), weekdays=frozenset({1, 2, 3, 4, 5}),
                   hours=((9 * 3600, 18 * 3600),), stores=frozenset({"msk-01"}),
                   channels=frozenset({"pos", "online"})),
    when=Conditions(receipt_total_at_least=150000),
    effect=Effect("percent_off", 2000),
)


def spec_program(promotions=(WOMEN_Q1,), stacking="priority") -> Program:
    """The program of SPEC section 3, in engine units."""
    return Program(
        name="demo", point_value=100, stacking=stacking, activation_days=14, expiry_days=365,
        redeem_max_bp=2000, reduced=((2500, 1000),), min_payable_per_line=100, max_discount_bp=9900,
        tiers=Tiers(window_days=365, levels=(
            Tier("Basic", 0, 300), Tier("Silver", 2000000, 500), Tier("Gold", 5000000, 700, 3000))),
        product_groups=(ProductGroup("coffee", categories=frozenset({"coffee"})),
                        ProductGroup("dairy", skus=frozenset({"milk-1l", "kefir-1l", "cheese-200"}))),
        promotions=tuple(promotions),
    )


def spec_receipt(redeem_points=0, coffee_external=0, coffee_price=89900) -> dict:
    # milk 2 x 89.90 = 17980, cheese 45000, coffee 89900: sum 152880
    return {"store": "msk-01", "channel": "pos", "at": AT, "redeem_points": redeem_points, "lines": [
        {"sku": "milk-1l", "categories": ["dairy"], "quantity": 2000, "price": 8990},
        {"sku": "cheese-200", "categories": ["dairy"], "quantity": 1000, "price": 45000},
        {"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000, "price": coffee_price,
         "external_discount": coffee_external},
    ]}


def spec_member(**kw) -> dict:
    return {"card": "7000001", "status": "active", "tier": "Basic", "active_points": 1000, "pending_points": 0,
            "audiences": [], **kw}


def column(answer, key):
    return [ln[key] for ln in answer["lines"]]


def test_example_a_cap_of_20_percent_allocates_305_points_and_earns_36():
    answer = Engine(spec_program()).calculate(spec_receipt(redeem_points=500), spec_member())
    t = answer["totals"]
    # cap_amount = floor(152880 x 20 / 100) = 30576 -> 305 points, 30500 minor units
    assert (t["max_points"], t["redeemed_points"], t["redeemed_amount"]) == (305, 305, 30500)
    # 30500 x 17980 / 152880 = 3587.06, x 45000 = 8977.63, x 89900 = 17935.31: the extra unit to cheese
    assert column(answer, "redeemed") == [3587, 8978, 17935]
    # money parts 14393 / 36022 / 71965 at 3%: 4.3179 / 10.8066 / 21.5895, sum 36.714 -> 36 as 4 / 11 / 21
    assert column(answer, "points") == [4, 11, 21]
    assert t["accrued_points"] == 36
    assert answer["messages"] == ["requested 500 points, 305 can be written off"]
    assert answer["member"]["active_after"] == 1000 - 305
    assert answer["member"]["pending_after"] == 36


def test_example_b_external_discount_over_25_percent_reduces_the_cap_to_10():
    answer = Engine(spec_program()).calculate(spec_receipt(redeem_points=500, coffee_external=40000),
                                              spec_member())
    # 40000 / 152880 = 26.16% > 25%: cap 10% of payable 112880 = 11288 -> 112 points
    assert answer["totals"]["payable"] == 112880
    assert answer["totals"]["max_points"] == 112
    assert answer["totals"]["redeemed_amount"] == 11200


def test_example_c_audience_promotion_gives_20_percent_on_every_line():
    engine = Engine(spec_program())
    answer = engine.calculate(spec_receipt(), spec_member(audiences=["women-q1"]))
    # 20% of 17980 / 45000 / 89900
    assert [[d["amount"] for d in ln["discounts"]] for ln in answer["lines"]] == [[3596], [9000], [17980]]
    assert answer["totals"]["payable"] == 122304
    assert answer["promotions"] == ["women-q1-20"]

    outside = engine.calculate(spec_receipt(), spec_member())
    assert outside["totals"]["discount"] == 0 and outside["promotions"] == [] and outside["hints"] == []


def test_example_c_one_kopeck_short_gets_no_discount_and_a_hint():
    # coffee 87019: total 17980 + 45000 + 87019 = 149999, one short of 150000 (within 20% of it)
    answer = Engine(spec_program()).calculate(spec_receipt(coffee_price=87019), spec_member(audiences=["women-q1"]))
    assert answer["totals"]["discount"] == 0
    assert answer["hints"] == [{"promotion": "women-q1-20", "condition": "receipt_total_at_least", "missing": 1,
                                "message": "add 0.01 to get 20% off"}]


STACKING = (
    Promotion(id="P20", priority=20, scope=Scope(skus=("coffee-beans-1kg",)), effect=Effect("percent_off", 1000)),
    Promotion(id="P10", priority=10, effect=Effect("percent_off", 500)),
    Promotion(id="X5", priority=5, exclusive=True, scope=Scope(groups=("coffee",)),
              effect=Effect("percent_off", 1500)),
)


def test_example_d_priority_cascades_and_skips_the_exclusive():
    answer = Engine(spec_program(STACKING)).calculate(spec_receipt(), spec_member())
    # coffee: 89900 - 8990 = 80910, then floor(80910 x 5%) = 4045 -> 76865; milk 899, cheese 2250
    assert [ln["payable"] for ln in answer["lines"]] == [17980 - 899, 45000 - 2250, 76865]
    assert answer["lines"][2]["discounts"] == [{"promotion": "P20", "amount": 8990},
                                               {"promotion": "P10", "amount": 4045}]
    assert answer["promotions"] == ["P20", "P10"]


def test_example_d_best_for_customer_gives_coffee_the_exclusive():
    answer = Engine(spec_program(STACKING, "best_for_customer")).calculate(spec_receipt(), spec_member())
    # coffee: cascade 8990 + 4045 = 13035 < X5 alone 13485 -> 76415; milk and cheese keep P10's 5%
    assert [ln["payable"] for ln in answer["lines"]] == [17980 - 899, 45000 - 2250, 76415]
    assert answer["lines"][2]["discounts"] == [{"promotion": "X5", "amount": 13485}]
    assert answer["promotions"] == ["P10", "X5"]


def test_a_request_off_the_fast_path_gets_the_same_answer():
    # json.loads keys are not the interned literals; str/int subclasses and a wall clock without seconds
    # are accepted by inputs.parse_request, so the core decodes its normalised form
    class Sku(str):
        pass

    engine = Engine(spec_program())
    plain = engine.calculate(spec_receipt(redeem_points=500), spec_member())
    odd = json.loads(json.dumps(spec_receipt(redeem_points=500)))
    odd["at"] = "2026-03-02T12:30"
    odd["lines"][0]["sku"] = Sku("milk-1l")
    assert engine.calculate(odd, json.loads(json.dumps(spec_member()))) == plain


@pytest.mark.parametrize("path, patch", [
    ("receipt.lines[1].quantity", lambda r, m: r["lines"][1].update(quantity=True)),
    ("receipt.at", lambda r, m: r.update(at="2026-02-30T12:00:00")),
    ("receipt.lines[2].external_discount", lambda r, m: r["lines"][2].update(external_discount=90000)),
    ("member.tier", lambda r, m: m.update(tier="Platinum")),
    ("member.status", lambda r, m: m.update(status="frozen")),
])
def test_bad_input_names_the_field(path, patch):
    receipt, member = spec_receipt(), spec_member()
    patch(receipt, member)
    with pytest.raises(InputError) as info:
        Engine(spec_program()).calculate(receipt, member)
    assert info.value.path == path


def test_a_suspended_card_is_served_as_anonymous_without_points():
    answer = Engine(spec_program()).calculate(spec_receipt(redeem_points=10),
                                              spec_member(status="suspended", audiences=["women-q1"]))
    assert answer["totals"]["discount"] == 0          # the audience promotion is not public
    assert answer["totals"]["accrued_points"] == 0 and answer["totals"]["max_points"] == 0
    assert answer["messages"] == ["card 7000001 is suspended: served as anonymous"]
    assert answer["member"]["anonymous"] is True and answer["member"]["status"] == "suspended"


def test_a_1000_line_receipt_uses_the_heap_work_area():
    # 1000 lines x 1 pc x 10.00, 5% off all: 50 each, payable 950; Basic 3%: 950 x 3% / 100 = 0.285 points a
    # line, 285 in all
    program = spec_program((Promotion(id="all-5", effect=Effect("percent_off", 500)),))
    lines = [{"sku": f"sku-{i}", "quantity": 1000, "price": 1000} for i in range(1000)]
    answer = Engine(program).calculate({"at": AT, "lines": lines}, spec_member())
    assert answer["totals"]["discount"] == 50 * 1000
    assert answer["totals"]["accrued_points"] == 285
    # every line's share is 0.285: the 285 points go one each to the first 285 lines (equal remainders,
    # lower index first)
    assert column(answer, "points") == [1] * 285 + [0] * 715


def test_threads_sharing_one_engine_get_the_same_answers():
    engine = Engine(spec_program(STACKING + (WOMEN_Q1,)))
    requests = [(spec_receipt(redeem_points=k * 50, coffee_price=89000 + k), spec_member(audiences=["women-q1"]))
                for k in range(8)]
    expected = [engine.calculate(r, m) for r, m in requests]
    bad = []

    def work():
        for _ in range(200):
            for (r, m), want in zip(requests, expected):
                if engine.calculate(r, m) != want:
                    bad.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
