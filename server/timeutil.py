"""Time as the server writes it: aware UTC ``now`` (the default clock of every service) and ISO 8601 text for
the API (empty for no value)."""
from __future__ import annotations

import datetime as dt

__all__ = ["utcnow", "iso"]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(value) -> str:
    """ISO 8601 of a date or datetime for the API; "" for None; anything else as text."""
    if value is None:
        return ""
    return value.isoformat() if isinstance(value, (dt.date, dt.datetime)) else str(value)
