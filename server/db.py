"""Connections and transactions: one ``Database`` per process over SQLite (embedded default) or PostgreSQL
(psycopg 3), plus the Alembic entry point ``upgrade(url)``.

Write transactions take the member's lock the way each backend can: on PostgreSQL the service locks rows
(``SELECT ... FOR UPDATE``); SQLite has one writer, so a write transaction starts with ``BEGIN IMMEDIATE``
(the write lock up front, waiting up to the busy timeout) and reads stay ``BEGIN DEFERRED``.

What a storage failure means for the caller is said exactly (``Unavailable.details["outcome"]``):
- the connection was refused or lost before COMMIT was sent (or a lock timed out): the transaction was rolled
  back, ``not_written``, "retry later";
- the connection was lost while COMMIT was on its way (``committing``): the change may or may not have been
  stored. A write idempotent by a key (``run_write(..., idempotent=True)``) finds out by running again within
  the call's deadline, as the client's own retry with the same key would (it replays what was stored, or
  writes it now); otherwise, or when storage does not come back in time, ``unknown``: "a retry with the same
  key is safe";
- storage refused the statement itself (a server defect, not a passing failure): ``ServiceError`` INTERNAL,
  never "retry later".

Storage calls are bounded by the gRPC call's deadline (``deadline``: the edge sets it per call): a PostgreSQL
connection still busy when it passes is shut down under the driver (a hung server cannot hold a call, or
commit it after the client gave up), and the call ends ``Unavailable``.
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
from sqlalchemy.exc import (ArgumentError, DBAPIError, DisconnectionError, InterfaceError, InternalError,
                            NoSuchModuleError, NotSupportedError, OperationalError, ProgrammingError)
from sqlalchemy.pool import NullPool

from .dialects import dialect_of
from .errors import InvalidArgument, ServiceError, Unavailable

__all__ = ["Database", "upgrade", "default_url", "alembic_config", "MIGRATIONS_DIR", "driver_errors", "dumps",
           "loads", "deadline", "current_deadline", "committing", "CommitUncertain"]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = pathlib.Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 10.0
BAD_URL = "expected sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB"
RETRIES = 3                       # deadlocks / serialization failures on PostgreSQL are retried
IDLE_PING_S = 2.0                 # a pooled PostgreSQL connection idle longer than this is pinged at checkout
CONNECT_TIMEOUT_S = 3             # libpq's connect_timeout: a server that does not answer the handshake
DEADLINE_MARGIN_S = 0.05          # storage gives up this long before the call's deadline, to answer in time
UNKNOWN_RECHECK_S = 2.0           # how long a write without a deadline looks for its outcome after a lost COMMIT

NOT_WRITTEN = "not_written"
UNKNOWN = "unknown"


def dumps(value) -> str:
    """JSON text of a stored document (answers, responses, event payloads): orjson, compact, keys as given."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


loads = orjson.loads


def default_url() -> str:
    """``sqlite:///<data dir>/loyalty.db`` with the data dir ``$LOYALTY_DATA_DIR`` or ``./.loyalty``."""
    data_dir = pathlib.Path(os.environ.get("LOYALTY_DATA_DIR") or ".loyalty")
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data_dir.resolve() / 'loyalty.db'}"


def _transient(exc: BaseException, text: str) -> bool:
    """Whether a storage failure may pass (a connection, a lock, resources, an operator's restart), as
    opposed to a statement storage refuses every time (syntax, a missing column: a defect)."""
    if isinstance(exc, InterfaceError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if code is not None:        # PostgreSQL: connection, resources, operator intervention, system, lock errors
        return code[:2] in ("08", "40", "53", "57", "58", "XX") or code == "55P03"
    if not isinstance(exc, OperationalError):
        return False
    low = text.lower()          # SQLite (and a driver error without a code): what it says
    return not any(word in low for word in ("syntax error", "no such column", "no such function",
                                            "has no column", "ambiguous column", "misuse"))


def _is_defect(exc: DBAPIError) -> bool:
    """A statement storage refuses whatever the data (syntax, a missing column or function: ProgrammingError,
    InternalError, NotSupportedError). Unique violations and bad values (IntegrityError, DataError) are the
    callers' to decide: they replay, or name the client's field."""
    return isinstance(exc, (ProgrammingError, InternalError, NotSupportedError))


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
                           pool_recycle=1800, json_serializer=dumps, json_deserializer=loads,
                           connect_args={"connect_timeout": CONNECT_TIMEOUT_S})

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
            at = current_deadline()
            token = _watchdog.arm(at - DEADLINE_MARGIN_S, dbapi_conn.pgconn.socket) if at is not None else None
            try:
                ok = engine.dialect.do_ping(dbapi_conn)
            except Exception:  # noqa: BLE001 - any failure means: use another connection
                ok = False
            finally:
                if token is not None and _watchdog.disarm(token):
                    ok = False      # the call's deadline came first (a hung server)
            if not ok:
                raise DisconnectionError("pooled connection is dead")

    return engine


