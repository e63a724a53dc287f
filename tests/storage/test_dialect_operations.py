"""``server/dialects.py``: every operation means the same on SQLite and PostgreSQL. Each test runs on both
backends (``database_url``) against values worked out in Python; row locks, which only PostgreSQL takes, are
tested there with two transactions."""
import datetime as dt

import pytest
from sqlalchemy import Date, literal, select
from sqlalchemy.orm import aliased

from loyalty.server.db import Database
from loyalty.server.dialects import dialect_of, insert_ignore
from loyalty.server.scenarios.models import scenario_cursors

T0 = dt.datetime(2026, 2, 27, 23, 59, 30, tzinfo=dt.timezone.utc)


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    yield database
    database.engine.dispose()


def _cursor(conn, name: str, at: dt.datetime):
    return insert_ignore(conn, scenario_cursors).values(name=name, position=0, value="", updated_at=at)


def test_the_database_chooses_its_operations_once(db):
    assert db.dialect_ops is dialect_of(db.engine)
    assert db.dialect_ops.name == db.engine.dialect.name


def test_insert_ignore_writes_a_key_once_and_returning_tells_which_call_wrote(db):
    with db.write() as conn:
        first = conn.execute(_cursor(conn, "k", T0).returning(scenario_cursors.c.name)).scalar()
        second = conn.execute(_cursor(conn, "k", T0 + dt.timedelta(days=1))
                              .returning(scenario_cursors.c.name)).scalar()
    assert (first, second) == ("k", None)
    with db.read() as conn:
        assert conn.execute(select(scenario_cursors.c.updated_at)).scalars().all() == [T0]   # not overwritten


@pytest.mark.parametrize("day", [dt.date(2024, 2, 29), dt.date(1990, 12, 1), dt.date(2026, 1, 9)])
def test_month_day_is_the_dates_mm_dd(db, day):
    with db.read() as conn:
        got = conn.execute(select(dialect_of(conn).month_day(literal(day, Date)))).scalar()
    assert got == day.strftime("%m-%d")


def test_plus_seconds_compares_with_the_columns_own_values(db):
    """A goal reached within 60 seconds of entering: rows at +0 s and +59.9 s are inside, +61 s and the next
    day are not (the window crosses midnight and the month's end)."""
    offsets = {"a": 0, "b": 59.9, "d": 61, "e": 86400}
    with db.write() as conn:
        for name, secs in offsets.items():
            conn.execute(_cursor(conn, name, T0 + dt.timedelta(seconds=secs)))
    start, other = aliased(scenario_cursors), aliased(scenario_cursors)
    with db.read() as conn:
        inside = conn.execute(select(other.c.name).where(
            start.c.name == "a", other.c.updated_at >= start.c.updated_at,
            other.c.updated_at <= dialect_of(conn).plus_seconds(start.c.updated_at, 60))
            .order_by(other.c.name)).scalars().all()
    assert inside == ["a", "b"]


@pytest.mark.parametrize("days, secs", [(0, 0), (1, 0), (3, 5), (-200, 86399), (1095, 3600)])
def test_bulk_load_sql_text_computes_the_same_moments(db, days, secs):
    """The demo population's SQL text: a moment ``days`` before a day's midnight UTC and ``secs`` after it,
    as a timestamp, a date and ISO text; a date plus days; zero padding; text casts."""
    day = dt.date(2026, 3, 1)
    moment = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc) - dt.timedelta(days=days) + dt.timedelta(seconds=secs)
    with db.read() as conn:
        ops = dialect_of(conn)
        d, s = str(days), str(secs)
        row = conn.exec_driver_sql(
            f"SELECT {ops.date_of(day, d, s)}, {ops.iso_utc(day, d, s)}, {ops.date_plus('1950-01-01', d)}, "
            f"{ops.zero_pad(str(secs), 6)}, {ops.as_text(str(days))}").one()
        stamp = conn.exec_driver_sql(f"SELECT {ops.timestamp(day, d, s)}").scalar()
    assert str(row[0]) == moment.date().isoformat()
    assert row[1] == moment.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    assert str(row[2]) == (dt.date(1950, 1, 1) + dt.timedelta(days=days)).isoformat()
    assert (row[3], row[4]) == (f"{secs:06d}", str(days))
    stamp = stamp if isinstance(stamp, dt.datetime) else dt.datetime.fromisoformat(stamp)   # SQLite: text
    assert (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)) == moment


def test_series_counts_from_one_to_n(db):
    with db.read() as conn:
        sql = dialect_of(conn).series(5, "SELECT sum(i), count(*) FROM {S}")
        assert tuple(conn.exec_driver_sql(sql).one()) == (15, 5)


@pytest.mark.postgres
def test_postgresql_lock_holds_a_row_that_claim_then_skips(pg_url):
    """``lock`` keeps the row for its transaction: another worker's ``claim`` passes over it and takes the
    next one, without waiting."""
    db = Database(pg_url)
    try:
        with db.write() as conn:
            conn.execute(_cursor(conn, "held", T0))
            conn.execute(_cursor(conn, "free", T0))
        names = select(scenario_cursors.c.name).order_by(scenario_cursors.c.name)
        with db.write() as first:
            ops = dialect_of(first)
            assert first.execute(ops.lock(names.where(scenario_cursors.c.name == "held"))).scalar() == "held"
            with db.write() as second:
                assert second.execute(ops.claim(names)).scalars().all() == ["free"]
    finally:
        db.engine.dispose()


def test_sqlite_takes_no_row_locks(sqlite_url):
    """SQLite's write transaction holds the whole database: ``lock`` and ``claim`` leave a statement as it is,
    and a key checked at the start of the transaction stays true (``locks_rows`` False)."""
    db = Database(sqlite_url)
    try:
        ops = db.dialect_ops
        stmt = select(scenario_cursors.c.name)
        assert (ops.lock(stmt), ops.claim(stmt), ops.locks_rows, ops.group_commit) == (stmt, stmt, False, False)
    finally:
        db.engine.dispose()
