"""What differs between SQLite and PostgreSQL, behind one interface chosen once per database.

Each dialect is one class offering the operations the modules need (as Prefect's
``server/database/query_components.py`` injects its dialect-specific SQL): the code that writes reads like the
rule it follows (``lock(stmt)``, ``insert_ignore(table)``) and nobody asks which database it talks to.
``dialect_of(conn)`` picks the instance by the engine's dialect name, in this one place; ``Database`` keeps
it as ``db.dialect_ops``.

The decisions the two classes encode:

- **Locking.** A SQLite write transaction is ``BEGIN IMMEDIATE``: it holds the whole database, so rows need no
  lock and a key checked at the start of the transaction stays true to the end (``locks_rows`` False).
  PostgreSQL locks rows (``FOR UPDATE``; workers claim with ``SKIP LOCKED``), so a key checked before the lock
  is checked again once it is held.
- **Set-based writes.** Only PostgreSQL takes a group-commit batch of confirms in one transaction and
  data-modifying ``WITH`` queries (``writes_in_with``); planner settings (``work_mem``, ``ANALYZE``) exist
  only there.
- **Functions.** Dates and timestamps: ``to_char`` / intervals on PostgreSQL, ``strftime`` on SQLite;
  ``GREATEST`` / ``LEAST`` are SQLite's two-argument ``MAX`` / ``MIN``.
- **Raw SQL text** for the bulk demo population (``segments/demo_seed.py``): number series, timestamps and
  dates computed in SQL, casts.
"""
from __future__ import annotations

import datetime as dt
import time

from sqlalchemy import func, literal
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

__all__ = ["DialectOps", "SQLiteOps", "PostgreSQLOps", "dialect_of", "insert_ignore"]


class DialectOps:
    """The operations whose SQL depends on the database (the methods below are the whole surface)."""

    name: str
    #: rows are locked one by one (PostgreSQL), not the whole database by the write transaction (SQLite)
    locks_rows: bool
    #: confirms of a group-commit batch share one transaction, written set-based
    group_commit: bool
    #: ``WITH ... INSERT ... RETURNING`` feeding further statements of one query
    writes_in_with: bool
    #: the SQL names of the larger / smaller of two values
    greatest: str
    least: str
    #: the SQL literal of false
    false: str
    _insert = None          # the dialect's ``insert`` construct (with ``on_conflict_do_nothing``)

    # ---- statements ---------------------------------------------------------------------------------------

    def insert(self, table):
        """``INSERT`` in the dialect's own construct (it offers ``ON CONFLICT``)."""
        return self._insert(table)

    def insert_ignore(self, table):
        """``INSERT ... ON CONFLICT DO NOTHING`` (add ``.returning(...)`` to learn which rows it wrote:
        ``rowcount`` is -1 on PostgreSQL through SQLAlchemy)."""
        return self._insert(table).on_conflict_do_nothing()

    def lock(self, stmt):
        """``stmt`` locking the rows it selects until the transaction ends."""
        return stmt

    def claim(self, stmt):
        """``stmt`` taking rows no other worker holds (several workers take disjoint rows; nobody waits)."""
        return stmt

    def lock_rows(self, conn: Connection, stmt) -> None:
        """Lock the rows ``stmt`` selects, when rows are locked at all."""

    # ---- session settings ---------------------------------------------------------------------------------

    def tune(self, conn: Connection, *, work_mem: str) -> None:
        """More memory for the sorts and hashes of the rest of this transaction (a large set-based statement:
        hashed semi / anti joins over a million members need more than PostgreSQL's default 4MB)."""

    def analyze(self, conn: Connection, table: str) -> None:
        """Fresh statistics for ``table``, filled a moment ago (the next join uses its index)."""

    # ---- functions ----------------------------------------------------------------------------------------

    def month_day(self, column):
        """``MM-DD`` of a date column."""
        raise NotImplementedError

    def plus_seconds(self, column, seconds: int):
        """A timestamp column ``seconds`` later, comparable with the column's own values."""
        raise NotImplementedError

    # ---- raw SQL text for bulk loads ----------------------------------------------------------------------

    def series(self, n: int, body: str) -> str:
        """``body``, which selects FROM ``{S}``, over the numbers 1..n in a column ``i``."""
        raise NotImplementedError

    def timestamp(self, day: dt.date, days: str, secs: str) -> str:
        """``day`` at midnight UTC, ``days`` earlier, ``secs`` later: a timestamp the models read back as UTC."""
        raise NotImplementedError

    def date_plus(self, base: str, days: str) -> str:
        """The date ``base`` (ISO text) plus ``days``."""
        raise NotImplementedError

    def date_of(self, day: dt.date, days: str, secs: str) -> str:
        """The UTC date of ``timestamp(day, days, secs)``, as a date column reads it back."""
        raise NotImplementedError

    def iso_utc(self, day: dt.date, days: str, secs: str) -> str:
        """``timestamp(day, days, secs)`` as ISO 8601 text with ``+00:00`` (what a POS sends)."""
        raise NotImplementedError

    def zero_pad(self, expr: str, width: int) -> str:
        """The integer ``expr`` as text, zero-padded to ``width``."""
        raise NotImplementedError

    def as_json(self, expr: str) -> str:
        """``expr`` (JSON text) typed as JSON."""
        return expr

    def as_text(self, expr: str) -> str:
        """``expr`` cast to text."""
        return f"CAST({expr} AS TEXT)"

    def start_bulk_load(self, conn: Connection) -> None:
        """This transaction loads many rows: commit without waiting for the disk, foreign-key triggers off
        where allowed (the rows are made consistent by construction)."""

    def after_bulk_load(self, engine: Engine, sequences: dict[str, str], tables: tuple[str, ...]) -> float | None:
        """After rows were inserted with explicit ids: the id sequences (``sequences``: table -> id column)
        continue after them; ``tables`` get their statistics and visibility map now, so the first query does
        not pay for it. Returns the seconds that upkeep took (None: the database needs none)."""
        return None


