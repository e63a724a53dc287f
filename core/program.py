"""The program file: YAML (SPEC section 3) in, a validated ``model.Program`` out.

This module is the only place that reads a program's text. It checks every key, turns the file's units into
the engine's (percent -> basis points, multiplier -> hundredths, exclusive ``valid.to``), and reports the
first problem as ``ProgramError(path, reason)`` with a path such as ``promotions[3].effect`` or
``tiers.levels[1].from``. Numbers are never taken through float arithmetic: the YAML loader keeps decimal
scalars as ``Decimal`` built from their text, and plain floats (from ``program_from_dict``) are read through
``Decimal(str(x))``. Top-level ``segments``, ``audiences`` and ``scenarios`` are kept in ``Program.source``
for the modules that own them and are not interpreted here.
"""
from __future__ import annotations

import datetime as dt
import math
import pathlib
import re
from decimal import Decimal, InvalidOperation

import yaml

from . import program_fields as fields
from .errors import ProgramError
from .model import (
    DISCOUNT_EFFECTS, EFFECTS, POINTS_EFFECTS, Conditions, Effect, Limits, OperationLimit, OperationLimits,
    ProductGroup, Program, Promotion, Scope, Tier, Tiers, Validity,
)
from .program_fields import EFFECT_PER, MAX_MONEY, MAX_POINTS, Field

__all__ = ["load_program", "load_program_text", "program_from_dict"]

# The keys, bounds and defaults are data (``program_fields``, also the JSON Schema's source); this module
# reads them and keeps the rules between keys.
# Kept in Program.source for later modules (segments, scenarios); not interpreted here.
PASSTHROUGH_KEYS = tuple(k for k, f in fields.PROGRAM.keys.items() if f.kind == "passthrough")
OPERATION_LIMITS = tuple(fields.PROGRAM.keys["operation_limits"].keys)

_HOURS_RE = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")


# ---- loading --------------------------------------------------------------------------------------------

class _ExactLoader(yaml.SafeLoader):
    """A SafeLoader that keeps decimal scalars exact (``Decimal`` from the scalar's text) and rejects
    duplicate keys, which plain PyYAML silently resolves to the last one."""


def _construct_exact_float(loader, node):
    text = loader.construct_scalar(node).replace("_", "")
    try:
        value = Decimal(text)
    except InvalidOperation:  # .inf, .nan, sexagesimal 1:30.5: let the validator reject the float
        return loader.construct_yaml_float(node)
    return value


def _construct_checked_mapping(loader, node, deep=False):
    if isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # unhashable key: the base constructor reports it
                pass
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


MAX_EXPANDED_NODES = 100_000   # aliases may share nodes, but not blow a small file up ("billion laughs")


def _node_size(node, sizes: dict) -> int:
    key = id(node)
    if key not in sizes:
        sizes[key] = 1       # a recursive node counts once
        if isinstance(node, yaml.SequenceNode):
            sizes[key] = 1 + sum(_node_size(n, sizes) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[key] = 1 + sum(_node_size(k, sizes) + _node_size(v, sizes) for k, v in node.value)
    return sizes[key]


def _compose_bounded(loader, parent, index):
    if loader.check_event(yaml.AliasEvent):
        event = loader.peek_event()
        node = loader.anchors.get(event.anchor)
        if node is not None:
            loader._expanded = getattr(loader, "_expanded", 0) + _node_size(node, loader.__dict__.setdefault("_sizes", {}))
            if loader._expanded > MAX_EXPANDED_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand to more than {MAX_EXPANDED_NODES} nodes", event.start_mark)
    return yaml.SafeLoader.compose_node(loader, parent, index)


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_exact_float)
_ExactLoader.compose_node = _compose_bounded
_ExactLoader.construct_mapping = _construct_checked_mapping