# ---- deadlines ----------------------------------------------------------------------------------------------

_local = threading.local()


@contextlib.contextmanager
def deadline(at: float | None):
    """Storage calls of this thread inside the block end by ``at`` (``time.monotonic()``; None: no bound)."""
    before = getattr(_local, "deadline", None)
    _local.deadline = at
    try:
        yield
    finally:
        _local.deadline = before


def current_deadline() -> float | None:
    return getattr(_local, "deadline", None)


class _Watchdog:
    """One thread that shuts down the socket of a PostgreSQL connection still in use when its time is up: the
    driver's blocked read returns, the connection is broken and discarded, the transaction is rolled back
    by the server (unless COMMIT had already reached it: then the outcome is unknown, see ``committing``)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, int]] = {}
        self._next = 0
        self._wake_at = 0.0         # when the thread wakes next (a later deadline need not wake it)
        self._thread: threading.Thread | None = None

    def arm(self, at: float, fd: int) -> int:
        with self._cond:
            self._next += 1
            token = self._next
            self._armed[token] = (at, fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="storage-watchdog", daemon=True)
                self._thread.start()
            elif at < self._wake_at:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> bool:
        """Stop watching; True when the deadline fired (the connection is shut down: discard it). Once this
        returns, the watchdog never touches that socket again (it shuts sockets down under the same lock)."""
        with self._cond:
            return self._armed.pop(token, None) is None

    def _run(self) -> None:
        import socket

        while True:
            with self._cond:
                now = time.monotonic()
                due = [(t, fd) for t, (at, fd) in self._armed.items() if at <= now]
                if not due:
                    self._wake_at = min((at for at, _ in self._armed.values()), default=now + 60)
                    self._cond.wait(max(self._wake_at - now, 0.005))
                    continue
                # under the lock: the owner cannot have disarmed and reused the socket meanwhile
                for token, fd in due:
                    del self._armed[token]
                    log.warning("storage call still running at its deadline: its connection is shut down")
                    try:
                        sock = socket.socket(fileno=os.dup(fd))
                    except OSError:
                        continue
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()


_watchdog = _Watchdog()


class CommitUncertain(Exception):
    """The connection was lost while COMMIT was on its way: the transaction may have been stored."""


def _connection_lost(exc: BaseException) -> bool:
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@contextlib.contextmanager
def committing():
    """Around the statements that send COMMIT (SQLAlchemy's commit, or a pipeline ending in ``commit()`` with
    ``driver_errors`` inside this block, so that the driver's errors arrive as SQLAlchemy's): losing the
    connection there leaves the outcome unknown (``CommitUncertain``), not "nothing was written". A statement
    that storage refused (a unique violation, a deadlock) still failed before COMMIT: it passes."""
    try:
        yield
    except DBAPIError as exc:
        if _connection_lost(exc) and not _is_retryable(exc):
            raise CommitUncertain() from exc
        raise


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
        self.dialect_ops = dialect_of(self.engine)       # what differs between the databases, chosen here
        self.is_sqlite = self.dialect == "sqlite"
        self._sqlite_writer = threading.Lock()

    @contextlib.contextmanager
    def write(self):
        with self._storage_errors(), self._write_raw() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self):
        with self._storage_errors(), self.engine.connect() as conn, self._watched(conn), conn.begin():
            yield conn

    @contextlib.contextmanager
    def _storage_errors(self):
        """A lost or refused connection (or a lock timeout) leaves as ``Unavailable``; a lost COMMIT as
        ``Unavailable`` with the outcome unknown; a statement storage refuses as INTERNAL."""
        try:
            yield
        except CommitUncertain as exc:
            raise self._uncertain(exc.__cause__) from None
        except (OperationalError, InterfaceError) as exc:
            raise self._unavailable(exc) from None
        except DBAPIError as exc:
            if exc.connection_invalidated or _is_defect(exc):
                raise self._unavailable(exc) from None
            raise

    def run_write(self, fn, *args, idempotent: bool = False, **kwargs):
        """``fn(conn, *args, **kwargs)`` in a write transaction, run again (up to ``RETRIES`` times) when
        PostgreSQL reports a deadlock or a serialization failure.

        ``idempotent=True``: ``fn`` is keyed (running it again after it committed replays what it stored
        instead of writing twice), so when the connection is lost while COMMIT is on its way, it is run again
        until storage answers, within the call's deadline (``deadline``; without one, ``UNKNOWN_RECHECK_S``):
        the caller gets the real outcome. Otherwise, or when storage stays away, ``Unavailable`` saying the
        outcome is unknown."""
        attempt = 0
        uncertain: BaseException | None = None
        recheck_until: float | None = None
        while True:
            try:
                with self._write_raw() as conn:
                    return fn(conn, *args, **kwargs)
            except CommitUncertain as exc:
                if not idempotent:
                    raise self._uncertain(exc.__cause__) from None
                uncertain = uncertain or exc.__cause__
                log.warning("storage connection lost while committing %s: running it again to learn its outcome",
                            getattr(fn, "__name__", "a write"))
            except OperationalError as exc:
                if _is_retryable(exc) and attempt + 1 < RETRIES:
                    attempt += 1
                    time.sleep(0.01 * attempt)
                    continue
                if uncertain is None:
                    raise self._unavailable(exc) from None
            except InterfaceError as exc:
                if uncertain is None:
                    raise self._unavailable(exc) from None
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    if _is_defect(exc):
                        raise self._unavailable(exc) from None
                    raise
                if uncertain is None:
                    raise self._unavailable(exc) from None
            except Unavailable:
                if uncertain is None:       # e.g. the deadline passed before storage was reached
                    raise
                # a run after a lost COMMIT that did not reach storage: still unknown, never "not written"
            # the outcome of a lost COMMIT is still unknown: look again while the call has time
            if recheck_until is None:
                recheck_until = current_deadline() or time.monotonic() + UNKNOWN_RECHECK_S
            if time.monotonic() + 0.1 + DEADLINE_MARGIN_S >= recheck_until:
                raise self._uncertain(uncertain) from None
            time.sleep(0.1)

    @contextlib.contextmanager
    def _watched(self, conn: Connection):
        """Bound the storage work on ``conn`` by this thread's deadline (PostgreSQL: the watchdog)."""
        at = current_deadline()
        if at is None or self.is_sqlite:
            yield
            return
        at -= DEADLINE_MARGIN_S
        if at <= time.monotonic():
            raise Unavailable("the call's deadline passed before storage was reached; nothing was written",
                              outcome=NOT_WRITTEN)
        driver = conn.connection.driver_connection
        token = _watchdog.arm(at, driver.pgconn.socket)
        try:
            yield
        finally:
            if _watchdog.disarm(token):         # shut down at the deadline: never back to the pool
                with contextlib.suppress(Exception):
                    conn.invalidate()

    @contextlib.contextmanager
    def _write_raw(self):
        if not self.is_sqlite:
            with self.engine.connect() as conn, self._watched(conn):
                trans = conn.begin()
                try:
                    yield conn
                except BaseException:
                    with contextlib.suppress(Exception):
                        trans.rollback()
                    raise
                with committing():
                    trans.commit()
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

    @staticmethod
    def _driver_text(exc: BaseException) -> str:
        text = str(getattr(exc, "orig", None) or exc)
        return text.splitlines()[0] if text else type(exc).__name__

    def _unavailable(self, exc: Exception) -> ServiceError:
        # The client gets a plain sentence; the driver's text goes to the log only, on one line (the
        # statement and its parameters are left out).
        text = self._driver_text(exc)
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            log.error("storage schema is missing (%s): run `loyalty db upgrade`", text)
            return Unavailable("the database schema is not at head: run `loyalty db upgrade`; nothing was written",
                               outcome=NOT_WRITTEN)
        if not _transient(exc, text):
            log.error("storage refused a statement (a defect, not a passing failure): %s", text)
            return ServiceError("storage refused the statement: a server defect that retrying will not fix "
                                "(logged on the server); nothing was written", outcome=NOT_WRITTEN)
        log.warning("storage unavailable: %s", text)
        reason = "storage is busy (lock timeout)" if "locked" in text else "storage is unavailable"
        return Unavailable(f"{reason}; nothing was written, retry later", outcome=NOT_WRITTEN)

    def _uncertain(self, exc: BaseException | None) -> Unavailable:
        log.warning("storage connection lost while committing; outcome unknown: %s",
                    self._driver_text(exc) if exc is not None else "-")
        return Unavailable("storage connection was lost while committing: the outcome is unknown; a retry with "
                           "the same key is safe (it returns the stored answer if the change was written)",
                           outcome=UNKNOWN)

    def ping(self, timeout: float | None = None) -> bool:
        """Whether storage answers ``SELECT 1`` (within ``timeout`` seconds on PostgreSQL); never raises."""
        try:
            with deadline(time.monotonic() + timeout if timeout else current_deadline()):
                with self.engine.connect() as conn, self._watched(conn):
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
