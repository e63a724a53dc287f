"""Storage helpers: a simulated clock, the demo program, and fresh PostgreSQL databases.

A fresh PostgreSQL database is either EMPTY (``CREATE DATABASE loyalty_test_<random>``; only the migration tests
want one) or MIGRATED: a copy (``CREATE DATABASE ... TEMPLATE``) of one template database,
``loyalty_tpl_<random>``, that the first such request of the test run creates and migrates with
``db.upgrade``. Copying a migrated database costs a fraction of running the migrations, and ``db.upgrade`` on
the copy is a no-op upgrade (its ``alembic_version`` is at head). PostgreSQL copies a template only while no
other session is connected to it, so the template is closed to connections once migrated; its random name
lets several pytest processes share one server. The session fixture in ``tests/conftest.py`` drops it.

SQLite gets the same treatment: ``sqlite_database(path)`` copies a database file migrated once per run.

The server is ``postgresql+psycopg://postgres@127.0.0.1:5432/test`` (``LOYALTY_TEST_PG_URL`` or
``LOYALTY_TEST_PG`` overrides it).
When it is unreachable a test skips with the reason, except under ``CI=true`` where it fails."""
from __future__ import annotations

import datetime as dt
import os
import pathlib
import shutil
import tempfile
import threading
import uuid

import pytest

from loyalty.server import db

# LOYALTY_TEST_PG (a libpq URL) was the API tests' name for the same server; either is honoured.
PG_URL = (os.environ.get("LOYALTY_TEST_PG_URL")
          or os.environ.get("LOYALTY_TEST_PG", "").replace("postgresql://", "postgresql+psycopg://", 1)
          or "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
DEMO_PROGRAM = (pathlib.Path(db.__file__).parent / "demo" / "program.yaml").read_text(encoding="utf-8")


REDIS_URL = os.environ.get("LOYALTY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def require_redis() -> str:
    """``REDIS_URL`` once the test Redis answers; skips with the reason when it does not (fails under CI)."""
    import redis
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is unreachable: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable: {exc}")
    return REDIS_URL


class Clock:
    """A simulated UTC clock; ``advance(days=14)`` moves it."""

    def __init__(self, start: dt.datetime = dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.timezone.utc)):
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        with self._lock:
            return self.now

    def advance(self, **delta) -> dt.datetime:
        with self._lock:
            self.now = self.now + dt.timedelta(**delta)
            return self.now


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def pg_admin(url: str = PG_URL):
    """An autocommit connection to the test PostgreSQL; skips (fails under ``CI=true``) when it is down."""
    import psycopg

    try:
        return psycopg.connect(_libpq(url), autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL at {url} is unreachable: {str(exc).strip().splitlines()[0]}"
        if IN_CI:
            pytest.fail(reason + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)


class _Template:
    """The migrated template database of this test run (made on first use, dropped by ``drop_template``)."""

    name: str | None = None
    lock = threading.Lock()


def _ensure_template(admin) -> str:
    with _Template.lock:
        if _Template.name is None:
            name = f"loyalty_tpl_{uuid.uuid4().hex[:12]}"
            admin.execute(f'CREATE DATABASE "{name}"')
            try:
                db.upgrade(f"{PG_URL.rsplit('/', 1)[0]}/{name}")
                # No session may stay on a template while it is copied; close it to new ones for good.
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            except BaseException:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                raise
            _Template.name = name
        return _Template.name


def create_database(*, migrated: bool = True) -> str:
    """A new database ``loyalty_test_<random>`` (migrated: a copy of the template; else empty); its URL."""
    name = f"loyalty_test_{uuid.uuid4().hex[:12]}"
    with pg_admin() as admin:
        if migrated:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_ensure_template(admin)}"')
        else:
            admin.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_URL.rsplit('/', 1)[0]}/{name}"


def drop_database(url: str) -> None:
    with pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def drop_template() -> None:
    """Drop the template databases, if this run made them."""
    with _SqliteTemplate.lock:
        path, _SqliteTemplate.path = _SqliteTemplate.path, None
    if path is not None:
        shutil.rmtree(path.parent, ignore_errors=True)
    with _Template.lock:
        name, _Template.name = _Template.name, None
    if name is not None:
        with pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _SqliteTemplate:
    """The migrated SQLite file of this test run (made on first use, removed by ``drop_template``)."""

    path: pathlib.Path | None = None
    lock = threading.Lock()


def sqlite_database(path: pathlib.Path) -> str:
    """A migrated SQLite database at ``path`` (a copy of the run's migrated file); its URL."""
    with _SqliteTemplate.lock:
        if _SqliteTemplate.path is None:
            template = pathlib.Path(tempfile.mkdtemp(prefix="loyalty_tpl_")) / "loyalty.db"
            db.upgrade(f"sqlite:///{template}")
            # upgrade closes its connections; a journal left beside the file would mean a half-written copy
            assert [f.name for f in template.parent.iterdir()] == ["loyalty.db"], list(template.parent.iterdir())
            _SqliteTemplate.path = template
        shutil.copyfile(_SqliteTemplate.path, path)
    return f"sqlite:///{path}"
