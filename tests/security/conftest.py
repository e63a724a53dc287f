"""Fixtures of the security tests: a real ``loyalty serve --auth required`` that accepts API keys and the
tokens of a local OIDC issuer (``helpers.oidc_issuer``), on each storage backend; keys made on its database as
``loyalty keys create`` makes them; and counts of what the server wrote, to show a refused call wrote nothing.

The exact role map of the secured server: ``loyalty-admin`` -> admin, ``loyalty-read`` -> read; the
issuer's keys are fetched again at most every 0.3 s (``--oidc-refresh``), so a rotation is picked up at once.
"""
from __future__ import annotations

import dataclasses

import pytest

from helpers.oidc_issuer import Issuer
from helpers.pki import CA
from helpers.security import count_rows
from loyalty.server.db import Database
from loyalty.server.security.keys import create_key
from serverutil import BACKENDS, server_on

AUDIENCE = "loyalty"
ROLE_ARGS = ("--oidc-role", "loyalty-admin=admin", "--oidc-role", "loyalty-read=read")


@dataclasses.dataclass
class Secured:
    server: object
    issuer: Issuer

    @property
    def url(self) -> str:
        return self.server.database_url

    def key(self, *scopes: str, stores=(), name: str = "till") -> str:
        """A new API key with ``scopes`` (and ``stores``), made on the server's database."""
        db = Database(self.url, pool_size=1)
        try:
            return create_key(db, name=name, scopes=scopes, stores=stores)[1]
        finally:
            db.engine.dispose()

    def client(self, **kwargs):
        return self.server.client(retries=0, **kwargs)

    def count(self, table: str) -> int:
        return count_rows(self.url, table)


@pytest.fixture(scope="module", params=BACKENDS)
def secured(request, tmp_path_factory):
    """``loyalty serve --auth required`` with OIDC, on SQLite and on PostgreSQL (one server and one issuer per
    module and backend)."""
    issuer = Issuer(AUDIENCE)
    args = ("--auth", "required", "--oidc-issuer", issuer.url, "--oidc-audience", AUDIENCE, *ROLE_ARGS,
            "--oidc-refresh", "0.3")
    try:
        with server_on(request.param, tmp_path_factory.mktemp("secured"), args=args) as srv:
            yield Secured(srv, issuer)
    finally:
        issuer.close()


@pytest.fixture()
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1 / localhost, and a till's client certificate
    (``CN=till-7,O=Shop``), in ``tmp_path``."""
    ca = CA(tmp_path / "pki")
    return dataclasses.make_dataclass("Pki", ["ca", "server", "till", "folder"])(
        ca, ca.issue("server", "localhost", server=True), ca.issue("till-7", "till-7"), tmp_path / "pki")


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    """A real ``loyalty serve`` per test module on each backend (on PostgreSQL with group commit on, as served
    by default), authentication off as on loopback by default."""
    with server_on(request.param, tmp_path_factory.mktemp(f"security-{request.param}")) as srv:
        yield srv


@pytest.fixture
def client(server):
    """A client of ``server`` that does not retry (a retry is something a test does on purpose)."""
    with server.client(retries=0, timeout=30) as c:
        yield c
