"""Fixtures of the security tests: a real ``loyalty serve`` per test module on each backend (``BACKENDS``; on
PostgreSQL with group commit on, as served by default), and a client of it that does not retry (a retry is
something a test does on purpose)."""
from __future__ import annotations

import pytest

from serverutil import BACKENDS, server_on


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    with server_on(request.param, tmp_path_factory.mktemp(f"security-{request.param}")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client(retries=0, timeout=30) as c:
        yield c
