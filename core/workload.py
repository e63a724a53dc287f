"""Seeded generator of programs and receipts for the differential tests, the property tests and the
benchmarks: one ``random.Random`` in, plain dicts out (a program shaped like the YAML file of SPEC section 3,
and the ``receipt`` / ``member`` objects of the calc file), so that the same seed always gives the same data
on every machine and every Python.

It knows nothing about how a receipt is calculated: it only aims its draws at the places where the rules
have edges (validity bounds, hour windows, caps, floors, limits, coupons, statuses) so that a few thousand
receipts reach every branch of the engine. Promotions are spread over a catalogue of skus and categories as
a retailer's are (most target a few skus or a category, few the whole receipt), so a 20-line receipt
meets only some of a 1,000-promotion program.
"""
from __future__ import annotations

import datetime as dt
import functools
import random
from dataclasses import dataclass

__all__ = [
    "EFFECT_KINDS", "RECEIPT_LEVEL_KINDS", "POINTS_KINDS", "CONDITION_FEATURES", "ALL",
    "Product", "catalogue", "random_program", "random_request", "effect_kind",
]

# Effect variants the generator can emit (an effect kind plus its `per` where it has one).
EFFECT_KINDS = (
    "percent_off", "amount_off_unit", "amount_off_receipt", "fixed_price", "nth_free",
    "points_multiplier", "extra_points_percent", "extra_points_receipt", "extra_points_unit",
)
# Effects computed across all their lines at once (SPEC 4 step 3, "receipt-level effects").
RECEIPT_LEVEL_KINDS = ("amount_off_receipt", "nth_free")
POINTS_KINDS = ("points_multiplier", "extra_points_percent", "extra_points_receipt", "extra_points_unit")
# Everything else a program may use; ``features`` switches each one on or off.
CONDITION_FEATURES = (
    "exclusive", "audience", "tiers", "coupon", "validity", "hours", "weekdays", "stores", "channels",
    "receipt_total", "group_quantity", "limits", "excludes", "reduced", "max_discount", "min_payable",
    "hints",
)
ALL = frozenset(EFFECT_KINDS + CONDITION_FEATURES)

AUDIENCES = ("women-q1", "students", "vip", "newcomers", "pensioners", "staff", "coffee-lovers")
COUPONS = ("SPRING10", "WELCOME", "COFFEE2", "BDAY2026", "FREESHIP", "VIP-777")
STORES = ("msk-01", "msk-02", "spb-01", "ekb-01")
CHANNELS = ("pos", "online")
TIER_NAMES = ("Basic", "Silver", "Gold", "Platinum")
ID_PREFIXES = ("bday", "coffee", "dairy", "night", "spring", "vip", "weekend", "x")
YEAR_START = dt.datetime(2026, 1, 1)


@dataclass(frozen=True, slots=True)
class Product:
    sku: str
    categories: tuple[str, ...]     # a fine category ("cat-017") and its department ("dept-01")
    price: int                      # minor units; per kg for weight goods
    weight: bool                    # sold by weight: quantities are not multiples of 1000


@functools.lru_cache(maxsize=8)
def catalogue(n_skus: int = 3000, n_categories: int = 120, *, seed: int = 20260101) -> tuple[Product, ...]:
    """A retailer's assortment: ``n_skus`` products over ``n_categories`` fine categories grouped ten to a
    department; prices spread log-uniformly from 5.00 to 5000.00, one product in seven sold by weight."""
    rng = random.Random(seed)
    products = []
    for i in range(n_skus):
        cat = rng.randrange(n_categories)
        weight = rng.random() < 0.15
        price = int(10 ** rng.uniform(2.7, 5.7))
        products.append(Product(f"sku-{i:05d}", (f"cat-{cat:03d}", f"dept-{cat // 10:02d}"), price, weight))
    return tuple(products)


def effect_kind(promotion: dict) -> str:
    """The generator's effect variant of a promotion dict (``amount_off`` split by ``per``)."""
    effect = promotion["effect"]
    for kind in ("percent_off", "fixed_price", "nth_free", "points_multiplier", "extra_points_percent"):
        if kind in effect:
            return kind
    if "amount_off" in effect:
        return "amount_off_" + effect.get("per", "unit")
    return "extra_points_" + effect.get("per", "receipt")


