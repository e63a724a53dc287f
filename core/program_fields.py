"""The program file's keys as data: every section's keys, each with its kind, bounds, default and meaning.

``program.py`` validates by this table (the keys a section allows, each scalar's bounds and default) and
``loyalty.server.schemas`` turns the same table into the program file's JSON Schema and its reference page,
so what editors check and what the docs say is what the validator does. Rules between keys (tiers exclude
``accrual.percent``, a budget must suit its effect, ``valid.to`` after ``valid.from``...) stay in the
validator's code; the schema's descriptions mention them.

Kinds: ``int`` (whole number within lo..hi), ``money`` (minor units, 0..MAX_MONEY), ``percent`` (at most two
decimals, 0..hi), ``hundredths`` (a number with at most two decimals, lo/100..hi/100), ``bool``, ``str``,
``choice``, ``str_list``, and the structured ones a section or the validator's code reads itself:
``section`` (a mapping of the keys in ``keys``), ``list`` (a list of ``item`` sections), ``map`` (names to
``item`` sections), ``date`` (a date or a datetime), ``hours``, ``scope`` (``all`` or a section), ``effect``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Field", "MAX_MONEY", "MAX_POINTS", "MAX_QUANTITY", "PERIODS", "STACKINGS", "TIER_METRICS",
           "EFFECT_VALUES", "EFFECT_PER", "PROGRAM", "section"]

MAX_MONEY = 10**12
MAX_POINTS = 10**12
MAX_QUANTITY = 10**9
MAX_DAYS = 36500
PERIODS = ("day", "week", "month", "year", "all")
STACKINGS = ("priority", "best_for_customer")
TIER_METRICS = ("purchases_sum",)
_NOT_INTERPRETED = "read by the module that owns it, not by the program's validator"


@dataclasses.dataclass(frozen=True)
class Field:
    kind: str
    doc: str
    lo: int | None = None
    hi: int | None = None
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    allow_empty: bool = False                # str: "" allowed; str_list: [] allowed
    what: str = ""                           # the validator's word for the expected value, when not the kind's
    keys: dict[str, Field] | None = None     # section / scope / effect / list / map items
    pattern: str = ""


def section(doc: str, **keys: Field) -> Field:
    return Field("section", doc, keys=keys)


def _percent(doc: str, default=None, hi: int = 100, required: bool = False) -> Field:
    return Field("percent", doc, lo=0, hi=hi, default=default, required=required)


def _days(doc: str, lo: int, default=None) -> Field:
    return Field("int", doc, lo=lo, hi=MAX_DAYS, default=default)


def _money(doc: str, default=None, required: bool = False) -> Field:
    return Field("money", doc, lo=0, hi=MAX_MONEY, default=default, required=required)


def _limit(doc: str) -> Field:
    return section(doc, soft=Field("int", "Past this the confirm is recorded for review (below hard).", lo=0,
                                   hi=MAX_POINTS),
                   hard=Field("int", "Past this the confirm is refused: FAILED_PRECONDITION naming the limit.",
                              lo=0, hi=MAX_POINTS))


# effect kind -> the value it takes
EFFECT_VALUES = {
    "percent_off": _percent("Percent off the lines in scope."),
    "amount_off": _money("An amount off, in minor units (per unit or per receipt: see per)."),
    "fixed_price": _money("The unit price of the lines in scope, in minor units."),
    "nth_free": Field("int", "Every n-th unit of a line in scope is free.", lo=2, hi=1000),
    "points_multiplier": Field("hundredths", "Multiplies the accrual of the lines in scope (2 or 1.5).",
                               lo=100, hi=10000, what="a multiplier such as 2 or 1.5"),
    "extra_points": Field("int", "Extra points (per receipt or per unit: see per).", lo=0, hi=MAX_POINTS,
                          what="a whole number of points"),
    "extra_points_percent": _percent("Extra points as a percent of the lines' payable amount.", hi=1000),
}
EFFECT_PER = {  # which `per` values an effect accepts, the first being its default
    "amount_off": ("unit", "receipt"),
    "extra_points": ("receipt", "unit"),
    "fixed_price": ("unit",),
}

VALIDITY = section(
    "When and where the promotion applies (all given must hold).",
    **{"from": Field("date", "First day (2026-01-31) or moment (2026-01-31 18:00:00), the receipt's local time."),
       "to": Field("date", "Last day or moment, inclusive; after from."),
       "weekdays": Field("int_list", "Days of the week, Monday = 1.", lo=1, hi=7,
                         what="a day 1..7 (Monday = 1)"),
       "hours": Field("hours", "A window \"HH:MM-HH:MM\" or a list of them (24:00 may end one)."),
       "stores": Field("str_list", "Store codes."),
       "channels": Field("str_list", "Sales channels.")})

CONDITIONS = section(
    "What the receipt must have (all given must hold).",
    receipt_total_at_least=_money("The receipt's total before discounts, at least (minor units)."),
    group_quantity_at_least=section(
        "At least this quantity of one product group.",
        group=Field("str", "A product group's name.", required=True),
        quantity=Field("int", "Quantity in thousandths (2000 = 2 pcs).", lo=1, hi=MAX_QUANTITY * 1000,
                       required=True, what="a quantity in thousandths (2000 = 2 pcs)")),
    coupon=Field("str", "A coupon code the receipt must carry."))

SCOPE = Field("scope", "The lines the effect applies to: `all` or a mapping of lists.", default="all", keys={
    name: Field("str_list", doc, allow_empty=True) for name, doc in (
        ("groups", "Product groups in scope."), ("skus", "SKUs in scope."), ("categories", "Categories in scope."),
        ("exclude_groups", "Product groups left out."), ("exclude_skus", "SKUs left out."),
        ("exclude_categories", "Categories left out."))})

LIMITS = section(
    "How often and how much.",
    uses_per_member=Field("int", "Receipts per member within the period.", lo=1, hi=10**9),
    period=Field("choice", "The period of uses_per_member.", choices=PERIODS, default="all"),
    discount_budget=_money("The promotion's total discount (discount effects only)."),
    points_budget=Field("int", "The promotion's total points (points effects only).", lo=0, hi=MAX_POINTS))

EFFECT = Field("effect", "Exactly one effect, and `per` where the effect takes one.", required=True, keys={
    **EFFECT_VALUES,
    "per": Field("choice", "unit or receipt (amount_off: unit; extra_points: receipt; fixed_price: unit).",
                 choices=("unit", "receipt")),
})

PROMOTION = section(
    "One promotion.",
    id=Field("str", "Unique, no leading or trailing spaces.", required=True),
    title=Field("str", "Shown on receipts.", default="", allow_empty=True),
    priority=Field("int", "Higher first (stacking: priority).", lo=-10**6, hi=10**6, default=0),
    exclusive=Field("bool", "No other promotion on the lines it takes.", default=False),
    audience=section("Segments and audiences whose members get it.",
                     include=Field("str_list", "Ids of segments or audiences (any of them).", allow_empty=True),
                     exclude=Field("str_list", "Ids of segments or audiences left out.", allow_empty=True)),
    tiers=Field("str_list", "Only members of these tiers."),
    valid=VALIDITY,
    when=CONDITIONS,
    scope=SCOPE,
    effect=EFFECT,
    limits=LIMITS,
)

TIER_LEVEL = section(
    "One level; the first starts from 0, the others strictly ascending.",
    name=Field("str", "Unique.", required=True),
    **{"from": _money("The tier metric from which the level holds (minor units).", required=True)},
    accrual_percent=_percent("Points accrued, percent of the payable amount.", required=True),
    redeem_max_percent=_percent("The most of a receipt points may pay at this level."),
)

PROGRAM = section(
    "A loyalty program (SPEC section 3).",
    program=Field("str", "The program's name.", required=True),
    currency=Field("str", "Three capital letters.", default="RUB", pattern="^[A-Z]{3}$"),
    point_value=Field("int", "What one point is worth in minor units.", lo=1, hi=MAX_MONEY, default=100),
    stacking=Field("choice", "How promotions combine.", choices=STACKINGS, default="priority"),
    accrual=section(
        "Earning points.",
        activation_days=_days("Days before accrued points can be spent.", 0, default=0),
        expiry_days=_days("Days after which points expire (none: never).", 1),
        on_redeemed_part=Field("bool", "Accrue on the part paid with points too.", default=False),
        percent=_percent("Base accrual percent (not with tiers: set it per level).", default=0)),
    redeem=section(
        "Paying with points.",
        max_percent=_percent("The most of a receipt points may pay.", default=100),
        reduced=Field("list", "A lower maximum when an external discount is large.", keys={
            "external_discount_over_percent": _percent("Above this external discount...", required=True),
            "max_percent": _percent("...points may pay at most this.", required=True)}),
        min_payable_per_line=_money("Every line keeps at least this to pay (minor units).", default=0)),
    max_discount_percent=_percent("The most all discounts together may take off a line.", default=100),
    hints=section("Hints to the cashier.",
                  within_percent=_percent("Hint at a promotion within this percent of its threshold.",
                                          default=20)),
    tiers=section(
        "Tiers by a metric over a window.",
        metric=Field("choice", "The tier metric.", choices=TIER_METRICS, default="purchases_sum"),
        window_days=_days("The metric's window in days (none: all time).", 1),
        levels=Field("list", "The levels, ascending.", required=True, keys=TIER_LEVEL.keys)),
    product_groups=Field("map", "Named groups of products.", default={}, keys={
        "skus": Field("str_list", "SKUs in the group.", allow_empty=True),
        "categories": Field("str_list", "Categories in the group.", allow_empty=True)}),
    promotions=Field("list", "The promotions.", default=[], keys=PROMOTION.keys),
    operation_limits=section(
        "Limits against fraud (SPEC 10): a soft limit records the confirm for review, a hard one refuses it.",
        card_daily_writeoff_points=_limit("Points one card writes off per receipt day."),
        card_daily_confirms=_limit("Confirms of one card per receipt day."),
        terminal_confirms_per_minute=_limit("Confirms of one terminal per minute.")),
    segments=Field("passthrough", f"Segments (see the segment schema); {_NOT_INTERPRETED}."),
    audiences=Field("passthrough", f"Audiences: include / exclude segments; {_NOT_INTERPRETED}."),
    scenarios=Field("passthrough", f"Scenarios (see the scenario schema); {_NOT_INTERPRETED}."),
)
