"""The OIDC verifier's key set (``security.oidc.OidcVerifier``, against the local issuer): fetched once, kept,
fetched again for an unknown ``kid`` at most once per refresh interval however many such tokens arrive, and a
verified token answered from memory."""
from __future__ import annotations

import time

import pytest
from joserfc.jwk import RSAKey

from helpers.oidc_issuer import Issuer
from loyalty.server.errors import Unauthenticated
from loyalty.server.security.oidc import OidcVerifier


@pytest.fixture()
def issuer():
    iss = Issuer("loyalty")
    yield iss
    iss.close()


def test_unknown_kids_fetch_the_keys_at_most_once_per_interval(issuer):
    now = [time.time()]
    verifier = OidcVerifier(issuer.url, "loyalty", {"loyalty-admin": ["admin"]}, refresh_interval=30,
                            clock=lambda: now[0])
    token = issuer.token()
    assert verifier.verify(token).name == "alice"
    assert issuer.jwks_fetches == 1
    stranger = RSAKey.generate_key(2048)
    for i in range(5):
        with pytest.raises(Unauthenticated, match="unknown key"):
            verifier.verify(issuer.token(kid=f"made-up-{i}", key=stranger, alg="RS256"))
    assert issuer.jwks_fetches == 1                       # within the interval: no fetch at all
    new_kid = issuer.rotate()
    now[0] += 31
    assert verifier.verify(issuer.token(kid=new_kid)).name == "alice"
    assert issuer.jwks_fetches == 2


def test_a_verified_token_is_answered_from_memory_until_it_expires(issuer):
    now = [time.time()]
    verifier = OidcVerifier(issuer.url, "loyalty", {"loyalty-admin": ["admin"]}, clock=lambda: now[0])
    token = issuer.token(issuer.claims(exp=int(now[0]) + 100))
    assert verifier.cached(token) is None
    principal = verifier.verify(token)
    assert principal.kind == "token" and verifier.cached(token) is principal
    now[0] += 100 + 61                                      # past exp and the minute of skew
    assert verifier.cached(token) is None
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(token)
