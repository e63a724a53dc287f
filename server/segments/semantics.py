"""What a condition's leaves mean, in the one place both readings follow: the profile columns a string leaf
names, and the day arithmetic (UTC days, ``window_days`` / ``from`` / ``to`` windows, full years of age) that
the SQL compiler (``compiler``) and the per-member evaluator (``evaluator``) share, so the two can only
disagree by a bug, not by a definition."""
from __future__ import annotations

import datetime as dt

from loyalty.server.models import members

UTC = dt.timezone.utc

# leaf name -> value kind
PROFILE_STR = {"gender": members.c.gender, "city": members.c.city, "source": members.c.source}


# ---- shared helpers (SQL and Python follow the same definitions) --------------------------------------------

def _d(v) -> dt.date:
    return v if isinstance(v, dt.date) else dt.date.fromisoformat(v)


def _midnight(d: dt.date) -> dt.datetime:
    return dt.datetime(d.year, d.month, d.day, tzinfo=UTC)


def _window_dates(spec: dict, as_of: dt.date) -> tuple[dt.date | None, dt.date | None]:
    """[start, end) as dates; window_days N covers the N days up to and including ``as_of``; ``from`` / ``to``
    include both days."""
    if "window_days" in spec:
        return as_of - dt.timedelta(days=spec["window_days"] - 1), None
    start = _d(spec["from"]) if "from" in spec else None
    end = _d(spec["to"]) + dt.timedelta(days=1) if "to" in spec else None
    return start, end


def _window_bounds(spec: dict, as_of: dt.date) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``_window_dates`` as [start, end) instants in UTC (for timestamps: message events)."""
    start, end = _window_dates(spec, as_of)
    return (None if start is None else _midnight(start)), (None if end is None else _midnight(end))


def _years_before(d: dt.date, n: int) -> dt.date:
    try:
        return d.replace(year=d.year - n)
    except ValueError:      # 29 February in a year that has none
        return d.replace(year=d.year - n, day=28)


def _age(birth: dt.date, as_of: dt.date) -> int:
    return as_of.year - birth.year - ((as_of.month, as_of.day) < (birth.month, birth.day))


def _dates(c: dict) -> dict:
    out = {}
    for op, v in c.items():
        if op == "exists":
            out[op] = v
        elif isinstance(v, list):
            out[op] = [_d(x) for x in v]
        else:
            out[op] = _d(v)
    return out