# ---- programs -------------------------------------------------------------------------------------------

def _pct(rng: random.Random, choices) -> int | float:
    return rng.choice(choices)


def _dedup(items):
    return list(dict.fromkeys(items))


def random_program(rng: random.Random, n_promotions: int, *, stacking: str | None = None,
                   features=ALL, products: tuple[Product, ...] | None = None) -> dict:
    """A program dict (the YAML shape of SPEC section 3) with ``n_promotions`` promotions using only the
    effects and conditions named in ``features``; ``stacking`` None picks one at random."""
    features = frozenset(features)
    effects = [k for k in EFFECT_KINDS if k in features]
    if not effects:
        raise ValueError("features must name at least one effect kind")
    products = products or catalogue()
    categories = sorted({p.categories[0] for p in products})
    departments = sorted({p.categories[1] for p in products})

    def has(feature: str, p: float) -> bool:
        return feature in features and rng.random() < p

    program: dict = {
        "program": f"workload-{rng.randrange(10**6):06d}",
        "currency": "RUB",
        "point_value": rng.choice((100, 100, 100, 1, 10, 50)),
        "stacking": stacking or rng.choice(("priority", "best_for_customer")),
        "accrual": {"activation_days": rng.choice((0, 14)), "expiry_days": rng.choice((365, 730)),
                    "on_redeemed_part": rng.random() < 0.3},
    }
    redeem: dict = {"max_percent": _pct(rng, (20, 20, 30, 50, 100, 12.5, 0))}
    if has("reduced", 0.6):
        redeem["reduced"] = [
            {"external_discount_over_percent": _pct(rng, (10, 25, 25.5, 40)), "max_percent": _pct(rng, (10, 5, 0, 7.5))}
            for _ in range(rng.randint(1, 2))]
    if has("min_payable", 0.6):
        redeem["min_payable_per_line"] = rng.choice((1, 100, 100, 1000))
    program["redeem"] = redeem
    if has("max_discount", 0.7):
        program["max_discount_percent"] = _pct(rng, (99, 90, 80, 50, 99.5, 100))
    if has("hints", 0.5):
        program["hints"] = {"within_percent": _pct(rng, (10, 20, 50, 100))}

    n_tiers = rng.randint(1, 4)
    levels, threshold = [], 0
    for t in range(n_tiers):
        level = {"name": TIER_NAMES[t], "from": threshold, "accrual_percent": _pct(rng, (0, 1, 2.5, 3, 5, 7, 10))}
        if t > 0 and rng.random() < 0.4:
            level["redeem_max_percent"] = _pct(rng, (30, 40, 100, 15))
        levels.append(level)
        threshold += rng.choice((1_000_000, 2_000_000, 5_000_000))
    program["tiers"] = {"metric": "purchases_sum", "levels": levels}
    if rng.random() < 0.5:
        program["tiers"]["window_days"] = 365
    tier_names = [lv["name"] for lv in levels]

    n_groups = max(2, min(200, n_promotions // 5 + 2))
    groups = {}
    for g in range(n_groups):
        body: dict = {}
        if rng.random() < 0.8:
            body["skus"] = sorted({rng.choice(products).sku for _ in range(rng.randint(2, 12))})
        if not body or rng.random() < 0.15:
            body["categories"] = sorted(set(rng.sample(categories, 1))
                                        | ({rng.choice(departments)} if rng.random() < 0.05 else set()))
        groups[f"group-{g:02d}"] = body
    program["product_groups"] = groups
    group_names = list(groups)
    piece_groups = [g for g in group_names if "skus" in groups[g]]

    coupons = rng.sample(COUPONS, rng.randint(1, len(COUPONS)))
    p_all = min(0.2, 5 / max(n_promotions, 1))
    promotions = []
    for i in range(n_promotions):
        kind = rng.choice(effects)
        promo: dict = {"id": f"{rng.choice(ID_PREFIXES)}-{i:04d}", "title": f"promotion {i}",
                       "priority": rng.choice((0, 5, 10, 10, 20, 30, 50))}
        is_discount = kind not in POINTS_KINDS
        if has("exclusive", 0.25):
            promo["exclusive"] = True
        elif rng.random() < 0.2:
            promo["exclusive"] = False

        if has("audience", 0.2):
            audience: dict = {"include": rng.sample(AUDIENCES, rng.randint(1, 2))}
            if rng.random() < 0.3:
                audience["exclude"] = [rng.choice([a for a in AUDIENCES if a not in audience["include"]])]
            promo["audience"] = audience
        elif has("audience", 0.05):
            promo["audience"] = {"exclude": [rng.choice(AUDIENCES)]}
        if has("tiers", 0.1):
            promo["tiers"] = rng.sample(tier_names, rng.randint(1, len(tier_names)))

        valid: dict = {}
        if has("validity", 0.4):
            start = YEAR_START + dt.timedelta(days=rng.randrange(340))
            end = start + dt.timedelta(days=rng.randrange(45))
            as_datetime = rng.random() < 0.4
            if as_datetime:
                start += dt.timedelta(seconds=rng.choice((0, 9 * 3600, 9 * 3600 + 1800, 12 * 3600 + 15 * 60 + 30)))
                end += dt.timedelta(seconds=rng.choice((0, 18 * 3600, 23 * 3600 + 59 * 60 + 59, 3600 * 21)))
                if end <= start:
                    end = start + dt.timedelta(hours=1)
            bound = (lambda x: x) if as_datetime else (lambda x: x.date())
            form = rng.random()
            if form < 0.1:
                valid["from"] = bound(start)
            elif form < 0.2:
                valid["to"] = bound(end)
            else:
                valid["from"], valid["to"] = bound(start), bound(end)
            if rng.random() < 0.2:  # the YAML loader may hand the parser a string instead of a date
                valid = {k: v.isoformat(sep=" ") if isinstance(v, dt.datetime) else v.isoformat()
                         for k, v in valid.items()}
        if has("weekdays", 0.15):
            valid["weekdays"] = sorted(rng.sample(range(1, 8), rng.randint(1, 6)))
        if has("hours", 0.15):
            def window() -> str:
                h1 = rng.randrange(24)
                h2 = rng.choice(((h1 + rng.randint(1, 12)) % 24, 24 if h1 else 23))
                m1, m2 = rng.choice((0, 0, 30)), rng.choice((0, 0, 45))
                if h2 == 24:
                    m2 = 0
                if (h1, m1) == (h2, m2):
                    h2 = (h2 + 1) % 24
                return f"{h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}"
            valid["hours"] = window() if rng.random() < 0.8 else [window(), window()]
        if has("stores", 0.1):
            valid["stores"] = rng.sample(STORES, rng.randint(1, 3))
        if has("channels", 0.1):
            valid["channels"] = [rng.choice(CHANNELS)]
        if valid:
            promo["valid"] = valid

        when: dict = {}
        if has("receipt_total", 0.2):
            when["receipt_total_at_least"] = rng.choice((50_000, 100_000, 150_000, 300_000, 1_000_000))
        if has("group_quantity", 0.1):
            when["group_quantity_at_least"] = {"group": rng.choice(piece_groups or group_names),
                                               "quantity": rng.choice((2000, 3000, 5000, 1500))}
        if has("coupon", 0.1):
            when["coupon"] = rng.choice(coupons)
        if when:
            promo["when"] = when

        # Scope: a few promotions cover the whole receipt, most a group, some skus or categories.
        if kind == "nth_free" and rng.random() < 0.7:
            scope: dict | str = {"groups": [rng.choice(piece_groups or group_names)]}
        else:
            r = rng.random()
            if r < p_all:
                scope = "all"
            elif r < p_all + (1 - p_all) * 0.40:
                scope = {"skus": sorted({rng.choice(products).sku for _ in range(rng.randint(1, 6))})}
            elif r < p_all + (1 - p_all) * 0.62:
                scope = {"categories": rng.sample(categories, rng.randint(1, 2))}
            elif r < p_all + (1 - p_all) * 0.64:
                scope = {"categories": [rng.choice(departments)]}
            else:
                scope = {"groups": rng.sample(group_names, rng.randint(1, 2))}
        if has("excludes", 0.15):
            scope = {} if scope == "all" else dict(scope)
            ex = rng.choice(("exclude_skus", "exclude_groups", "exclude_categories"))
            if ex == "exclude_skus":
                scope[ex] = [rng.choice(products).sku for _ in range(rng.randint(1, 3))]
            elif ex == "exclude_groups":
                scope[ex] = [rng.choice(group_names)]
            else:
                scope[ex] = [rng.choice(categories)]
            scope[ex] = _dedup(scope[ex])
        if scope != "all" or rng.random() < 0.5:
            promo["scope"] = scope

        if kind == "percent_off":
            effect: dict = {"percent_off": _pct(rng, (5, 10, 10, 15, 20, 25, 30, 50, 12.5, 33.33, 100))}
        elif kind == "amount_off_unit":
            effect = {"amount_off": rng.choice((100, 500, 1000, 2500, 5000, 9999))}
            if rng.random() < 0.5:
                effect["per"] = "unit"
        elif kind == "amount_off_receipt":
            effect = {"amount_off": rng.choice((1000, 5000, 10000, 30000, 100000, 7)), "per": "receipt"}
        elif kind == "fixed_price":
            effect = {"fixed_price": rng.choice((990, 4990, 9900, 19900, 49900, 1))}
            if rng.random() < 0.2:
                effect["per"] = "unit"
        elif kind == "nth_free":
            effect = {"nth_free": rng.choice((2, 3, 3, 4, 5))}
        elif kind == "points_multiplier":
            effect = {"points_multiplier": _pct(rng, (2, 3, 1.5, 1.25, 5))}
        elif kind == "extra_points_percent":
            effect = {"extra_points_percent": _pct(rng, (1, 2, 5, 10, 2.5, 150))}
        elif kind == "extra_points_receipt":
            effect = {"extra_points": rng.choice((10, 50, 100, 500, 7))}
            if rng.random() < 0.5:
                effect["per"] = "receipt"
        else:
            effect = {"extra_points": rng.choice((1, 5, 20)), "per": "unit"}
        promo["effect"] = effect

        if has("limits", 0.15):
            limits: dict = {}
            if rng.random() < 0.6:
                limits["uses_per_member"] = rng.choice((1, 1, 2, 5))
                limits["period"] = rng.choice(("day", "week", "month", "year", "all"))
            else:
                key = "discount_budget" if is_discount else "points_budget"
                budgets = (1000, 100_000, 10_000_000) if is_discount else (10, 1000, 100_000)
                limits[key] = rng.choice(budgets)
            promo["limits"] = limits
        promotions.append(promo)
    program["promotions"] = promotions
    return program


# ---- requests -------------------------------------------------------------------------------------------

def _targets(program: dict, products: tuple[Product, ...]):
    """The skus and categories the program names (scopes and groups), for aiming receipt lines at them."""
    skus, cats = set(), set()
    for body in program.get("product_groups", {}).values():
        skus.update(body.get("skus", ()))
        cats.update(body.get("categories", ()))
    for promo in program.get("promotions", ()):
        scope = promo.get("scope")
        if isinstance(scope, dict):
            skus.update(scope.get("skus", ()))
            cats.update(scope.get("categories", ()))
    return sorted(skus), sorted(cats)


@functools.lru_cache(maxsize=8)
def _index(products: tuple[Product, ...]):
    by_sku = {p.sku: p for p in products}
    by_cat: dict[str, list[Product]] = {}
    for p in products:
        for c in p.categories:
            by_cat.setdefault(c, []).append(p)
    return by_sku, by_cat


def _round_half_up(x: int, d: int) -> int:
    return (2 * x + d) // (2 * d)


def _edge_times(rng: random.Random, promo: dict) -> list[dt.datetime]:
    """Moments at and just around the edges of a promotion's validity (bounds, hour windows)."""
    valid = promo.get("valid", {})
    out = []
    for key in ("from", "to"):
        v = valid.get(key)
        if v is None:
            continue
        if isinstance(v, str):
            v = dt.date.fromisoformat(v) if len(v) == 10 else dt.datetime.fromisoformat(v)
        if isinstance(v, dt.datetime):
            edge = v if key == "from" else v + dt.timedelta(seconds=1)
        else:
            edge = dt.datetime(v.year, v.month, v.day) + (dt.timedelta(days=1) if key == "to" else dt.timedelta())
        out += [edge, edge - dt.timedelta(seconds=1)]
    hours = valid.get("hours")
    if hours:
        windows = [hours] if isinstance(hours, str) else hours
        day = YEAR_START + dt.timedelta(days=rng.randrange(365))
        if out:
            day = rng.choice(out).replace(hour=0, minute=0, second=0)
        for w in windows:
            for part in w.split("-"):
                h, m = int(part[:2]), int(part[3:])
                edge = day + dt.timedelta(hours=h, minutes=m)
                out += [edge, edge - dt.timedelta(seconds=1)]
    return out


def _format_at(rng: random.Random, at: dt.datetime) -> str:
    text = at.strftime("%Y-%m-%dT%H:%M")
    r = rng.random()
    if at.second or r < 0.8:
        text += f":{at.second:02d}"
        if rng.random() < 0.15:  # fractions are dropped, so 17:59:59.999999 is still 17:59:59
            text += f".{rng.choice((0, 500000, 999999)):06d}"
    return text + rng.choice(("+03:00", "+03:00", "", "+00:00", "+05:00", "-04:00"))


def _partner_discount(rng: random.Random, lines: list[dict], reduced: list[dict]) -> None:
    """A partner's discount on some of the goods, its share of the whole receipt right at the edge of one of
    the program's ``reduced`` thresholds (at it, or one minor unit over), replacing the lines' external
    discounts; about half the partner's lines are closed to points, so the share over the redeemable lines
    alone is another figure (SPEC 4 step 4 counts the whole receipt)."""
    amounts = [line.get("amount", _round_half_up(line["quantity"] * line["price"], 1000)) for line in lines]
    threshold_bp = round(rng.choice(reduced)["external_discount_over_percent"] * 100)
    left = sum(amounts) * threshold_bp // 10000 + rng.choice((0, 1))
    for line in lines:
        line.pop("external_discount", None)
    for i in rng.sample(range(len(lines)), len(lines)):
        if left == 0:
            break
        take = min(left, amounts[i])
        lines[i]["external_discount"] = take
        left -= take
        if rng.random() < 0.5:
            lines[i]["no_redeem"] = True


def random_request(rng: random.Random, program: dict, n_lines: int, *,
                   products: tuple[Product, ...] | None = None) -> tuple[dict, dict | None, dict]:
    """A ``(receipt, member, budgets_used)`` triple for ``program`` with ``n_lines`` lines, aimed at the
    program's skus, categories, coupons, audiences, tiers, limits and validity edges."""
    products = products or catalogue()
    by_sku, by_cat = _index(products)
    target_skus, target_cats = _targets(program, products)
    target_skus = [s for s in target_skus if s in by_sku]
    target_cats = [c for c in target_cats if c in by_cat]
    promotions = program.get("promotions", [])

    # ---- lines
    lines = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.45 and target_skus:
            product = by_sku[rng.choice(target_skus)]
        elif r < 0.75 and target_cats:
            product = rng.choice(by_cat[rng.choice(target_cats)])
        else:
            product = rng.choice(products)
        price = product.price
        if rng.random() < 0.05:
            price = rng.choice((0, 1, 99_999_999))
        if product.weight and rng.random() < 0.85:
            quantity = rng.choice((rng.randint(1, 3000), rng.randint(100, 1500), 1000, 2000))
        else:
            quantity = 1000 * rng.choice((1, 1, 1, 1, 2, 2, 3, 4, 6, 12))
        line: dict = {"sku": product.sku, "quantity": quantity, "price": price}
        if rng.random() < 0.9:
            line["categories"] = list(product.categories)
        amount = _round_half_up(quantity * price, 1000)
        if rng.random() < 0.15:  # the POS sends its own amount (a rounded or marked-down one)
            amount = max(0, amount - rng.randint(0, max(1, amount // 10)))
            line["amount"] = amount
        r = rng.random()
        if r < 0.12:
            line["external_discount"] = rng.randint(0, amount // 10)
        elif r < 0.22:
            line["external_discount"] = rng.randint(amount * 3 // 10, amount)
        elif r < 0.3:
            line["external_discount"] = 0
        if rng.random() < 0.15:
            line["min_price"] = rng.choice((price // 2, price * 9 // 10, price, price + 1, 1))
        # Goods sold under a partner's discount are often closed to points (tobacco, gift cards, a partner's
        # own offer): such a line is no_redeem far more often, so that receipts whose external share differs
        # between the whole receipt and its redeemable lines are common (SPEC 4 step 4 counts the whole).
        no_redeem = 0.4 if line.get("external_discount") else 0.08
        for flag, p in (("no_discount", 0.05), ("no_accrual", 0.05), ("no_redeem", no_redeem)):
            if rng.random() < p:
                line[flag] = True
            elif rng.random() < 0.03:
                line[flag] = False
        lines.append(line)
    reduced = program.get("redeem", {}).get("reduced")
    if reduced and n_lines > 1 and rng.random() < 0.08:
        _partner_discount(rng, lines, reduced)

    # ---- when: random moment, an edge of some promotion's validity, or inside some window
    with_valid = [p for p in promotions if p.get("valid")]
    r = rng.random()
    at = YEAR_START + dt.timedelta(seconds=rng.randrange(365 * 86400))
    if r < 0.45 and with_valid:
        edges = _edge_times(rng, rng.choice(with_valid))
        if edges:
            at = rng.choice(edges)
    receipt: dict = {"at": _format_at(rng, at)}
    if rng.random() < 0.9:
        receipt["store"] = rng.choice(STORES)
    if rng.random() < 0.8:
        receipt["channel"] = rng.choice(CHANNELS + ("pos",))
    if rng.random() < 0.5:
        receipt["terminal"] = f"pos-{rng.randint(1, 9)}"
        receipt["number"] = f"{rng.randrange(10**6):06d}"
    program_coupons = sorted({p["when"]["coupon"] for p in promotions if p.get("when", {}).get("coupon")})
    if program_coupons and rng.random() < 0.5:
        coupons = rng.sample(program_coupons, rng.randint(1, len(program_coupons)))
        if rng.random() < 0.2:
            coupons = [c.lower() for c in coupons]  # codes are case-sensitive: these match nothing
        receipt["coupons"] = coupons
    elif rng.random() < 0.1:
        receipt["coupons"] = []
    r = rng.random()
    if r < 0.55:
        receipt["redeem_points"] = rng.choice((1, 10, 100, 305, 1000, 5000, 50_000, 10**6))
    elif r < 0.65:
        receipt["redeem_points"] = 0
    receipt["lines"] = lines

    # ---- member
    member: dict | None = None
    if rng.random() < 0.88:
        member = {"card": f"7{rng.randrange(10**6):06d}"}
        r = rng.random()
        if r < 0.08:
            member["status"] = "restricted"
        elif r < 0.12:
            member["status"] = "suspended"
        elif r < 0.16:
            member["status"] = "blocked"
        elif r < 0.7:
            member["status"] = "active"
        levels = program.get("tiers", {}).get("levels", [])
        if levels and rng.random() < 0.85:
            member["tier"] = rng.choice(levels)["name"]
        member["active_points"] = rng.choice((0, rng.randint(0, 500), rng.randint(0, 200_000), 10**6))
        if rng.random() < 0.7:
            member["pending_points"] = rng.randint(0, 5000)
        program_audiences = sorted({a for p in promotions for part in ("include", "exclude")
                                    for a in p.get("audience", {}).get(part, ())})
        pool = program_audiences or list(AUDIENCES)
        if rng.random() < 0.75:
            member["audiences"] = rng.sample(pool, rng.randint(0, min(3, len(pool))))
        limited = [p for p in promotions if p.get("limits", {}).get("uses_per_member")]
        if limited and rng.random() < 0.8:
            usage = {}
            for p in rng.sample(limited, rng.randint(1, len(limited))):
                n = p["limits"]["uses_per_member"]
                usage[p["id"]] = rng.choice((0, n - 1, n, n + 1))
            member["usage"] = usage
        if rng.random() < 0.5:
            thresholds = [lv["from"] for lv in levels] or [0]
            member["purchases_sum"] = max(0, rng.choice(thresholds) + rng.choice((-1, 0, 1, -150_000, 300_000)))

    # ---- budgets: spent below, at and above each budget
    budgets_used: dict = {}
    for p in promotions:
        limits = p.get("limits", {})
        budget = limits.get("discount_budget", limits.get("points_budget"))
        if budget is not None and rng.random() < 0.8:
            budgets_used[p["id"]] = rng.choice((0, max(0, budget - 1), budget, budget + 1, budget // 2))
    return receipt, member, budgets_used
