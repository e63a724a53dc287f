"""Connections and transactions: one ``Database`` per process over SQLite (embedded default) or PostgreSQL
(psycopg 3), plus the Alembic entry point ``upgrade(url)``.

Write transactions take the member's lock the way each backend can: on PostgreSQL the service locks rows
(``SELECT ... FOR UPDATE``); SQLite has one writer, so a write transaction starts with ``BEGIN IMMEDIATE``
(the write lock up front, waiting up to the busy timeout) and reads stay ``BEGIN DEFERRED``. Every storage
failure (connection refused, lock timeout, a dropped connection) leaves this module as ``Unavailable``
after the transaction was rolled back, so nothing is ever half-written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import threading
import time

import orjson
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import (ArgumentError, DBAPIError, DisconnectionError, InterfaceError, NoSuchModuleError,
                            OperationalError)
from sqlalchemy.pool import NullPool

from .errors import InvalidArgument, Unavailable

__all__ = ["Database", "upgrade", "default_url", "alembic_config", "MIGRATIONS_DIR", "driver_errors", "dumps",
           "loads"]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = pathlib.Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 10.0
BAD_URL = "expected sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB"
RETRIES = 3                       # deadlocks / serialization failures on PostgreSQL are retried
IDLE_PING_S = 2.0                 # a pooled PostgreSQL connection idle longer than this is pinged at checkout


def dumps(value) -> str:
    """JSON text of a stored document (answers, responses, event payloads): orjson, compact, keys as given."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


loads = orjson.loads


def default_url() -> str:
    """``sqlite:///<data dir>/loyalty.db`` with the data dir ``$LOYALTY_DATA_DIR`` or ``./.loyalty``."""
    data_dir = pathlib.Path(os.environ.get("LOYALTY_DATA_DIR") or ".loyalty")
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data_dir.resolve() / 'loyalty.db'}"


def _is_retryable(exc: DBAPIError) -> bool:
    """A PostgreSQL deadlock (40P01) or serialization failure (40001): the transaction may simply run again."""
    code = getattr(exc.orig, "sqlstate", None)
    return code in ("40P01", "40001")


def create_sql_engine(url: str, *, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False, json_serializer=dumps,
            json_deserializer=loads)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would otherwise delay it).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if ":memory:" not in url and url != "sqlite://":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False,
                           pool_recycle=1800, json_serializer=dumps, json_deserializer=loads)

    # Pessimistic disconnect handling without a round trip per transaction: a connection that has been idle
    # in the pool for more than IDLE_PING_S is pinged at checkout (a dead one is replaced transparently); a
    # busy pool hands out connections it used a moment ago. A connection lost mid-request still surfaces as
    # Unavailable, and SQLAlchemy then invalidates the whole pool.
    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy):
        since = record.info.get("idle_since")
        if since is not None and time.monotonic() - since > IDLE_PING_S:
            try:
                ok = engine.dialect.do_ping(dbapi_conn)
            except Exception:  # noqa: BLE001 - any failure means: use another connection
                ok = False
            if not ok:
                raise DisconnectionError("pooled connection is dead")

    return engine


@contextlib.contextmanager
def driver_errors(conn: Connection):
    """Around raw driver calls (``conn.connection.driver_connection``, the PostgreSQL fast paths): the
    driver's own exceptions become SQLAlchemy's, so that ``Database.run_write`` treats them as it treats any
    other (deadlock: retried; lost connection: ``Unavailable`` and the connection discarded; unique
    violation: ``IntegrityError``)."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        driver = conn.connection.driver_connection
        broken = driver is None or driver.closed or driver.broken
        wrapped = DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=broken)
        if broken:
            conn.invalidate(wrapped)
        raise wrapped from exc


class Database:
    """A pool of connections and the two kinds of transaction the service uses.

    ``with db.write() as conn:`` is one write transaction (SQLite: ``BEGIN IMMEDIATE``), committed on exit,
    rolled back on any exception; ``with db.read() as conn:`` a read-only one. Storage failures become
    ``Unavailable``; domain errors raised inside pass through unchanged (after the rollback).
    """

    def __init__(self, url: str, *, pool_size: int = 10):
        self.url = url
        try:
            self.engine = create_sql_engine(url, pool_size=pool_size)
        except (ArgumentError, NoSuchModuleError):
            raise InvalidArgument("database_url", BAD_URL) from None
        self.dialect = self.engine.dialect.name
        self.is_sqlite = self.dialect == "sqlite"
        self._sqlite_writer = threading.Lock()

    @contextlib.contextmanager
    def write(self):
        with self._storage_errors(), self._write_raw() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self):
        with self._storage_errors(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def _storage_errors(self):
        """A lost or refused connection (or a lock timeout) leaves as ``Unavailable``."""
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            raise self._unavailable(exc) from None
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._unavailable(exc) from None
            raise

    def run_write(self, fn, *args, **kwargs):
        """``fn(conn, *args, **kwargs)`` in a write transaction, run again (up to ``RETRIES`` times) when
        PostgreSQL reports a deadlock or a serialization failure."""
        for attempt in range(RETRIES):
            try:
                with self._write_raw() as conn:
                    return fn(conn, *args, **kwargs)
            except OperationalError as exc:
                if _is_retryable(exc) and attempt + 1 < RETRIES:
                    time.sleep(0.01 * (attempt + 1))
                    continue
                raise self._unavailable(exc) from None
            except InterfaceError as exc:
                raise self._unavailable(exc) from None
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise self._unavailable(exc) from None
                raise
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _write_raw(self):
        if not self.is_sqlite:
            with self.engine.connect() as conn, conn.begin():
                yield conn
            return
        # SQLite has one writer. Threads of this process queue on a lock instead of polling SQLite's busy
        # handler, whose growing sleeps let a thread starve past the timeout under contention; the busy
        # timeout still arbitrates between processes.
        if not self._sqlite_writer.acquire(timeout=SQLITE_BUSY_TIMEOUT_S):
            raise OperationalError("BEGIN IMMEDIATE", None, Exception("database is locked (writer queue)"))
        try:
            with self.engine.connect() as conn:
                conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
        finally:
            self._sqlite_writer.release()

    def _unavailable(self, exc: Exception) -> Unavailable:
        # The client gets a plain sentence; the driver's text goes to the log only, on one line (the
        # statement and its parameters are left out).
        text = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            log.error("storage schema is missing (%s): run `loyalty db upgrade`", text)
            return Unavailable("the database schema is not at head: run `loyalty db upgrade`; nothing was written")
        log.warning("storage unavailable: %s", text)
        reason = "storage is busy (lock timeout)" if "locked" in text else "storage is unavailable"
        return Unavailable(f"{reason}; nothing was written, retry later")

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - health must never raise
            return False

    def dispose(self) -> None:
        self.engine.dispose()


# ---- migrations ---------------------------------------------------------------------------------------------

def alembic_config(database_url: str, connection: Connection | None = None):
    """The Alembic configuration, built in code: no alembic.ini is needed at runtime."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Bring the schema at ``database_url`` (default: ``default_url()``) to ``revision``."""
    from alembic import command

    url = database_url or default_url()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url if not url.startswith("postgresql://") else
                               "postgresql+psycopg://" + url[len("postgresql://"):], poolclass=NullPool)
    except (ArgumentError, NoSuchModuleError):
        raise InvalidArgument("database_url", BAD_URL) from None
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(url, conn), revision)
    except (OperationalError, InterfaceError) as exc:
        log.warning("upgrade failed: %s", exc)
        raise Unavailable(f"cannot reach the database to upgrade it: {type(exc.orig).__name__}") from None
    finally:
        engine.dispose()
