"""Builders of the engine tests: the JSON objects of SPEC section 4 as plain dicts, and programs parsed once."""
from __future__ import annotations

import functools
import textwrap

from loyalty.core import load_program_text

# The default receipt time: Monday 2 March 2026, 12:30 local, inside the SPEC program's validity window.
DEFAULT_AT = "2026-03-02T12:30:00+03:00"


@functools.lru_cache(maxsize=256)
def load_program_cached(program_yaml: str):
    """A program parsed once per text (programs are immutable), dedented so tests can indent YAML inline."""
    return load_program_text(textwrap.dedent(program_yaml))


def line(sku: str, qty: int, price: int, **kw) -> dict:
    """A receipt line; ``qty`` in thousandths as in the JSON (``2000`` is 2 pcs, ``1500`` is 1.5 kg)."""
    return {"sku": sku, "quantity": qty, "price": price, **kw}


def receipt(lines: list[dict], **kw) -> dict:
    """A receipt at the default store, channel and time (Monday 2026-03-02 12:30), no write-off asked."""
    return {"store": "msk-01", "terminal": "pos-3", "number": "000123", "channel": "pos", "at": DEFAULT_AT,
            "coupons": [], "redeem_points": 0, "lines": list(lines), **kw}


def member(**kw) -> dict:
    """An active card with 1000 active points, in no audience, at the lowest tier unless told otherwise."""
    return {"card": "7000001", "status": "active", "active_points": 1000, "pending_points": 0,
            "audiences": [], **kw}
