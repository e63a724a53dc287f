"""Fixtures shared by every test of the receipt engine: both implementations, one calculator, tiny builders.

Every engine test runs twice, once over the compiled Cython core (``loyalty.core._engine.Engine``) and once
over the pure-Python reference (``loyalty.core.ReferenceEngine``), through the session fixture
``engine_cls``, in the manner of multidict's ``tests/conftest.py``. A machine without the compiled core
skips the ``core`` half with a visible reason; under ``CI=true`` a missing core is an error, never a skip,
so a broken build cannot pass CI on the reference alone.

The builders (``line``, ``receipt``, ``member``) make the JSON objects of SPEC section 4 as plain dicts;
import them with ``from conftest import line, receipt, member``.
"""
from __future__ import annotations

import copy
import functools
import importlib
import os
import textwrap
from dataclasses import dataclass

import pytest

from loyalty.core import ReferenceEngine, load_program_text

CORE_MARK = pytest.mark.compiled_core
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")

# The default receipt time: Monday 2 March 2026, 12:30 local, inside the SPEC program's validity window.
DEFAULT_AT = "2026-03-02T12:30:00+03:00"


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


@functools.lru_cache(maxsize=256)
def load_program_cached(program_yaml: str):
    """A program parsed once per text (programs are immutable), dedented so tests can indent YAML inline."""
    return load_program_text(textwrap.dedent(program_yaml))


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


# ---- builders: the JSON objects of SPEC section 4 -------------------------------------------------------

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
