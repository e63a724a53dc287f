"""Fixtures of the scenario tests: a processing service, a scenario service and an in-process worker sharing
one database and simulated clock (``scn``, over the storage fixtures of ``tests/conftest.py``), and a tiny HTTP
sink and SMTP sink on loopback. Plain helpers are in ``helpers/scenarios.py``."""
from __future__ import annotations

import pytest

from helpers.scenarios import HttpSink, SmtpSink


@pytest.fixture
def scn(service, clock):
    """(processing service, scenario service, worker) sharing one database and clock."""
    from loyalty.server.scenarios import ScenarioService, Worker
    sc = ScenarioService(service.db, clock=clock)
    worker = Worker(service.db, clock=clock)
    return service, sc, worker


@pytest.fixture
def http_sink():
    sink = HttpSink()
    yield sink
    sink.close()


@pytest.fixture
def smtp_sink():
    sink = SmtpSink()
    yield sink
    sink.close()
