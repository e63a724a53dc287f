"""Fixtures shared by every folder: the receipt engine's two implementations and one calculator, and storage.

Every engine test runs twice, once over the compiled Cython core (``loyalty.core._engine.Engine``) and once
over the pure-Python reference (``loyalty.core.ReferenceEngine``), through the session fixture
``engine_cls``, in the manner of multidict's ``tests/conftest.py``. A machine without the compiled core
skips the ``core`` half with a visible reason; under ``CI=true`` a missing core is an error, never a skip,
so a broken build cannot pass CI on the reference alone.

The storage fixtures used across the folders are here too: ``clock`` (a simulated UTC clock), ``sqlite_url``
and ``pg_url`` (a fresh database, already migrated: a copy of the run's migrated template, see
``helpers/storage.py``), ``pg_url_empty`` (an empty PostgreSQL database, for the migration tests),
``database_url`` (each storage test on both backends) and ``service`` (a processing service over a migrated
database with the demo program).

The builders (``line``, ``receipt``, ``member``) make the JSON objects of SPEC section 4 as plain dicts;
import them with ``from helpers.builders import line, receipt, member``.
"""
from __future__ import annotations

import copy
import functools
import importlib
from dataclasses import dataclass

import pytest

from helpers import storage
from helpers.builders import load_program_cached
from helpers.storage import DEMO_PROGRAM, IN_CI, Clock
from loyalty.core import ReferenceEngine

CORE_MARK = pytest.mark.compiled_core


# ---- the two implementations ----------------------------------------------------------------------------

@functools.cache
def _import_core():
    """``(Engine class, None)`` from the compiled extension, or ``(None, reason)`` when it cannot be imported."""
    try:
        module = importlib.import_module("loyalty.core._engine")
    except ImportError as exc:
        return None, f"compiled core loyalty.core._engine cannot be imported: {exc}"
    engine = getattr(module, "Engine", None)
    if engine is None:
        return None, f"loyalty.core._engine ({module.__file__}) has no Engine"
    return engine, None


@dataclass(frozen=True)
class EngineImplementation:
    """One implementation of the engine API: ``"core"`` (compiled) or ``"reference"`` (pure Python)."""

    name: str

    def load(self):
        if self.name == "reference":
            return ReferenceEngine
        engine, reason = _import_core()
        if engine is None:
            if IN_CI:
                pytest.fail(f"{reason} (CI=true: the compiled core must be built)", pytrace=False)
            pytest.skip(reason)
        return engine

    def __str__(self) -> str:
        return self.name


@pytest.fixture(
    scope="session",
    params=(
        pytest.param(EngineImplementation("core"), marks=CORE_MARK),
        EngineImplementation("reference"),
    ),
    ids=str,
)
def engine_implementation(request: pytest.FixtureRequest) -> EngineImplementation:
    return request.param


@pytest.fixture(scope="session")
def engine_cls(engine_implementation: EngineImplementation):
    """The engine class under test: ``Engine(program).calculate(receipt, member, budgets_used)``."""
    return engine_implementation.load()


@pytest.fixture
def calc(engine_cls):
    """``calc(program_yaml, receipt, member=None, budgets_used=None)`` -> the answer dict.

    Also checks that the engine leaves its inputs untouched: the server reuses them after the call."""

    def calculate(program_yaml: str, receipt: dict, member: dict | None = None, budgets_used: dict | None = None):
        engine = engine_cls(load_program_cached(program_yaml))
        before = copy.deepcopy((receipt, member, budgets_used))
        answer = engine.calculate(receipt, member, budgets_used)
        assert (receipt, member, budgets_used) == before, "the engine changed its inputs"
        return answer

    return calculate


# ---- storage: a fresh database per test, on SQLite and PostgreSQL ------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def _postgres_template():
    """Drops the run's migrated PostgreSQL template at the end, if a test made one (``helpers.storage``)."""
    yield
    storage.drop_template()


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database already migrated to head (a copy of the run's template), dropped after."""
    url = storage.create_database(migrated=True)
    try:
        yield url
    finally:
        storage.drop_database(url)


@pytest.fixture
def pg_url_empty():
    """A fresh EMPTY PostgreSQL database, dropped after: for the tests of the migrations themselves."""
    url = storage.create_database(migrated=False)
    try:
        yield url
    finally:
        storage.drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path):
    """A fresh SQLite database already migrated to head (a copy of the run's migrated file)."""
    return storage.sqlite_database(tmp_path / "loyalty.db")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request):
    """Every storage test runs on both backends, each on a fresh database already migrated."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def service(database_url, clock):
    """A service over a migrated database with the demo program published (no demo members)."""
    from loyalty.server import db
    from loyalty.server.processing import ProcessingService
    from loyalty.v1 import admin_pb2

    db.upgrade(database_url)
    svc = ProcessingService.open(database_url, clock=clock)
    svc.publish_program(admin_pb2.PublishProgramRequest(yaml=DEMO_PROGRAM, comment="tests"))
    try:
        yield svc
    finally:
        svc.close()


# ---- pytest hooks ---------------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{CORE_MARK.name}: runs against the compiled Cython core")


def pytest_report_header(config: pytest.Config) -> list[str]:
    engine, reason = _import_core()
    if engine is None:
        state = f"NOT loaded ({reason}); core tests {'FAIL (CI=true)' if IN_CI else 'are skipped'}"
    else:
        module = importlib.import_module(engine.__module__)
        state = f"loaded from {getattr(module, '__file__', '?')}"
    import loyalty.core as core
    return [f"loyalty compiled core: {state}",
            f"loyalty.core.Engine is {core.Engine.__module__}.{core.Engine.__qualname__} "
            f"(COMPILED={core.COMPILED})"]
