"""OIDC access tokens against a real server and a local issuer (``helpers.oidc_issuer``): an admin call with a
good RS256 or ES256 token goes through as the token's subject; every bad token is UNAUTHENTICATED (or
PERMISSION_DENIED when it is good but grants too little) with a message naming what is wrong, and the manual
points operation it asked for is not written. The issuer's keys are rotated mid-test.
"""
from __future__ import annotations

import base64
import json
import time

import pytest
from joserfc.jwk import RSAKey

from helpers.security import expect_status, utc_in

CARD = {"card": "7000002"}


def adjust(client, operation_id: str):
    return client.adjust_points({"member": CARD, "kind": "credit", "points": 7, "reason": "goodwill",
                                 "operation_id": operation_id})


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def _alg_none(issuer) -> str:
    return f"{_b64({'alg': 'none', 'kid': issuer.rsa_kid})}.{_b64(issuer.claims())}."


# name -> (token maker, expected code, words of the message)
BAD_TOKENS = {
    "expired": (lambda i: i.token(i.claims(exp=utc_in(minutes=-5))), "UNAUTHENTICATED", ("expired",)),
    "not yet valid": (lambda i: i.token(i.claims(nbf=utc_in(minutes=10))), "UNAUTHENTICATED", ("not yet valid",)),
    "wrong issuer": (lambda i: i.token(i.claims(iss="https://evil.example")), "UNAUTHENTICATED",
                     ("issuer", "evil.example")),
    "wrong audience": (lambda i: i.token(i.claims(aud="someone-else")), "UNAUTHENTICATED",
                       ("audience", "someone-else")),
    "unknown kid": (lambda i: i.token(kid="never-published", key=RSAKey.generate_key(2048), alg="RS256"),
                    "UNAUTHENTICATED", ("unknown key", "never-published")),
    "forged signature": (lambda i: i.token(key=RSAKey.generate_key(2048)), "UNAUTHENTICATED",
                         ("signature does not verify",)),
    "alg none": (_alg_none, "UNAUTHENTICATED", ("algorithm 'none' is not accepted",)),
    "no exp": (lambda i: i.token({k: v for k, v in i.claims().items() if k != "exp"}), "UNAUTHENTICATED",
               ("no exp",)),
    "garbage": (lambda i: "abc.def.ghi", "UNAUTHENTICATED", ("not a well-formed JWT",)),
    "no mapped role": (lambda i: i.token(i.claims(roles=("cashier",))), "PERMISSION_DENIED",
                       ("alice", "no role mapped")),
    "scope too small": (lambda i: i.token(i.claims(subject="bob", roles=("loyalty-read",))), "PERMISSION_DENIED",
                        ("token 'bob'", "AdjustPoints", "admin")),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_a_bad_token_is_refused_with_its_reason_and_writes_nothing(secured, case):
    make, code, words = BAD_TOKENS[case]
    before = secured.count("operations")
    with secured.client(token=make(secured.issuer)) as client, expect_status(code, *words):
        adjust(client, f"bad-token-{case}")
    assert secured.count("operations") == before


@pytest.mark.parametrize("kid_attr", ["rsa_kid", "ec_kid"])
def test_a_good_token_makes_an_admin_call_as_its_subject(secured, kid_attr):
    issuer = secured.issuer
    token = issuer.token(issuer.claims(subject="carol"), kid=getattr(issuer, kid_attr))
    before = secured.count("operations")
    with secured.client(token=token) as client:
        result = adjust(client, f"good-{kid_attr}-{secured.server.port}")
        assert result.active_points >= 7
        assert client.list_program_versions().versions          # admin includes read
    assert secured.count("operations") == before + 1


def test_clock_skew_within_a_minute_is_tolerated(secured):
    issuer = secured.issuer
    token = issuer.token(issuer.claims(exp=utc_in(seconds=-20), nbf=utc_in(seconds=20)))
    with secured.client(token=token) as client:
        assert client.list_program_versions().versions


def test_keycloak_client_roles_count_for_the_audience_only(secured):
    issuer = secured.issuer
    mine = issuer.token(issuer.claims(roles=(), resource_access={"loyalty": {"roles": ["loyalty-admin"]}}))
    theirs = issuer.token(issuer.claims(roles=(), resource_access={"crm": {"roles": ["loyalty-admin"]}}))
    with secured.client(token=mine) as client:
        assert client.list_program_versions().versions
    with secured.client(token=theirs) as client, expect_status("PERMISSION_DENIED", "no role mapped"):
        client.list_program_versions()


def test_a_rotated_issuer_key_is_fetched_when_its_kid_arrives(secured):
    issuer = secured.issuer
    with secured.client(token=issuer.token()) as client:
        assert client.list_program_versions().versions
    fetches = issuer.jwks_fetches
    new_kid = issuer.rotate()
    time.sleep(0.35)                                   # past the server's --oidc-refresh 0.3
    with secured.client(token=issuer.token(kid=new_kid)) as client:
        assert client.list_program_versions().versions
    assert issuer.jwks_fetches == fetches + 1


def test_a_token_to_a_server_without_oidc_is_unauthenticated(tmp_path):
    from helpers.oidc_issuer import Issuer
    from serverutil import start_server
    issuer = Issuer()
    server = start_server(tmp_path, args=("--auth", "required"))
    try:
        with server.client(retries=0, token=issuer.token()) as client, \
                expect_status("UNAUTHENTICATED", "accepts no tokens"):
            client.list_program_versions()
    finally:
        server.stop()
        issuer.close()
