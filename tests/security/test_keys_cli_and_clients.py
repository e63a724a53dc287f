"""``loyalty keys`` on the database (the bootstrap of the first admin key), and the credentials of the
``loyalty`` CLI and ``loyalty-pos`` against a server with ``--auth required``: options, environment, TLS."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from serverutil import cli, start_server


@pytest.fixture()
def locked(tmp_path, pki):
    """A TLS server with ``--auth required``; a client needs the CA and a credential."""
    args = ("--auth", "required", "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    server = start_server(tmp_path, args=args, client_options={"tls_ca": str(pki.ca.cert)})
    yield server
    server.stop()


def keys(server, *args):
    result = cli("keys", *args, "--database-url", server.database_url)
    assert "Traceback" not in result.stderr
    return result


def test_bootstrap_an_admin_key_on_the_database_and_use_it_over_tls(locked, pki):
    made = keys(locked, "create", "--name", "ops", "--scope", "admin", "--json")
    assert made.returncode == 0, made.stderr
    row = json.loads(made.stdout)
    assert row["key"].startswith(f"lk_{row['id']}_") and row["scopes"] == ["admin"] and row["kind"] == "key"
    tls = ("--server", locked.target, "--tls-ca", str(pki.ca.cert))
    refused = cli("program", "versions", *tls)
    assert refused.returncode == 1 and refused.stderr.strip().endswith(
        "UNAUTHENTICATED: missing credential: send the metadata `authorization: Bearer <API key or token>`")
    listed = cli("program", "versions", *tls, "--api-key", row["key"], "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["versions"][0]["program"] == "demo"
    by_env = cli("member", "get", "7000001", *tls, "--json", env={"LOYALTY_API_KEY": row["key"]})
    assert by_env.returncode == 0 and json.loads(by_env.stdout)["card"] == "7000001"
    plaintext = cli("member", "get", "7000001", "--server", locked.target, "--api-key", row["key"])
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr


def test_keys_list_revoke_rotate_never_show_a_secret_twice(locked):
    first = json.loads(keys(locked, "create", "--name", "till-1", "--scope", "pos", "--store", "msk-01",
                            "--json").stdout)
    listed = keys(locked, "list", "--json")
    assert listed.returncode == 0
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["stores"]) for r in rows] == [("till-1", ["msk-01"])]
    assert first["key"] not in listed.stdout and "secret_hash" not in listed.stdout
    rotated = json.loads(keys(locked, "rotate", first["id"], "--grace", "60", "--json").stdout)
    assert rotated["key"] != first["key"] and rotated["name"] == "till-1"
    old = {r["id"]: r for r in json.loads(keys(locked, "list", "--json").stdout)}[first["id"]]
    assert old["replaced_by"] == rotated["id"] and old["expires_at"]
    revoked = keys(locked, "revoke", rotated["id"])
    assert revoked.returncode == 0 and "revoked key" in revoked.stdout
    assert {r["id"] for r in json.loads(keys(locked, "list", "--json").stdout)} == {first["id"]}
    again = keys(locked, "revoke", rotated["id"])
    assert again.returncode == 2 and again.stderr.strip() == f"error: id: key {rotated['id']} is already revoked"


@pytest.mark.parametrize("args, message", [
    (("create", "--name", "x", "--scope", "read", "--store", "msk-01"), "store: only a pos credential is bound to stores"),
    (("create", "--name", " ", "--scope", "pos"), "name: required"),
    (("revoke", "0000000000000000"), "NOT_FOUND: id: no key '0000000000000000'"),
])
def test_bad_keys_commands_are_one_line(locked, args, message):
    result = keys(locked, *args)
    assert result.returncode in (1, 2) and result.stderr.strip() == f"error: {message}"


def test_loyalty_pos_checks_out_with_a_store_bound_key_and_is_refused_elsewhere(locked, pki):
    key = json.loads(keys(locked, "create", "--name", "till-msk", "--scope", "pos", "--store", "msk-01",
                          "--json").stdout)["key"]
    base = [sys.executable, "-m", "loyalty.clients.pos", "--server", locked.target, "--tls-ca", str(pki.ca.cert),
            "--json", "--number", "pos-sec-1"]
    ok = subprocess.run([*base, "--api-key", key], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["purchase"]["purchase_id"]
    other = subprocess.run([*base[:-1], "pos-sec-2", "--store", "spb-02"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "LOYALTY_API_KEY": key})
    assert other.returncode == 1
    assert "PERMISSION_DENIED: receipt.store: key 'till-msk' may not serve store 'spb-02'" in other.stderr


def test_keys_through_the_server_need_an_admin_credential(locked, pki):
    admin = json.loads(keys(locked, "create", "--name", "ops", "--scope", "admin", "--json").stdout)["key"]
    reader = json.loads(keys(locked, "create", "--name", "auditor", "--scope", "read", "--json").stdout)["key"]
    over = ("--server", locked.target, "--tls-ca", str(pki.ca.cert))
    made = cli("keys", "create", "--name", "till-9", "--scope", "pos", "--store", "spb-02", *over, "--api-key", admin,
               "--json")
    assert made.returncode == 0, made.stderr
    row = json.loads(made.stdout)
    assert row["key"].startswith(f"lk_{row['id']}_") and row["stores"] == ["spb-02"] and row["revoked_at"] is None
    with locked.client(retries=0, api_key=row["key"]) as till:                   # the new key works at once
        assert till.get_member({"member": {"card": "7000001"}}).card == "7000001"
    listed = json.loads(cli("keys", "list", *over, "--api-key", admin, "--json").stdout)
    assert [r["name"] for r in listed] == ["ops", "auditor", "till-9"] and row["key"] not in json.dumps(listed)
    rotated = json.loads(cli("keys", "rotate", row["id"], "--grace", "0", *over, "--api-key", admin, "--json").stdout)
    assert rotated["key"] != row["key"] and rotated["name"] == "till-9"
    revoked = cli("keys", "revoke", rotated["id"], *over, "--api-key", admin, "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_at"]
    denied = cli("keys", "create", "--name", "sneaky", "--scope", "admin", *over, "--api-key", reader)
    assert denied.returncode == 1 and denied.stderr.strip() == (
        "error: PERMISSION_DENIED: key 'auditor' may not call CreateKey (needs scope admin)")
    bad = cli("keys", "create", "--name", "x", "--scope", "read", "--store", "a", *over, "--api-key", admin)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: INVALID_ARGUMENT: store: only a pos credential is bound to stores")
