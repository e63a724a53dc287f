"""Receipt and member context: the JSON objects of SPEC section 4 in, ``model.Receipt`` / ``model.Member`` out.

The rules are exactly those of docs/ENGINE.md "Inputs"; both the reference and the compiled core (on any
anomaly of its fast path) come here, so an error names the same field with the same words whichever engine
runs. A bad value raises ``InputError(path, reason)`` with paths such as ``receipt.lines[2].quantity`` or
``member.status``. Keys that are not part of the contract are ignored (integrators may send more); an
optional key given as ``null`` counts as absent.
"""
from __future__ import annotations

import datetime as dt
import re

from .errors import InputError, quote
from .model import CARD_STATUSES, Line, Member, Program, Receipt

__all__ = ["parse_request", "parse_budgets_used", "parse_at", "parse_receipt_time", "round_half_up", "MAX_MONEY",
           "MAX_POINTS", "MAX_QUANTITY", "MAX_LINES", "MAX_OFFSET_HOURS"]

MAX_MONEY = 10**12
MAX_POINTS = 10**12
MAX_QUANTITY = 10**9
MAX_LINES = 1000
# The widest UTC offset a receipt's ``at`` may carry, as java.time.ZoneOffset bounds it (real zones span -12:00
# to +14:00); minutes of an offset are 00-59.
MAX_OFFSET_HOURS = 18

_AT_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?(Z|([+-])(\d{2}):?(\d{2}))?$")
_MISSING = object()


def round_half_up(num: int, den: int) -> int:
    """``round-half-up(num / den)`` for ``num >= 0`` and ``den > 0``, in integers: ``(2 num + den) // 2 den``."""
    return (2 * num + den) // (2 * den)


# ---- field readers --------------------------------------------------------------------------------------

def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _get(d: dict, key: str):
    """The value at ``key``, or ``_MISSING`` when it is absent or null."""
    value = d.get(key, _MISSING)
    return _MISSING if value is None else value


