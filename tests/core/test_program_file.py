"""The program file (SPEC section 3): every bad file names the exact path of the bad field with a useful
reason; a good file gives the engine's normalised units (basis points, hundredths, exclusive ends)."""
import datetime as dt
import pathlib
from decimal import Decimal

import pytest
import yaml

from loyalty.core import ProgramError, load_program, load_program_text, program_from_dict
from loyalty.core.model import Effect, Scope

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"

SPEC_PROGRAM = """\
program: demo
currency: RUB
point_value: 100
stacking: priority
accrual:
  activation_days: 14
  expiry_days: 365
  on_redeemed_part: false
redeem:
  max_percent: 20
  reduced:
    - {external_discount_over_percent: 25, max_percent: 10}
  min_payable_per_line: 100
max_discount_percent: 99
tiers:
  metric: purchases_sum
  window_days: 365
  levels:
    - {name: Basic,  from: 0,       accrual_percent: 3}
    - {name: Silver, from: 2000000, accrual_percent: 5}
    - {name: Gold,   from: 5000000, accrual_percent: 7, redeem_max_percent: 30}
product_groups:
  coffee: {categories: [coffee]}
  dairy:  {skus: [milk-1l, kefir-1l, cheese-200]}
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


def base() -> dict:
    return yaml.safe_load(SPEC_PROGRAM)


def error_of(d: dict) -> ProgramError:
    with pytest.raises(ProgramError) as info:
        program_from_dict(d)
    return info.value


def promo(**overrides) -> dict:
    p = {"id": "p1", "effect": {"percent_off": 10}}
    p.update(overrides)
    return p


def with_promos(*promos) -> dict:
    d = base()
    d["promotions"] = d["promotions"] + list(promos)
    return d


# ---- the SPEC program, normalised ------------------------------------------------------------------------

def test_spec_program_is_normalised_to_engine_units():
    p = load_program_text(SPEC_PROGRAM)
    assert (p.name, p.currency, p.point_value, p.stacking) == ("demo", "RUB", 100, "priority")
    assert (p.activation_days, p.expiry_days, p.on_redeemed_part) == (14, 365, False)
    assert p.redeem_max_bp == 2000                  # 20% -> 2000 bp
    assert p.reduced == ((2500, 1000),)             # over 25% -> cap 10%
    assert p.min_payable_per_line == 100
    assert p.max_discount_bp == 9900
    assert p.hint_within_bp == 2000                 # hints.within_percent defaults to 20
    assert p.tiers.metric == "purchases_sum" and p.tiers.window_days == 365
    assert [(t.name, t.threshold, t.accrual_bp, t.redeem_max_bp) for t in p.tiers.levels] == [
        ("Basic", 0, 300, None), ("Silver", 2000000, 500, None), ("Gold", 5000000, 700, 3000)]
    groups = {g.name: g for g in p.product_groups}
    assert groups["coffee"].categories == {"coffee"} and groups["coffee"].skus == frozenset()
    assert groups["dairy"].skus == {"milk-1l", "kefir-1l", "cheese-200"}

    (w,) = p.promotions
    assert (w.id, w.priority, w.exclusive) == ("women-q1-20", 10, False)
    assert w.audience_include == ("women-q1",) and w.audience_exclude == ()
    assert w.effect == Effect("percent_off", 2000, "")
    assert w.valid.starts == dt.datetime(2026, 1, 1)
    # `to: 2026-04-01` covers its whole day: the exclusive end is the next midnight
    assert w.valid.ends == dt.datetime(2026, 4, 2)
    assert w.valid.weekdays == {1, 2, 3, 4, 5}
    assert w.valid.hours == ((9 * 3600, 18 * 3600),)
    assert w.valid.stores == {"msk-01"} and w.valid.channels == {"pos", "online"}
    assert w.when.receipt_total_at_least == 150000
    assert w.scope == Scope() and w.scope.is_all
    assert p.source == base()                       # the parsed file, as yaml.safe_load gives it


def test_demo_example_file_loads():
    p = load_program(EXAMPLES.parent / "server" / "demo" / "program.yaml")
    assert p.promotions[0].id == "women-q1-20"
    assert p.promotions[0].effect == Effect("percent_off", 2000, "")


def test_defaults_of_a_minimal_program():
    p = program_from_dict({"program": "mini"})
    assert (p.currency, p.point_value, p.stacking, p.redeem_max_bp, p.max_discount_bp) == (
        "RUB", 100, "priority", 10000, 10000)
    assert (p.activation_days, p.expiry_days, p.min_payable_per_line, p.hint_within_bp) == (0, None, 0, 2000)
    # no tiers: one Basic level from 0 at accrual.percent (default 0)
    assert [(t.name, t.threshold, t.accrual_bp) for t in p.tiers.levels] == [("Basic", 0, 0)]
    assert p.promotions == ()


def test_accrual_percent_makes_the_single_level_without_tiers():
    p = program_from_dict({"program": "x", "accrual": {"percent": 2.5}})
    assert [(t.name, t.threshold, t.accrual_bp) for t in p.tiers.levels] == [("Basic", 0, 250)]


def test_two_decimal_percentages_read_exactly():
    text = SPEC_PROGRAM.replace("max_percent: 20", "max_percent: 12.5").replace(
        "max_discount_percent: 99", "max_discount_percent: 99.99").replace("{percent_off: 20}", "{percent_off: 0.07}")
    p = load_program_text(text)
    assert p.redeem_max_bp == 1250
    assert p.max_discount_bp == 9999
    assert p.promotions[0].effect.value == 7       # 0.07% = 7 bp; float(0.07) * 100 would be 7.000000000000001
    assert p.source["redeem"]["max_percent"] == 12.5   # source stays what yaml.safe_load gives


def test_float_percentages_from_a_dict_are_exact_too():
    d = base()
    d["redeem"]["max_percent"] = 0.29              # 0.29 * 100 == 28.999999999999996 in float arithmetic
    assert program_from_dict(d).redeem_max_bp == 29


def test_effect_units_and_default_per():
    d = with_promos(
        promo(id="a", effect={"amount_off": 5000}),
        promo(id="b", effect={"amount_off": 50000, "per": "receipt"}),
        promo(id="c", effect={"fixed_price": 19900}),
        promo(id="d", effect={"nth_free": 3}),
        promo(id="e", effect={"points_multiplier": 1.5}),
        promo(id="f", effect={"extra_points_percent": 250}),
        promo(id="g", effect={"extra_points": 50}),
        promo(id="h", effect={"extra_points": 5, "per": "unit"}),
        promo(id="i", effect={"points_multiplier": 3}),
    )
    effects = {p.id: p.effect for p in program_from_dict(d).promotions}
    assert effects["a"] == Effect("amount_off", 5000, "unit")
    assert effects["b"] == Effect("amount_off", 50000, "receipt")
    assert effects["c"] == Effect("fixed_price", 19900, "unit")
    assert effects["d"] == Effect("nth_free", 3, "")
    assert effects["e"] == Effect("points_multiplier", 150, "")      # x1.5 -> 150 hundredths
    assert effects["f"] == Effect("extra_points_percent", 25000, "")  # +250% -> 25000 bp
    assert effects["g"] == Effect("extra_points", 50, "receipt")
    assert effects["h"] == Effect("extra_points", 5, "unit")
    assert effects["i"] == Effect("points_multiplier", 300, "")


def test_datetime_bounds_and_hours_windows():
    text = SPEC_PROGRAM.replace(
        "valid: {from: 2026-01-01, to: 2026-04-01, weekdays: [1,2,3,4,5], hours: \"09:00-18:00\",",
        "valid: {from: 2026-01-01 10:00:00, to: 2026-01-31 18:30:00, hours: [\"22:00-02:00\", \"12:00-24:00\"],")
    v = load_program_text(text).promotions[0].valid
    assert v.starts == dt.datetime(2026, 1, 1, 10, 0)
    assert v.ends == dt.datetime(2026, 1, 31, 18, 30, 1)            # inclusive 18:30:00 -> exclusive +1 s
    assert v.hours == ((22 * 3600, 2 * 3600), (12 * 3600, 24 * 3600))  # wrap past midnight; 24:00 as an end
    assert v.weekdays == frozenset()


def test_iso_strings_are_accepted_as_bounds():
    d = with_promos(promo(valid={"from": "2026-03-01", "to": "2026-03-31T23:59:59"}))
    v = program_from_dict(d).promotions[1].valid
    assert (v.starts, v.ends) == (dt.datetime(2026, 3, 1), dt.datetime(2026, 4, 1))


def test_scope_when_limits_audience_tiers():
    d = with_promos(promo(
        title="t", priority=-5, exclusive=True, tiers=["Gold", "Silver"],
        audience={"include": ["a", "b"], "exclude": ["staff"]},
        when={"group_quantity_at_least": {"group": "dairy", "quantity": 2500}, "coupon": "X1"},
        scope={"groups": ["dairy"], "skus": ["s1"], "categories": ["c1"], "exclude_groups": ["coffee"],
               "exclude_skus": ["s2"], "exclude_categories": ["c2"]},
        limits={"uses_per_member": 2, "period": "week", "discount_budget": 1000000},
    ))
    p = program_from_dict(d).promotions[1]
    assert (p.title, p.priority, p.exclusive, p.tiers) == ("t", -5, True, {"Gold", "Silver"})
    assert (p.audience_include, p.audience_exclude) == (("a", "b"), ("staff",))
    assert p.when.group_quantity_at_least == ("dairy", 2500) and p.when.coupon == "X1"
    assert p.when.receipt_total_at_least is None
    assert p.scope == Scope(("dairy",), ("s1",), ("c1",), ("coffee",), ("s2",), ("c2",))
    assert (p.limits.uses_per_member, p.limits.period, p.limits.discount_budget, p.limits.points_budget) == (
        2, "week", 1000000, None)


def test_passthrough_sections_are_kept_uninterpreted():
    d = base()
    d["segments"] = {"women": {"all": [{"gender": "f"}]}}
    d["audiences"] = {"women-q1": {"include": ["women"]}}
    d["scenarios"] = [{"id": "welcome", "weird": {"anything": 1}}]
    p = program_from_dict(d)
    assert p.source["scenarios"][0]["weird"] == {"anything": 1}


# ---- bad files: exact path and reason --------------------------------------------------------------------

def set_in(d, dotted, value):
    """Set d[...] along a path like 'promotions.0.effect'."""
    keys = dotted.split(".")
    target = d
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


def delete_in(d, dotted):
    keys = dotted.split(".")
    target = d
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    del target[keys[-1]]


BAD_VALUES = [
    # (where to set, value, expected path, words the reason must contain)
    ("promotions.0.efect", {"percent_off": 1}, "promotions[0].efect", "unknown key"),
    ("colour", "red", "colour", "unknown key"),
    ("accrual.percentt", 1, "accrual.percentt", "unknown key"),
    ("redeem.reduced.0.max_precent", 5, "redeem.reduced[0].max_precent", "unknown key"),
    ("tiers.levels.1.colour", "x", "tiers.levels[1].colour", "unknown key"),
    ("promotions.0.valid.hour", "09:00-18:00", "promotions[0].valid.hour", "unknown key"),
    ("promotions.0.effect.percent", 20, "promotions[0].effect.percent", "unknown key"),
    ("product_groups.dairy.sku", ["a"], "product_groups.dairy.sku", "unknown key"),
    ("program", "", "program", "must not be empty"),
    ("program", 12, "program", "expected a string"),
    ("currency", "rubles", "currency", "three-letter"),
    ("point_value", 0, "point_value", "at least 1"),
    ("point_value", True, "point_value", "expected a"),           # bool is not an integer
    ("point_value", 100.0, "point_value", "expected a"),
    ("stacking", "best", "stacking", "priority, best_for_customer"),
    ("accrual.activation_days", -1, "accrual.activation_days", "at least 0"),
    ("accrual.expiry_days", 0, "accrual.expiry_days", "at least 1"),
    ("accrual.on_redeemed_part", "no", "accrual.on_redeemed_part", "true or false"),
    ("redeem.max_percent", 101, "redeem.max_percent", "between 0 and 100"),
    ("redeem.max_percent", -1, "redeem.max_percent", "between 0 and 100"),
    ("redeem.max_percent", 12.345, "redeem.max_percent", "at most two decimals"),
    ("redeem.max_percent", "20%", "redeem.max_percent", "expected a percentage"),
    ("redeem.max_percent", float("nan"), "redeem.max_percent", "expected a percentage"),
    ("redeem.reduced.0.max_percent", 120, "redeem.reduced[0].max_percent", "between 0 and 100"),
    ("redeem.reduced", {"a": 1}, "redeem.reduced", "expected a list"),
    ("redeem.min_payable_per_line", -100, "redeem.min_payable_per_line", "at least 0"),
    ("redeem.min_payable_per_line", 1.5, "redeem.min_payable_per_line", "integer"),
    ("max_discount_percent", 100.01, "max_discount_percent", "between 0 and 100"),
    ("hints", {"within_percent": 150}, "hints.within_percent", "between 0 and 100"),
    ("tiers.metric", "visits", "tiers.metric", "purchases_sum"),
    ("tiers.window_days", 0, "tiers.window_days", "at least 1"),
    ("tiers.levels", [], "tiers.levels", "non-empty list"),
    ("tiers.levels.0.from", 100, "tiers.levels[0].from", "must start from 0"),
    ("tiers.levels.1.from", 0, "tiers.levels[1].from", "strictly ascending"),
    ("tiers.levels.2.from", 2000000, "tiers.levels[2].from", "strictly ascending"),
    ("tiers.levels.1.name", "Basic", "tiers.levels[1].name", "duplicate tier name"),
    ("tiers.levels.1.accrual_percent", 100.5, "tiers.levels[1].accrual_percent", "between 0 and 100"),
    ("tiers.levels.2.redeem_max_percent", 130, "tiers.levels[2].redeem_max_percent", "between 0 and 100"),
    ("product_groups.dairy", {}, "product_groups.dairy", "needs skus or categories"),
    ("product_groups.dairy.skus", [4601234567890], "product_groups.dairy.skus[0]", "quote it"),
    ("product_groups", ["dairy"], "product_groups", "expected a mapping"),
    ("promotions", {"id": "x"}, "promotions", "expected a list"),
    ("promotions.0", "women", "promotions[0]", "expected a mapping"),
    ("promotions.0.id", "", "promotions[0].id", "must not be empty"),
    ("promotions.0.priority", "high", "promotions[0].priority", "integer"),
    ("promotions.0.exclusive", 1, "promotions[0].exclusive", "true or false"),
    ("promotions.0.audience.include", "women-q1", "promotions[0].audience.include", "list of strings"),
    ("promotions.0.tiers", ["Platinum"], "promotions[0].tiers[0]", "unknown tier 'Platinum'"),
    ("promotions.0.tiers", [], "promotions[0].tiers", "empty list"),
    ("promotions.0.valid.from", "next monday", "promotions[0].valid.from", "expected a date"),
    ("promotions.0.valid.to", dt.datetime(2026, 4, 1, 12, 0, tzinfo=dt.timezone.utc),
     "promotions[0].valid.to", "time zone"),
    ("promotions.0.valid.to", dt.date(2025, 12, 31), "promotions[0].valid.to", "before valid.from"),
    ("promotions.0.valid.weekdays", [1, 8], "promotions[0].valid.weekdays[1]", "at most 7"),
    ("promotions.0.valid.weekdays", [0], "promotions[0].valid.weekdays[0]", "at least 1"),
    ("promotions.0.valid.weekdays", [], "promotions[0].valid.weekdays", "non-empty list"),
    ("promotions.0.valid.hours", "9-18", "promotions[0].valid.hours", "HH:MM-HH:MM"),
    ("promotions.0.valid.hours", "09:00-24:30", "promotions[0].valid.hours", "24:00 as an end"),
    ("promotions.0.valid.hours", "24:00-06:00", "promotions[0].valid.hours", "not a time of day"),
    ("promotions.0.valid.hours", "09:60-18:00", "promotions[0].valid.hours", "not a time of day"),
    ("promotions.0.valid.hours", "10:00-10:00", "promotions[0].valid.hours", "start and end are equal"),
    ("promotions.0.valid.hours", ["09:00-12:00", "13:00"], "promotions[0].valid.hours[1]", "HH:MM-HH:MM"),
    ("promotions.0.valid.stores", [], "promotions[0].valid.stores", "empty list"),
    ("promotions.0.valid.channels", "pos", "promotions[0].valid.channels", "list of strings"),
    ("promotions.0.when.receipt_total_at_least", -1, "promotions[0].when.receipt_total_at_least", "at least 0"),
    ("promotions.0.when.receipt_total_at_least", 1500.0, "promotions[0].when.receipt_total_at_least", "integer"),
    ("promotions.0.when.group_quantity_at_least", {"group": "bread", "quantity": 1000},
     "promotions[0].when.group_quantity_at_least.group", "unknown product group 'bread'"),
    ("promotions.0.when.group_quantity_at_least", {"group": "dairy"},
     "promotions[0].when.group_quantity_at_least.quantity", "required"),
    ("promotions.0.when.group_quantity_at_least", {"group": "dairy", "quantity": 0},
     "promotions[0].when.group_quantity_at_least.quantity", "at least 1"),
    ("promotions.0.when.coupon", 123, "promotions[0].when.coupon", "expected a string"),
    ("promotions.0.scope", "everything", "promotions[0].scope", "expected `all`"),
    ("promotions.0.scope", {"groups": ["tea"]}, "promotions[0].scope.groups[0]", "unknown product group 'tea'"),
    ("promotions.0.scope", {"exclude_groups": ["dairy", "tea"]}, "promotions[0].scope.exclude_groups[1]",
     "unknown product group"),
    ("promotions.0.scope", {"skus": "milk-1l"}, "promotions[0].scope.skus", "list of strings"),
    ("promotions.0.effect", {}, "promotions[0].effect", "an effect expected"),
    ("promotions.0.effect", {"percent_off": 20, "fixed_price": 100},
     "promotions[0].effect", "exactly one effect expected, got percent_off and fixed_price"),
    ("promotions.0.effect", {"percent_off": 101}, "promotions[0].effect.percent_off", "between 0 and 100"),
    ("promotions.0.effect", {"percent_off": 20, "per": "unit"}, "promotions[0].effect.per", "not allowed"),
    ("promotions.0.effect", {"amount_off": 100, "per": "line"}, "promotions[0].effect.per", "unit, receipt"),
    ("promotions.0.effect", {"fixed_price": 100, "per": "receipt"}, "promotions[0].effect.per", "expected one of unit"),
    ("promotions.0.effect", {"amount_off": -5}, "promotions[0].effect.amount_off", "at least 0"),
    ("promotions.0.effect", {"fixed_price": True}, "promotions[0].effect.fixed_price", "expected a"),
    ("promotions.0.effect", {"nth_free": 1}, "promotions[0].effect.nth_free", "at least 2"),
    ("promotions.0.effect", {"nth_free": 2.5}, "promotions[0].effect.nth_free", "integer"),
    ("promotions.0.effect", {"points_multiplier": 0.5}, "promotions[0].effect.points_multiplier",
     "between 1 and 100"),
    ("promotions.0.effect", {"points_multiplier": 101}, "promotions[0].effect.points_multiplier",
     "between 1 and 100"),
    ("promotions.0.effect", {"points_multiplier": 1.255}, "promotions[0].effect.points_multiplier",
     "at most two decimals"),
    ("promotions.0.effect", {"extra_points_percent": 1000.01}, "promotions[0].effect.extra_points_percent",
     "between 0 and 1000"),
    ("promotions.0.effect", {"extra_points": 1.5}, "promotions[0].effect.extra_points", "whole number"),
    ("promotions.0.effect", "percent_off 20", "promotions[0].effect", "expected a mapping"),
    ("promotions.0.limits", {"period": "quarter"}, "promotions[0].limits.period", "day, week, month, year, all"),
    ("promotions.0.limits", {"uses_per_member": 0}, "promotions[0].limits.uses_per_member", "at least 1"),
    ("promotions.0.limits", {"points_budget": 100}, "promotions[0].limits.points_budget", "only for points"),
    ("promotions.0.limits", {"discount_budget": -1}, "promotions[0].limits.discount_budget", "at least 0"),
    ("segments", "women", "segments", "mapping or a list"),
]


@pytest.mark.parametrize("where, value, path, words", BAD_VALUES, ids=[f"{c[2]}={c[1]!r}"[:60] for c in BAD_VALUES])
def test_bad_value_names_its_path(where, value, path, words):
    d = base()
    set_in(d, where, value)
    err = error_of(d)
    assert err.path == path
    assert words in err.reason
    assert str(err) == f"{path}: {err.reason}"


@pytest.mark.parametrize("where, path", [
    ("program", "program"),
    ("promotions.0.id", "promotions[0].id"),
    ("promotions.0.effect", "promotions[0].effect"),
    ("tiers.levels.1.from", "tiers.levels[1].from"),
    ("tiers.levels.0.accrual_percent", "tiers.levels[0].accrual_percent"),
    ("tiers.levels", "tiers.levels"),
    ("redeem.reduced.0.external_discount_over_percent", "redeem.reduced[0].external_discount_over_percent"),
])
def test_missing_required_key(where, path):
    d = base()
    delete_in(d, where)
    err = error_of(d)
    assert (err.path, err.reason) == (path, "required")


def test_exact_message_for_two_effects():
    d = base()
    d["promotions"][0]["effect"] = {"percent_off": 10, "fixed_price": 5000}
    assert str(error_of(d)) == "promotions[0].effect: exactly one effect expected, got percent_off and fixed_price"


def test_three_effects_are_all_named():
    d = base()
    d["promotions"][0]["effect"] = {"nth_free": 3, "amount_off": 1, "extra_points": 5}
    assert error_of(d).reason == "exactly one effect expected, got amount_off, nth_free and extra_points"


def test_unknown_key_in_a_later_promotion_names_its_index():
    d = with_promos(promo(id="a"), promo(id="b"), {"id": "c", "efect": {"percent_off": 1}})
    err = error_of(d)
    assert (err.path, err.reason) == ("promotions[3].efect", "unknown key")


def test_duplicate_promotion_id():
    d = with_promos(promo(id="x"), promo(id="women-q1-20"))
    err = error_of(d)
    assert err.path == "promotions[2].id"
    assert "duplicate id 'women-q1-20'" in err.reason and "promotions[0]" in err.reason


def test_points_budget_on_a_discount_and_discount_budget_on_points():
    d = with_promos(promo(effect={"extra_points": 5}, limits={"discount_budget": 100}))
    assert error_of(d).path == "promotions[1].limits.discount_budget"


def test_accrual_percent_with_tiers_is_ambiguous():
    d = base()
    d["accrual"]["percent"] = 3
    err = error_of(d)
    assert err.path == "accrual.percent" and "tiers" in err.reason


def test_three_decimal_percentage_in_yaml_is_an_error():
    with pytest.raises(ProgramError) as info:
        load_program_text(SPEC_PROGRAM.replace("max_discount_percent: 99", "max_discount_percent: 99.125"))
    assert info.value.path == "max_discount_percent" and "at most two decimals" in info.value.reason


def test_decimal_that_float_would_round_is_rejected():
    # 12.5000000000000001 is 12.5 as a float; the exact loader still sees the 16th decimal
    with pytest.raises(ProgramError) as info:
        load_program_text(SPEC_PROGRAM.replace("max_percent: 20", "max_percent: 12.5000000000000001"))
    assert info.value.path == "redeem.max_percent"


# ---- file-level problems: ProgramError, never a traceback -------------------------------------------------

def test_empty_file():
    for text in ("", "   \n# only a comment\n"):
        with pytest.raises(ProgramError) as info:
            load_program_text(text, source_name="p.yaml")
        assert info.value.path == "p.yaml" and "empty" in info.value.reason


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("just text\n", "string"), ("42\n", "integer")])
def test_non_mapping_file(text, kind):
    with pytest.raises(ProgramError) as info:
        load_program_text(text)
    assert info.value.path == "<program>" and "expected a mapping" in info.value.reason
    assert kind in info.value.reason


def test_yaml_syntax_error_gives_the_line():
    text = "program: demo\npromotions:\n  - id: a\n    effect: {percent_off: 10\n"
    with pytest.raises(ProgramError) as info:
        load_program_text(text, source_name="bad.yaml")
    assert info.value.path == "bad.yaml"
    assert "YAML syntax error at line" in info.value.reason


def test_yaml_syntax_error_line_number_is_the_bad_line():
    text = "program: demo\ncurrency: RUB\npoint_value: 100\n  stacking: priority\n"
    with pytest.raises(ProgramError) as info:
        load_program_text(text)
    assert "line 4" in info.value.reason


def test_duplicate_yaml_key_is_an_error_not_last_wins():
    text = "program: demo\npoint_value: 100\npoint_value: 1\n"
    with pytest.raises(ProgramError) as info:
        load_program_text(text)
    assert "duplicate key 'point_value'" in info.value.reason and "line 3" in info.value.reason


def test_missing_file(tmp_path):
    with pytest.raises(ProgramError) as info:
        load_program(tmp_path / "nope.yaml")
    assert info.value.path.endswith("nope.yaml") and info.value.reason == "file not found"


def test_not_utf8_file(tmp_path):
    f = tmp_path / "latin.yaml"
    f.write_bytes(b"program: caf\xe9\n")
    with pytest.raises(ProgramError) as info:
        load_program(f)
    assert "UTF-8" in info.value.reason


def test_program_from_dict_rejects_a_non_mapping():
    with pytest.raises(ProgramError):
        program_from_dict(["program"])


def test_source_is_plain_yaml_values_not_decimals():
    p = load_program_text(SPEC_PROGRAM.replace("max_percent: 20", "max_percent: 12.5"))
    value = p.source["redeem"]["max_percent"]
    assert type(value) is float and not isinstance(value, Decimal)
