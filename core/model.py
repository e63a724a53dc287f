"""The validated program, as plain frozen data: what ``loyalty.core.program.load_program`` returns and what
both the compiled core and the reference implementation read.

Units are already normalised here (see docs/ENGINE.md): money in minor units, percentages in basis points
(``12.5%`` is ``1250``), multipliers in hundredths (``x1.5`` is ``150``), quantities in thousandths,
datetimes naive in the receipt's local wall-clock time. Nothing here does arithmetic.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

__all__ = [
    "DISCOUNT_EFFECTS", "POINTS_EFFECTS", "EFFECTS", "CARD_STATUSES",
    "Tier", "Tiers", "ProductGroup", "Scope", "Effect", "Validity", "Conditions", "Limits",
    "Promotion", "OperationLimit", "OperationLimits", "Program", "Line", "Receipt", "Member",
]

DISCOUNT_EFFECTS = ("percent_off", "amount_off", "fixed_price", "nth_free")
POINTS_EFFECTS = ("points_multiplier", "extra_points_percent", "extra_points")
EFFECTS = DISCOUNT_EFFECTS + POINTS_EFFECTS
CARD_STATUSES = ("active", "restricted", "suspended", "blocked")


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    threshold: int                      # `from`: tier metric (minor units) from which the tier holds
    accrual_bp: int                     # accrual_percent in basis points
    redeem_max_bp: int | None = None    # redeem_max_percent in basis points, overrides redeem.max_percent


@dataclass(frozen=True, slots=True)
class Tiers:
    metric: str = "purchases_sum"
    window_days: int | None = None      # None: lifetime
    levels: tuple[Tier, ...] = ()       # ascending by threshold; levels[0].threshold == 0


@dataclass(frozen=True, slots=True)
class ProductGroup:
    name: str
    skus: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Scope:
    """Which lines a promotion touches. Empty include lists mean every line (``scope: all``)."""
    groups: tuple[str, ...] = ()
    skus: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    exclude_groups: tuple[str, ...] = ()
    exclude_skus: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()

    @property
    def is_all(self) -> bool:
        return not (self.groups or self.skus or self.categories)


@dataclass(frozen=True, slots=True)
class Effect:
    """Exactly one effect. ``value`` units by kind:
    percent_off, extra_points_percent: basis points; amount_off, fixed_price: minor units;
    nth_free: N; points_multiplier: hundredths; extra_points: points.
    ``per`` is "unit" or "receipt" for amount_off (default unit) and extra_points (default receipt),
    "unit" for fixed_price, "" for the rest."""
    kind: str
    value: int
    per: str = ""

    @property
    def is_discount(self) -> bool:
        return self.kind in DISCOUNT_EFFECTS


@dataclass(frozen=True, slots=True)
class Validity:
    starts: dt.datetime | None = None   # inclusive, local wall-clock
    ends: dt.datetime | None = None     # EXCLUSIVE, local wall-clock (a date `to` becomes next midnight,
                                        # a datetime `to` becomes to + 1 second)
    weekdays: frozenset[int] = frozenset()        # Monday = 1; empty: every day
    hours: tuple[tuple[int, int], ...] = ()       # (start_s, end_s) seconds of day, start included, end
                                                  # excluded; end <= start wraps past midnight; empty: all day
    stores: frozenset[str] = frozenset()          # empty: every store
    channels: frozenset[str] = frozenset()        # empty: every channel


@dataclass(frozen=True, slots=True)
class Conditions:
    receipt_total_at_least: int | None = None               # minor units, on sum(base_i)
    group_quantity_at_least: tuple[str, int] | None = None  # (group, thousandths)
    coupon: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    uses_per_member: int | None = None  # eligible while member.usage[id] < this; never for anonymous
    period: str = "all"                 # day | week | month | year | all: the server counts usage per period
    discount_budget: int | None = None  # minor units; eligible while budgets_used[id] < this
    points_budget: int | None = None    # points; eligible while budgets_used[id] < this


@dataclass(frozen=True, slots=True)
class Promotion:
    id: str
    effect: Effect
    title: str = ""
    priority: int = 0
    exclusive: bool = False
    audience_include: tuple[str, ...] = ()   # member must be in ALL of these (SPEC 7)
    audience_exclude: tuple[str, ...] = ()   # and in NONE of these
    tiers: frozenset[str] = frozenset()      # empty: any tier (anonymous: only when empty)
    valid: Validity = field(default_factory=Validity)
    when: Conditions = field(default_factory=Conditions)
    scope: Scope = field(default_factory=Scope)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class OperationLimit:
    """One limit against fraud (Loymax's soft and hard limits): beyond ``hard`` a confirm is refused, beyond
    ``soft`` it goes through and is recorded for review; None: no such limit."""
    soft: int | None = None
    hard: int | None = None

    @property
    def is_set(self) -> bool:
        return self.soft is not None or self.hard is not None


@dataclass(frozen=True, slots=True)
class OperationLimits:
    """``operation_limits`` of the program file: what the server counts per card per receipt day (points written
    off, confirms) and per terminal per minute (confirms). The core does not read them; the server's confirm
    paths do (``loyalty.server.security.limits``)."""
    card_daily_writeoff_points: OperationLimit = field(default_factory=OperationLimit)
    card_daily_confirms: OperationLimit = field(default_factory=OperationLimit)
    terminal_confirms_per_minute: OperationLimit = field(default_factory=OperationLimit)

    @property
    def any(self) -> bool:
        return (self.card_daily_writeoff_points.is_set or self.card_daily_confirms.is_set
                or self.terminal_confirms_per_minute.is_set)


@dataclass(frozen=True, slots=True)
class Program:
    name: str
    currency: str = "RUB"
    point_value: int = 100
    stacking: str = "priority"               # or best_for_customer
    activation_days: int = 0
    expiry_days: int | None = None
    on_redeemed_part: bool = False
    redeem_max_bp: int = 10000
    reduced: tuple[tuple[int, int], ...] = ()    # (external_discount_over_bp, max_bp)
    min_payable_per_line: int = 0
    max_discount_bp: int = 10000
    hint_within_bp: int = 2000               # hints.within_percent: how near a missed threshold must be
    tiers: Tiers = field(default_factory=Tiers)
    product_groups: tuple[ProductGroup, ...] = ()
    promotions: tuple[Promotion, ...] = ()   # file order; the engine orders by (-priority, id)
    operation_limits: OperationLimits = field(default_factory=OperationLimits)
    source: dict | None = field(default=None, compare=False, repr=False)  # the parsed YAML, for storage


# ---- inputs: what loyalty.core.inputs.parse_request returns --------------------------------------------

@dataclass(frozen=True, slots=True)
class Line:
    sku: str
    quantity: int                 # thousandths
    price: int
    amount: int                   # default round-half-up(quantity x price / 1000)
    categories: tuple[str, ...] = ()
    external_discount: int = 0
    min_price: int = 0
    no_discount: bool = False
    no_accrual: bool = False
    no_redeem: bool = False


@dataclass(frozen=True, slots=True)
class Receipt:
    at: dt.datetime               # naive local wall-clock (the offset, if any, is dropped)
    lines: tuple[Line, ...]
    store: str = ""
    terminal: str = ""
    number: str = ""
    channel: str = "pos"
    coupons: tuple[str, ...] = ()
    redeem_points: int = 0


@dataclass(frozen=True, slots=True)
class Member:
    card: str | None = None
    status: str = "active"
    tier: str | None = None       # None: the lowest tier
    active_points: int = 0
    pending_points: int = 0
    audiences: frozenset[str] = frozenset()
    usage: dict | None = None     # promotion id -> uses in the promotion's current period
    purchases_sum: int | None = None   # tier metric so far, for progress to the next tier
