"""Fixtures of the storage and processing tests (imported by ``test_processing_*``, ``test_ledger*``,
``test_migrations``): a migrated SQLite database per test, a fresh PostgreSQL database per test (``CREATE
DATABASE loyalty_test_<random>``, dropped afterwards) and a service over either, with a simulated clock.

PostgreSQL tests are marked ``postgres``; when the server is unreachable they skip with the reason, except
under ``CI=true`` where they fail. The default server is ``postgresql+psycopg://postgres@127.0.0.1:5432/test``
(``LOYALTY_TEST_PG_URL`` overrides it)."""
from __future__ import annotations

import datetime as dt
import os
import pathlib
import threading
import uuid

import pytest

from loyalty.server import db

PG_URL = os.environ.get("LOYALTY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
DEMO_PROGRAM = (pathlib.Path(db.__file__).parent / "demo" / "program.yaml").read_text(encoding="utf-8")


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


def _pg_admin():
    import psycopg

    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL at {PG_URL} is unreachable: {str(exc).strip().splitlines()[0]}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def pg_url():
    admin = _pg_admin()
    name = f"loyalty_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'loyalty.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """Every storage test runs on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'loyalty.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def service(database_url, clock):
    """A service over a migrated database with the demo program published (no demo members)."""
    from loyalty.server.processing import ProcessingService
    from loyalty.v1 import admin_pb2

    db.upgrade(database_url)
    svc = ProcessingService.open(database_url, clock=clock)
    svc.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM, comment="tests"))
    try:
        yield svc
    finally:
        svc.close()
