"""Helpers of the security tests: the status a refused call must get, and row counts to show it wrote nothing."""
from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from sqlalchemy import create_engine, func, select, text

__all__ = ["expect_status", "count_rows", "utc_in"]


def count_rows(url: str, table: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(text(table))).scalar_one()
    finally:
        engine.dispose()


@contextlib.contextmanager
def expect_status(code: str, *words: str):
    """The block raises ``LoyaltyError`` with ``code`` and a message containing each of ``words``."""
    from loyalty.clients.client import LoyaltyError
    with pytest.raises(LoyaltyError) as info:
        yield info
    assert info.value.code.name == code, info.value.one_line()
    for word in words:
        assert word in info.value.message, info.value.one_line()


def utc_in(**delta) -> int:
    return int((dt.datetime.now(dt.timezone.utc) + dt.timedelta(**delta)).timestamp())