def _int(value, path: str, lo: int, hi: int, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(path, f"expected {what}, got {_kind(value)}")
    if value < lo:
        raise InputError(path, f"must be at least {lo}, got {value}")
    if value > hi:
        raise InputError(path, f"must be at most {hi}, got {value}")
    return value


def _money(value, path: str) -> int:
    return _int(value, path, 0, MAX_MONEY, "an integer amount in minor units")


def _points(value, path: str) -> int:
    return _int(value, path, 0, MAX_POINTS, "an integer number of points")


def _str(value, path: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InputError(path, f"expected a string, got {_kind(value)}")
    if not allow_empty and not value:
        raise InputError(path, "must not be empty")
    return value


def _bool(value, path: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(path, f"expected true or false, got {_kind(value)}")
    return value


def _str_list(value, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InputError(path, f"expected a list of strings, got {_kind(value)}")
    return tuple(_str(item, f"{path}[{i}]") for i, item in enumerate(value))


def _object(value, path: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(path, f"expected an object, got {_kind(value)}")
    return value


def _opt(d: dict, key: str, path: str, read, default):
    value = _get(d, key)
    return default if value is _MISSING else read(value, f"{path}.{key}")


def _required(d: dict, key: str, path: str):
    value = _get(d, key)
    if value is _MISSING:
        raise InputError(f"{path}.{key}", "required")
    return value


def _match_at(value, path: str):
    if not isinstance(value, str):
        raise InputError(path, f"expected an ISO 8601 local time such as 2026-03-02T12:30:00+03:00, "
                               f"got {_kind(value)}")
    m = _AT_RE.match(value)
    if m is None:
        raise InputError(path, f"expected an ISO 8601 local time such as 2026-03-02T12:30:00+03:00, "
                               f"got {quote(value)}")
    year, month, day, hour, minute = (int(x) for x in m.groups()[:5])
    second = int(m.group(6) or 0)
    try:
        local = dt.datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise InputError(path, f"not a valid date and time: {quote(value)} ({exc})") from None
    offset = dt.timedelta(0)
    if m.group(8):
        oh, om = int(m.group(9)), int(m.group(10))
        if oh > MAX_OFFSET_HOURS or om > 59 or (oh == MAX_OFFSET_HOURS and om):
            raise InputError(path, f"not a valid UTC offset: {m.group(7)} (offsets run from -18:00 to +18:00, "
                                   f"minutes 00-59)")
        offset = dt.timedelta(hours=oh, minutes=om) * (-1 if m.group(8) == "-" else 1)
    return local, offset


def parse_at(value, path: str = "receipt.at") -> dt.datetime:
    """ISO 8601 ``YYYY-MM-DDTHH:MM[:SS[.ffffff]][offset]`` as the naive wall clock written: the offset and
    fractions of a second are dropped (the offset is checked: at most 18 hours, minutes 00-59)."""
    return _match_at(value, path)[0]


def parse_receipt_time(value, path: str = "receipt.at") -> tuple[dt.datetime, dt.datetime]:
    """``(local, instant)``: the naive wall clock written (``parse_at``) and the moment it names, an aware UTC
    ``datetime`` (a time written without an offset is taken as UTC). The local date is the receipt's date
    (segments, tier windows, usage periods); the instant orders it against the server's clock (activation)."""
    local, offset = _match_at(value, path)
    try:
        return local, (local - offset).replace(tzinfo=dt.timezone.utc)
    except OverflowError:
        raise InputError(path, f"out of the range of dates: {quote(value)}") from None


# ---- receipt --------------------------------------------------------------------------------------------

def _line(value, p: str) -> Line:
    d = _object(value, p)
    sku = _str(_required(d, "sku", p), f"{p}.sku", allow_empty=False)
    quantity = _int(_required(d, "quantity", p), f"{p}.quantity", 1, MAX_QUANTITY,
                    "an integer quantity in thousandths (1000 = 1 pc)")
    price = _money(_required(d, "price", p), f"{p}.price")
    amount_raw = _get(d, "amount")
    if amount_raw is _MISSING:
        amount = round_half_up(quantity * price, 1000)
        if amount > MAX_MONEY:
            raise InputError(f"{p}.amount", f"quantity x price / 1000 = {amount} is over the limit {MAX_MONEY}")
    else:
        amount = _money(amount_raw, f"{p}.amount")
    external = _opt(d, "external_discount", p, _money, 0)
    if external > amount:
        raise InputError(f"{p}.external_discount", f"{external} is more than the line amount {amount}")
    return Line(
        sku=sku, quantity=quantity, price=price, amount=amount,
        categories=_opt(d, "categories", p, _str_list, ()),
        external_discount=external,
        min_price=_opt(d, "min_price", p, _money, 0),
        no_discount=_opt(d, "no_discount", p, _bool, False),
        no_accrual=_opt(d, "no_accrual", p, _bool, False),
        no_redeem=_opt(d, "no_redeem", p, _bool, False),
    )


def _receipt(value) -> Receipt:
    p = "receipt"
    if value is None:
        raise InputError(p, "required")
    d = _object(value, p)
    at = parse_at(_required(d, "at", p), f"{p}.at")
    lines_raw = _required(d, "lines", p)
    if not isinstance(lines_raw, list):
        raise InputError(f"{p}.lines", f"expected a list of lines, got {_kind(lines_raw)}")
    if not lines_raw:
        raise InputError(f"{p}.lines", "a receipt needs at least one line")
    if len(lines_raw) > MAX_LINES:
        raise InputError(f"{p}.lines", f"at most {MAX_LINES} lines, got {len(lines_raw)}")
    lines = tuple(_line(item, f"{p}.lines[{i}]") for i, item in enumerate(lines_raw))
    return Receipt(
        at=at, lines=lines,
        store=_opt(d, "store", p, _str, ""),
        terminal=_opt(d, "terminal", p, _str, ""),
        number=_opt(d, "number", p, _str, ""),
        channel=_opt(d, "channel", p, _str, "pos"),
        coupons=_opt(d, "coupons", p, _str_list, ()),
        redeem_points=_opt(d, "redeem_points", p, _points, 0),
    )


# ---- member ---------------------------------------------------------------------------------------------

def _usage(value, path: str) -> dict:
    d = _object(value, path)
    out = {}
    for key, uses in d.items():
        out[_str(key, path)] = _int(uses, f"{path}.{key}", 0, MAX_POINTS, "an integer count of uses")
    return out


def _member(value, program: Program) -> Member | None:
    p = "member"
    if value is None:
        return None
    d = _object(value, p)
    card = _opt(d, "card", p, _str, None)
    status = "active"
    if _get(d, "status") is not _MISSING:
        status = d["status"]
        if not isinstance(status, str) or status not in CARD_STATUSES:
            raise InputError(f"{p}.status", f"expected one of {', '.join(CARD_STATUSES)}, got {_kind(status)}")
    levels = program.tiers.levels
    tier = levels[0].name if levels else None
    if _get(d, "tier") is not _MISSING:
        tier = _str(d["tier"], f"{p}.tier")
        names = [t.name for t in levels]
        if tier not in names:
            raise InputError(f"{p}.tier", f"unknown tier {tier!r} (program tiers: {', '.join(names)})")
    return Member(
        card=card, status=status, tier=tier,
        active_points=_opt(d, "active_points", p, _points, 0),
        pending_points=_opt(d, "pending_points", p, _points, 0),
        audiences=frozenset(_opt(d, "audiences", p, _str_list, ())),
        usage=_opt(d, "usage", p, _usage, {}),
        purchases_sum=_opt(d, "purchases_sum", p, _money, None),
    )


def parse_request(receipt: dict, member: dict | None, program: Program) -> tuple[Receipt, Member | None]:
    """Validate a receipt and its member context (``None``: anonymous). A suspended or blocked member is
    returned as given: serving it as anonymous is the engine's decision, with a message saying why."""
    return _receipt(receipt), _member(member, program)


def parse_budgets_used(value, path: str = "budgets_used") -> dict:
    """``budgets_used``: promotion id -> what its budget has spent so far (minor units or points)."""
    if value is None:
        return {}
    d = _object(value, path)
    return {_str(k, path): _int(v, f"{path}.{k}", 0, MAX_MONEY, "an integer") for k, v in d.items()}