def _plain(value):
    """The parsed tree as ``yaml.safe_load`` would give it (Decimal back to float), for Program.source."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_program(path) -> Program:
    """Read and validate the program file at ``path``."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProgramError(str(p), "file not found") from None
    except IsADirectoryError:
        raise ProgramError(str(p), "is a directory, not a program file") from None
    except UnicodeDecodeError as exc:
        raise ProgramError(str(p), f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ProgramError(str(p), exc.strerror or str(exc)) from None
    return load_program_text(text, source_name=str(p))


def load_program_text(text: str, source_name: str = "<program>") -> Program:
    """Validate a program given as YAML text; ``source_name`` names it in file-level errors."""
    try:
        data = yaml.load(text, Loader=_ExactLoader)  # noqa: S506 - _ExactLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ProgramError(source_name, f"YAML syntax error at {where}{problem}") from None
    except yaml.YAMLError as exc:
        raise ProgramError(source_name, f"YAML syntax error: {exc}") from None
    except (ValueError, RecursionError) as exc:   # e.g. a date that does not exist: 2026-02-30
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ProgramError(source_name, f"invalid value in the YAML: {reason}") from None
    if data is None:
        raise ProgramError(source_name, "the program file is empty")
    if not isinstance(data, dict):
        raise ProgramError(source_name, f"expected a mapping of program keys at the top, got {_kind(data)}")
    return _build_program(data, source=_plain(data))


def program_from_dict(d: dict) -> Program:
    """Validate a program given as an already parsed mapping (from YAML or JSON)."""
    if not isinstance(d, dict):
        raise ProgramError("<program>", f"expected a mapping of program keys, got {_kind(d)}")
    return _build_program(d, source=d)


# ---- scalar readers: each returns the engine's unit or raises ProgramError(path, reason) ----------------

def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, (float, Decimal)):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dt.datetime):
        return f"datetime {value.isoformat()}"
    if isinstance(value, dt.date):
        return f"date {value.isoformat()}"
    return type(value).__name__


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _mapping(value, path: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ProgramError(path, f"expected a mapping, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ProgramError(_join(path, key), "keys must be strings")
        if key not in allowed:
            raise ProgramError(_join(path, key), "unknown key")
    return value


def _int(value, path: str, lo: int | None = None, hi: int | None = None, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProgramError(path, f"expected {what}, got {_kind(value)}")
    if lo is not None and value < lo:
        raise ProgramError(path, f"must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise ProgramError(path, f"must be at most {hi}, got {value}")
    return value


def _money(value, path: str) -> int:
    return _int(value, path, 0, MAX_MONEY, "a non-negative integer amount in minor units")


def _decimal(value, path: str, what: str) -> Decimal:
    """An exact decimal from an int, a Decimal (exact loader) or a float (read as its shortest text)."""
    if isinstance(value, bool):
        raise ProgramError(path, f"expected {what}, got {_kind(value)}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProgramError(path, f"expected {what}, got {_kind(value)}")
        return Decimal(str(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ProgramError(path, f"expected {what}, got {_kind(value)}")
        return value
    raise ProgramError(path, f"expected {what}, got {_kind(value)}")


def _hundredths(value, path: str, lo: int, hi: int, what: str) -> int:
    """A number with at most two decimals, as an integer count of hundredths within [lo, hi] hundredths."""
    d = _decimal(value, path, what)
    scaled = d * 100
    if scaled != scaled.to_integral_value():
        raise ProgramError(path, f"at most two decimals allowed, got {value}")
    n = int(scaled)
    if not lo <= n <= hi:
        raise ProgramError(path, f"must be between {_fmt(lo)} and {_fmt(hi)}, got {value}")
    return n


def _fmt(hundredths: int) -> str:
    whole, frac = divmod(hundredths, 100)
    return str(whole) if frac == 0 else f"{whole}.{frac:02d}".rstrip("0")


def _percent_bp(value, path: str, hi_percent: int = 100) -> int:
    """A percentage (two decimals at most) in basis points: ``12.5`` -> ``1250``."""
    return _hundredths(value, path, 0, hi_percent * 100, "a percentage")


def _bool(value, path: str) -> bool:
    if not isinstance(value, bool):
        raise ProgramError(path, f"expected true or false, got {_kind(value)}")
    return value


def _str(value, path: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        hint = " (quote it in YAML)" if isinstance(value, (int, float, Decimal, bool, dt.date)) else ""
        raise ProgramError(path, f"expected a string, got {_kind(value)}{hint}")
    if not allow_empty and not value.strip():
        raise ProgramError(path, "must not be empty")
    return value


def _str_list(value, path: str, allow_empty_list: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ProgramError(path, f"expected a list of strings, got {_kind(value)}")
    if not value and not allow_empty_list:
        raise ProgramError(path, "empty list: omit the key instead")
    return tuple(_str(item, f"{path}[{i}]") for i, item in enumerate(value))


def _choice(value, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ProgramError(path, f"expected one of {', '.join(choices)}, got {_kind(value)}")
    return value


def _required(d: dict, key: str, path: str):
    if key not in d:
        raise ProgramError(_join(path, key), "required")
    return d[key]


def _read(f: Field, value, path: str):
    """``value`` read as the scalar kind of ``f`` (its bounds from the table), in the engine's unit."""
    if f.kind == "int":
        return _int(value, path, f.lo, f.hi, f.what or "an integer")
    if f.kind == "money":
        return _money(value, path)
    if f.kind == "percent":
        return _percent_bp(value, path, f.hi)
    if f.kind == "hundredths":
        return _hundredths(value, path, f.lo, f.hi, f.what)
    if f.kind == "bool":
        return _bool(value, path)
    if f.kind == "str":
        return _str(value, path, allow_empty=f.allow_empty)
    if f.kind == "choice":
        return _choice(value, path, f.choices)
    if f.kind == "str_list":
        return _str_list(value, path, allow_empty_list=f.allow_empty)
    raise TypeError(f"{path}: a {f.kind} is read by its own code")


def _value(section: Field, d: dict, key: str, path: str, *, none_is_absent: bool = False):
    """The value of ``key`` in the mapping ``d`` at ``path``, read as the table says: its default (read the
    same way) when absent, None when it has none, ``required`` when it must be given. ``none_is_absent``:
    a null counts as absent (the keys the file may leave ``~``)."""
    f = section.keys[key]
    p = _join(path, key)
    if key in d and not (none_is_absent and d[key] is None):
        return _read(f, d[key], p)
    if f.required:
        raise ProgramError(p, "required")
    return None if f.default is None else _read(f, f.default, p)


def _section(section: Field, value, path: str) -> dict:
    """A mapping whose keys are those of ``section``."""
    return _mapping(value, path, tuple(section.keys))


# ---- program sections -----------------------------------------------------------------------------------

P = fields.PROGRAM
TOP_KEYS = tuple(P.keys)


def _build_program(d: dict, source: dict) -> Program:
    _section(P, d, "")
    name = _value(P, d, "program", "")
    currency = _value(P, d, "currency", "")
    if not _CURRENCY_RE.match(currency):
        raise ProgramError("currency", f"expected a three-letter code such as RUB, got {currency!r}")
    point_value = _value(P, d, "point_value", "")
    stacking = _value(P, d, "stacking", "")

    accrual_fields = P.keys["accrual"]
    accrual = _section(accrual_fields, d.get("accrual", {}), "accrual")
    activation_days = _value(accrual_fields, accrual, "activation_days", "accrual")
    expiry_days = _value(accrual_fields, accrual, "expiry_days", "accrual", none_is_absent=True)
    on_redeemed_part = _value(accrual_fields, accrual, "on_redeemed_part", "accrual")

    redeem_fields = P.keys["redeem"]
    redeem = _section(redeem_fields, d.get("redeem", {}), "redeem")
    redeem_max_bp = _value(redeem_fields, redeem, "max_percent", "redeem")
    reduced = _reduced(redeem.get("reduced", []), "redeem.reduced")
    min_payable = _value(redeem_fields, redeem, "min_payable_per_line", "redeem")

    max_discount_bp = _value(P, d, "max_discount_percent", "")
    hints = _section(P.keys["hints"], d.get("hints", {}), "hints")
    hint_within_bp = _value(P.keys["hints"], hints, "within_percent", "hints")

    if "tiers" in d:
        if "percent" in accrual:
            raise ProgramError("accrual.percent",
                               "not allowed when tiers are given: set accrual_percent on each tier level")
        tiers = _tiers(d["tiers"])
    else:
        base_bp = _value(accrual_fields, accrual, "percent", "accrual")
        tiers = Tiers(levels=(Tier(name="Basic", threshold=0, accrual_bp=base_bp),))

    groups = _product_groups(d.get("product_groups", {}))
    promotions = _promotions(d.get("promotions", []), {g.name for g in groups}, {t.name for t in tiers.levels})

    operation_limits = _operation_limits(d.get("operation_limits", {}))

    for key in PASSTHROUGH_KEYS:
        if key in d and not isinstance(d[key], (dict, list)) and d[key] is not None:
            raise ProgramError(key, f"expected a mapping or a list, got {_kind(d[key])}")

    return Program(
        name=name, currency=currency, point_value=point_value, stacking=stacking,
        activation_days=activation_days, expiry_days=expiry_days, on_redeemed_part=on_redeemed_part,
        redeem_max_bp=redeem_max_bp, reduced=reduced, min_payable_per_line=min_payable,
        max_discount_bp=max_discount_bp, hint_within_bp=hint_within_bp, tiers=tiers,
        product_groups=groups, promotions=promotions, operation_limits=operation_limits, source=source,
    )


def _operation_limits(value) -> OperationLimits:
    """``operation_limits``: each of ``OperationLimits``' names a mapping of ``soft`` and / or ``hard``, whole
    numbers (points, or confirms), ``soft`` below ``hard`` when both are given (a soft limit at or past the hard
    one would never be seen)."""
    d = _mapping(value, "operation_limits", OPERATION_LIMITS)
    return OperationLimits(**{name: _operation_limit(d[name], f"operation_limits.{name}") for name in d})


def _operation_limit(value, p: str) -> OperationLimit:
    d = _mapping(value, p, ("soft", "hard"))
    if not d:
        raise ProgramError(p, "expected soft and / or hard")
    soft = _int(d["soft"], f"{p}.soft", 0, MAX_POINTS) if d.get("soft") is not None else None
    hard = _int(d["hard"], f"{p}.hard", 0, MAX_POINTS) if d.get("hard") is not None else None
    if soft is not None and hard is not None and soft >= hard:
        raise ProgramError(f"{p}.soft", f"must be below hard ({hard}), got {soft}")
    return OperationLimit(soft=soft, hard=hard)


def _reduced(value, path: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list):
        raise ProgramError(path, f"expected a list, got {_kind(value)}")
    out = []
    item_fields = P.keys["redeem"].keys["reduced"]
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        _section(item_fields, item, p)
        out.append((_value(item_fields, item, "external_discount_over_percent", p),
                    _value(item_fields, item, "max_percent", p)))
    return tuple(out)


def _tiers(value) -> Tiers:
    tier_fields = P.keys["tiers"]
    _section(tier_fields, value, "tiers")
    metric = _value(tier_fields, value, "metric", "tiers")
    window_days = _value(tier_fields, value, "window_days", "tiers", none_is_absent=True)
    level_fields = tier_fields.keys["levels"]
    levels_raw = _required(value, "levels", "tiers")
    if not isinstance(levels_raw, list) or not levels_raw:
        raise ProgramError("tiers.levels", f"expected a non-empty list of levels, got {_kind(levels_raw)}")
    levels: list[Tier] = []
    names: set[str] = set()
    for i, item in enumerate(levels_raw):
        p = f"tiers.levels[{i}]"
        _section(level_fields, item, p)
        name = _value(level_fields, item, "name", p)
        if name in names:
            raise ProgramError(f"{p}.name", f"duplicate tier name {name!r}")
        names.add(name)
        threshold = _value(level_fields, item, "from", p)
        if i == 0 and threshold != 0:
            raise ProgramError(f"{p}.from", f"the first level must start from 0, got {threshold}")
        if i > 0 and threshold <= levels[-1].threshold:
            raise ProgramError(f"{p}.from", f"levels must be strictly ascending: {threshold} is not above "
                                            f"{levels[-1].threshold} of {levels[-1].name!r}")
        accrual_bp = _value(level_fields, item, "accrual_percent", p)
        redeem_max_bp = _value(level_fields, item, "redeem_max_percent", p, none_is_absent=True)
        levels.append(Tier(name=name, threshold=threshold, accrual_bp=accrual_bp, redeem_max_bp=redeem_max_bp))
    return Tiers(metric=metric, window_days=window_days, levels=tuple(levels))


def _product_groups(value) -> tuple[ProductGroup, ...]:
    if not isinstance(value, dict):
        raise ProgramError("product_groups", f"expected a mapping of group name to {{skus, categories}}, "
                                             f"got {_kind(value)}")
    groups = []
    for name, body in value.items():
        p = f"product_groups.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ProgramError(p, "a group name must be a non-empty string")
        group_fields = P.keys["product_groups"]
        _section(group_fields, body, p)
        skus = _str_list(body.get("skus", []), f"{p}.skus")
        categories = _str_list(body.get("categories", []), f"{p}.categories")
        if not skus and not categories:
            raise ProgramError(p, "a group needs skus or categories")
        groups.append(ProductGroup(name=name, skus=frozenset(skus), categories=frozenset(categories)))
    return tuple(groups)


# ---- promotions -----------------------------------------------------------------------------------------

PROMO = P.keys["promotions"]
PROMOTION_KEYS = tuple(PROMO.keys)


def _promotions(value, groups: set[str], tiers: set[str]) -> tuple[Promotion, ...]:
    if not isinstance(value, list):
        raise ProgramError("promotions", f"expected a list of promotions, got {_kind(value)}")
    out = []
    ids: dict[str, int] = {}
    for i, item in enumerate(value):
        promo = _promotion(item, f"promotions[{i}]", groups, tiers)
        if promo.id in ids:
            raise ProgramError(f"promotions[{i}].id", f"duplicate id {promo.id!r} (also promotions[{ids[promo.id]}])")
        ids[promo.id] = i
        out.append(promo)
    return tuple(out)


def _promotion(d, p: str, groups: set[str], tiers: set[str]) -> Promotion:
    _section(PROMO, d, p)
    pid = _value(PROMO, d, "id", p)
    if pid != pid.strip():
        raise ProgramError(f"{p}.id", f"must not start or end with spaces: {pid!r}")
    title = _value(PROMO, d, "title", p)
    priority = _value(PROMO, d, "priority", p)
    exclusive = _value(PROMO, d, "exclusive", p)

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    if "audience" in d:
        aud_fields = PROMO.keys["audience"]
        aud = _section(aud_fields, d["audience"], f"{p}.audience")
        include = _str_list(aud.get("include", []), f"{p}.audience.include")
        exclude = _str_list(aud.get("exclude", []), f"{p}.audience.exclude")

    tier_names: frozenset[str] = frozenset()
    if "tiers" in d:
        names = _value(PROMO, d, "tiers", p)
        for j, name in enumerate(names):
            if name not in tiers:
                raise ProgramError(f"{p}.tiers[{j}]", f"unknown tier {name!r} (tiers: {', '.join(sorted(tiers))})")
        tier_names = frozenset(names)

    effect = _effect(_required(d, "effect", p), f"{p}.effect")
    return Promotion(
        id=pid, effect=effect, title=title, priority=priority, exclusive=exclusive,
        audience_include=include, audience_exclude=exclude, tiers=tier_names,
        valid=_validity(d.get("valid", {}), f"{p}.valid"),
        when=_conditions(d.get("when", {}), f"{p}.when", groups),
        scope=_scope(d.get("scope", "all"), f"{p}.scope", groups),
        limits=_limits(d.get("limits", {}), f"{p}.limits", effect),
    )


def _effect(d, p: str) -> Effect:
    _mapping(d, p, EFFECTS + ("per",))      # the effects of model.EFFECTS, each read as fields.EFFECT_VALUES says
    kinds = [k for k in EFFECTS if k in d]
    if not kinds:
        raise ProgramError(p, f"an effect expected: one of {', '.join(EFFECTS)}")
    if len(kinds) > 1:
        got = ", ".join(kinds[:-1]) + " and " + kinds[-1]
        raise ProgramError(p, f"exactly one effect expected, got {got}")
    kind = kinds[0]
    value = _read(fields.EFFECT_VALUES[kind], d[kind], f"{p}.{kind}")
    per = ""
    if kind in EFFECT_PER:
        allowed = EFFECT_PER[kind]
        per = _choice(d["per"], f"{p}.per", allowed) if "per" in d else allowed[0]
    elif "per" in d:
        raise ProgramError(f"{p}.per", f"not allowed with {kind} (only with amount_off, fixed_price, extra_points)")
    return Effect(kind=kind, value=value, per=per)


# The years a date in a program may name (a "forever" is better left out: an open end is allowed).
MIN_YEAR, MAX_YEAR = 1900, 9998


def _when_bound(value, path: str, is_end: bool) -> dt.datetime:
    """A ``valid.from`` / ``valid.to`` bound as a naive datetime; ``to`` becomes exclusive."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = dt.date.fromisoformat(text) if len(text) == 10 else dt.datetime.fromisoformat(text)
        except ValueError:
            raise ProgramError(path, f"expected a date (2026-01-31) or a datetime (2026-01-31 18:00:00), "
                                     f"got {value!r}") from None
    if isinstance(value, dt.date) and not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ProgramError(path, f"dates run from {MIN_YEAR} to {MAX_YEAR}, got {value.isoformat()}")
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            raise ProgramError(path, "a time zone is not allowed: times are the receipt's local wall clock")
        value = value.replace(microsecond=0)
        return value + dt.timedelta(seconds=1) if is_end else value
    if isinstance(value, dt.date):
        start = dt.datetime(value.year, value.month, value.day)
        return start + dt.timedelta(days=1) if is_end else start
    raise ProgramError(path, f"expected a date or a datetime, got {_kind(value)}")


def _hours(value, p: str) -> tuple[tuple[int, int], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ProgramError(p, f'expected "HH:MM-HH:MM" or a list of them, got {_kind(value)}')
    windows = []
    for j, item in enumerate(items):
        ip = p if isinstance(value, str) else f"{p}[{j}]"
        m = _HOURS_RE.match(item.strip()) if isinstance(item, str) else None
        if m is None:
            raise ProgramError(ip, f'expected "HH:MM-HH:MM", got {_kind(item)}')
        h1, m1, h2, m2 = (int(x) for x in m.groups())
        if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
            raise ProgramError(ip, f"not a time of day in {item!r} (00:00 to 23:59, or 24:00 as an end)")
        start, end = h1 * 3600 + m1 * 60, h2 * 3600 + m2 * 60
        if start == end:
            raise ProgramError(ip, f"empty window {item!r}: start and end are equal")
        windows.append((start, end))
    return tuple(windows)


def _validity(d, p: str) -> Validity:
    valid = PROMO.keys["valid"]
    _section(valid, d, p)
    starts = _when_bound(d["from"], f"{p}.from", False) if d.get("from") is not None else None
    ends = _when_bound(d["to"], f"{p}.to", True) if d.get("to") is not None else None
    if starts is not None and ends is not None and ends <= starts:
        raise ProgramError(f"{p}.to", "ends before valid.from")
    weekdays: frozenset[int] = frozenset()
    if "weekdays" in d:
        raw = d["weekdays"]
        if not isinstance(raw, list) or not raw:
            raise ProgramError(f"{p}.weekdays", f"expected a non-empty list of days 1..7 (Monday = 1), "
                                                f"got {_kind(raw)}")
        day = valid.keys["weekdays"]
        weekdays = frozenset(_int(x, f"{p}.weekdays[{j}]", day.lo, day.hi, day.what) for j, x in enumerate(raw))
    hours = _hours(d["hours"], f"{p}.hours") if "hours" in d else ()
    stores = frozenset(_value(valid, d, "stores", p)) if "stores" in d else frozenset()
    channels = frozenset(_value(valid, d, "channels", p)) if "channels" in d else frozenset()
    return Validity(starts=starts, ends=ends, weekdays=weekdays, hours=hours, stores=stores, channels=channels)


def _conditions(d, p: str, groups: set[str]) -> Conditions:
    when = PROMO.keys["when"]
    _section(when, d, p)
    total = _value(when, d, "receipt_total_at_least", p, none_is_absent=True)
    group_qty = None
    if d.get("group_quantity_at_least") is not None:
        gp = f"{p}.group_quantity_at_least"
        by_group = when.keys["group_quantity_at_least"]
        g = _section(by_group, d["group_quantity_at_least"], gp)
        group = _group_ref(_required(g, "group", gp), f"{gp}.group", groups)
        group_qty = (group, _value(by_group, g, "quantity", gp))
    coupon = _value(when, d, "coupon", p, none_is_absent=True)
    return Conditions(receipt_total_at_least=total, group_quantity_at_least=group_qty, coupon=coupon)


def _group_ref(value, path: str, groups: set[str]) -> str:
    name = _str(value, path)
    if name not in groups:
        known = ", ".join(sorted(groups)) or "none defined"
        raise ProgramError(path, f"unknown product group {name!r} (product_groups: {known})")
    return name


SCOPE_KEYS = tuple(PROMO.keys["scope"].keys)


def _scope(value, p: str, groups: set[str]) -> Scope:
    if value == "all":
        return Scope()
    if not isinstance(value, dict):
        raise ProgramError(p, f"expected `all` or a mapping of {', '.join(SCOPE_KEYS)}, got {_kind(value)}")
    _mapping(value, p, SCOPE_KEYS)
    parts = {key: _str_list(value.get(key, []), f"{p}.{key}") for key in SCOPE_KEYS}
    for key in ("groups", "exclude_groups"):
        for j, name in enumerate(parts[key]):
            _group_ref(name, f"{p}.{key}[{j}]", groups)
    return Scope(**parts)


def _limits(d, p: str, effect: Effect) -> Limits:
    limits = PROMO.keys["limits"]
    _section(limits, d, p)
    uses = _value(limits, d, "uses_per_member", p, none_is_absent=True)
    period = _value(limits, d, "period", p)
    discount_budget = points_budget = None
    if d.get("discount_budget") is not None:
        if effect.kind not in DISCOUNT_EFFECTS:
            raise ProgramError(f"{p}.discount_budget", f"only for discount effects, this one is {effect.kind} "
                                                       f"(use points_budget)")
        discount_budget = _value(limits, d, "discount_budget", p)
    if d.get("points_budget") is not None:
        if effect.kind not in POINTS_EFFECTS:
            raise ProgramError(f"{p}.points_budget", f"only for points effects, this one is {effect.kind} "
                                                     f"(use discount_budget)")
        points_budget = _value(limits, d, "points_budget", p)
    return Limits(uses_per_member=uses, period=period, discount_budget=discount_budget, points_budget=points_budget)