class SQLiteOps(DialectOps):
    name = "sqlite"
    locks_rows = False
    group_commit = False
    writes_in_with = False
    greatest, least = "MAX", "MIN"
    false = "0"
    _insert = staticmethod(sqlite.insert)

    def month_day(self, column):
        return func.strftime("%m-%d", column)

    def plus_seconds(self, column, seconds: int):
        # timestamps are stored as text ``YYYY-MM-DD HH:MM:SS.ffffff``; strftime keeps that shape
        return func.strftime("%Y-%m-%d %H:%M:%f", column, f"+{seconds} seconds")

    def series(self, n: int, body: str) -> str:
        return f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) " + \
            body.replace("{S}", "s")

    @staticmethod
    def _moment(day: dt.date, days: str, secs: str) -> str:
        """The arguments of SQLite's date functions for ``day`` at midnight, ``days`` earlier, ``secs`` later."""
        # a modifier is "N days" with N signed: prefixing a sign by text would turn -200 into "--200" (no date)
        return f"'{day:%Y-%m-%d}', (-({days})) || ' days', ({secs}) || ' seconds'"

    def timestamp(self, day: dt.date, days: str, secs: str) -> str:
        return f"(strftime('%Y-%m-%d %H:%M:%S', {self._moment(day, days, secs)}) || '.000000')"

    def date_plus(self, base: str, days: str) -> str:
        return f"date('{base}', ({days}) || ' days')"

    def date_of(self, day: dt.date, days: str, secs: str) -> str:
        return f"date({self._moment(day, days, secs)})"

    def iso_utc(self, day: dt.date, days: str, secs: str) -> str:
        return f"strftime('%Y-%m-%dT%H:%M:%S+00:00', {self._moment(day, days, secs)})"

    def zero_pad(self, expr: str, width: int) -> str:
        return f"printf('%0{width}d', {expr})"


class PostgreSQLOps(DialectOps):
    name = "postgresql"
    locks_rows = True
    group_commit = True
    writes_in_with = True
    greatest, least = "GREATEST", "LEAST"
    false = "false"
    _insert = staticmethod(postgresql.insert)

    def lock(self, stmt):
        return stmt.with_for_update()

    def claim(self, stmt):
        return stmt.with_for_update(skip_locked=True)

    def lock_rows(self, conn: Connection, stmt) -> None:
        conn.execute(stmt.with_for_update())

    def tune(self, conn: Connection, *, work_mem: str) -> None:
        conn.exec_driver_sql(f"SET LOCAL work_mem = '{work_mem}'")

    def start_bulk_load(self, conn: Connection) -> None:
        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        self.tune(conn, work_mem="256MB")
        try:
            with conn.begin_nested():
                conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        except Exception:  # noqa: BLE001 - not a superuser: FK triggers stay on, only slower
            pass

    def analyze(self, conn: Connection, table: str) -> None:
        conn.exec_driver_sql(f"ANALYZE {table}")

    def month_day(self, column):
        return func.to_char(column, "MM-DD")

    def plus_seconds(self, column, seconds: int):
        return column + literal(dt.timedelta(seconds=seconds))

    def series(self, n: int, body: str) -> str:
        return body.replace("{S}", f"generate_series(1::bigint, {n}::bigint) AS s(i)")

    def timestamp(self, day: dt.date, days: str, secs: str) -> str:
        return f"(timestamptz '{day:%Y-%m-%d} 00:00:00+00' - ({days}) * interval '1 day' " \
               f"+ ({secs}) * interval '1 second')"

    def date_plus(self, base: str, days: str) -> str:
        return f"(date '{base}' + ({days})::int)"

    def date_of(self, day: dt.date, days: str, secs: str) -> str:
        return f"({self.timestamp(day, days, secs)})::date"

    def iso_utc(self, day: dt.date, days: str, secs: str) -> str:
        return f"to_char(({self.timestamp(day, days, secs)}) AT TIME ZONE 'UTC', " \
               f"'YYYY-MM-DD\"T\"HH24:MI:SS\"+00:00\"')"

    def zero_pad(self, expr: str, width: int) -> str:
        return f"lpad(({expr})::text, {width}, '0')"

    def as_json(self, expr: str) -> str:
        return f"({expr})::json"

    def as_text(self, expr: str) -> str:
        return f"({expr})::text"

    def after_bulk_load(self, engine: Engine, sequences: dict[str, str], tables: tuple[str, ...]) -> float | None:
        with engine.begin() as conn:
            for table, col in sequences.items():
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'), "
                                     f"(SELECT max({col}) FROM {table}))")
        t0 = time.perf_counter()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in tables:
                conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
        return time.perf_counter() - t0


_BY_NAME: dict[str, DialectOps] = {ops.name: ops for ops in (SQLiteOps(), PostgreSQLOps())}


def dialect_of(bind: Connection | Engine) -> DialectOps:
    """The operations of the database behind ``bind`` (a connection or an engine)."""
    return _BY_NAME[bind.dialect.name]


def insert_ignore(conn: Connection, table):
    """``INSERT ... ON CONFLICT DO NOTHING`` on ``conn``'s database (``DialectOps.insert_ignore``)."""
    return dialect_of(conn).insert_ignore(table)
