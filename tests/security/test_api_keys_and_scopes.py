"""API keys against a real ``loyalty serve --auth required`` (SQLite and PostgreSQL): every bad credential gets
its status and a clear message and writes nothing; scopes and a ``pos`` key's stores hold; revocation and
rotation take effect in the running server, made by another process (the CLI's way: on the database).

The receipt is SPEC example A (member 7000001); a confirm that goes through writes one ``purchases`` row, a
refused one none.
"""
from __future__ import annotations

import copy
import json
import pathlib
import time

import pytest

from helpers.security import expect_status
from loyalty.server.db import Database
from loyalty.server.security.keys import revoke_key, rotate_key
from serverutil import now_at

EXAMPLE_A = json.loads((pathlib.Path(__file__).parents[2] / "examples" / "receipt-a.json").read_text())
CARD = {"card": "7000001"}


def receipt(number: str, store: str = "msk-01") -> dict:
    r = copy.deepcopy(EXAMPLE_A["receipt"])
    r.update(number=number, store=store, at=now_at())
    return r


def confirm(client, number: str, store: str = "msk-01"):
    return client.confirm_purchase({"member": CARD, "receipt": receipt(number, store)})


def _db_change(url, fn, *args, **kwargs):
    db = Database(url, pool_size=1)
    try:
        return fn(db, *args, **kwargs)
    finally:
        db.engine.dispose()


def test_a_call_without_credential_is_unauthenticated_and_writes_nothing(secured):
    before = secured.count("purchases")
    with secured.client() as client, expect_status("UNAUTHENTICATED", "missing credential", "authorization"):
        confirm(client, "no-cred-1")
    assert secured.count("purchases") == before


@pytest.mark.parametrize("value, words", [
    ("lk_0123456789abcdef_not-the-secret", ("unknown API key",)),
    ("lk_short", ("not a well-formed API key",)),
    ("opensesame", ("neither an API key", "nor a JWT")),
])
def test_an_unknown_or_malformed_key_is_unauthenticated(secured, value, words):
    before = secured.count("purchases")
    with secured.client(api_key=value) as client, expect_status("UNAUTHENTICATED", *words) as info:
        confirm(client, f"bad-key-{len(value)}")
    assert value not in info.value.message
    assert secured.count("purchases") == before


def test_a_wrong_secret_of_a_real_key_id_is_unauthenticated(secured):
    key = secured.key("pos")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with secured.client(api_key=forged) as client, expect_status("UNAUTHENTICATED", "unknown API key"):
        client.get_member({"member": CARD})


def test_a_header_that_is_not_bearer_is_unauthenticated(secured):
    with secured.client(metadata=[("authorization", "Basic dXNlcjpwYXNz")]) as client, \
            expect_status("UNAUTHENTICATED", "Bearer"):
        client.get_member({"member": CARD})


def test_each_scope_reaches_its_rpcs_and_no_others(secured):
    pos, integration, read, admin = (secured.key(s, name=f"{s}-key") for s in ("pos", "integration", "read", "admin"))
    with secured.client(api_key=pos) as client:
        assert client.get_member({"member": CARD}).card == "7000001"
        assert client.calculate_receipt({"member": CARD, "receipt": receipt("scope-1")}).answer.totals.amount == 152880
        with expect_status("PERMISSION_DENIED", "pos-key", "PublishProgram", "admin"):
            client.publish_program({"yaml": "x"})
        with expect_status("PERMISSION_DENIED", "EnrollMember", "integration"):
            client.enroll_member({"card": "7100001"})
    with secured.client(api_key=read) as client:
        assert client.get_member({"member": CARD}).active_points >= 0         # reads members
        assert client.list_program_versions().versions[0].version >= 1
        with expect_status("PERMISSION_DENIED", "read-key", "ConfirmPurchase", "pos"):
            confirm(client, "scope-2")
        with expect_status("PERMISSION_DENIED", "AdjustPoints"):
            client.adjust_points({"member": CARD, "kind": "credit", "points": 5, "reason": "x"})
    with secured.client(api_key=integration) as client:
        assert client.enroll_member({"card": "7100002"}).card == "7100002"
        with expect_status("PERMISSION_DENIED", "CalculateReceipt"):
            client.calculate_receipt({"member": CARD, "receipt": receipt("scope-3")})
    with secured.client(api_key=admin) as client:                            # admin includes read, integration
        assert client.get_program().version >= 1
        assert client.enroll_member({"card": "7100003"}).card == "7100003"
        with expect_status("PERMISSION_DENIED", "ConfirmPurchase"):
            confirm(client, "scope-4")


def test_a_refused_admin_call_writes_nothing(secured):
    read = secured.key("read")
    versions, operations = secured.count("program_versions"), secured.count("operations")
    with secured.client(api_key=read) as client:
        with expect_status("PERMISSION_DENIED", "PublishProgram"):
            client.publish_program({"yaml": client.get_program().yaml, "comment": "not allowed"})
        with expect_status("PERMISSION_DENIED", "AdjustPoints"):
            client.adjust_points({"member": CARD, "kind": "credit", "points": 100, "reason": "gift",
                                  "operation_id": "refused-1"})
    assert (secured.count("program_versions"), secured.count("operations")) == (versions, operations)


def test_a_pos_key_serves_only_its_stores(secured):
    msk = secured.key("pos", stores=["msk-01"], name="till-msk")
    other = secured.key("pos", stores=["spb-02"], name="till-spb")
    before = secured.count("purchases")
    with secured.client(api_key=msk) as client:
        with expect_status("PERMISSION_DENIED", "receipt.store", "till-msk", "spb-02"):
            confirm(client, "store-1", store="spb-02")
        with expect_status("PERMISSION_DENIED", "receipt.store"):
            client.calculate_receipt({"member": CARD, "receipt": receipt("store-1", "spb-02")})
        assert secured.count("purchases") == before
        done = confirm(client, "store-2")                                     # its own store
        assert done.answer.totals.amount == 152880 and not done.replayed
    assert secured.count("purchases") == before + 1
    key = {"store": "msk-01", "terminal": "pos-3", "number": "store-2"}
    refunds = secured.count("refunds")
    with secured.client(api_key=other) as client:                            # refunds go by the purchase's store
        with expect_status("PERMISSION_DENIED", "purchase.store", "msk-01"):
            client.refund_purchase({"refund_id": "store-r1", "purchase": key, "all_remaining": True})
        with expect_status("PERMISSION_DENIED", "purchase.store"):
            client.cancel_purchase({"purchase": key})
    assert secured.count("refunds") == refunds
    assert secured.count("purchases") == before + 1
    with secured.client(api_key=msk) as client:
        refund = client.refund_purchase({"refund_id": "store-r2", "purchase": key, "all_remaining": True})
        assert refund.final and refund.refunded_amount == 152880 - 30500


def test_a_revoked_key_is_refused_by_the_running_server_within_a_second(secured):
    key = secured.key("pos", name="to-revoke")
    key_id = key.split("_")[1]
    with secured.client(api_key=key) as client:
        assert client.get_member({"member": CARD}).card == "7000001"          # verified and cached
        _db_change(secured.url, revoke_key, key_id)                            # another process's change
        revoked_at = time.monotonic()
        while True:
            try:
                client.get_member({"member": CARD})
            except Exception as exc:  # noqa: BLE001
                assert exc.code.name == "UNAUTHENTICATED" and "unknown API key" in exc.message
                break
            assert time.monotonic() - revoked_at < 1.0, "revocation not seen within a second"
            time.sleep(0.02)
        before = secured.count("purchases")
        with expect_status("UNAUTHENTICATED"):
            confirm(client, "revoked-1")
        assert secured.count("purchases") == before


def test_a_rotated_key_works_beside_the_new_one_until_its_grace_ends(secured):
    old = secured.key("pos", name="rotating")
    old_id = old.split("_")[1]
    row, new = _db_change(secured.url, rotate_key, old_id, grace_s=1.5)
    assert row["name"] == "rotating" and row["scopes"] == ["pos"] and new != old
    with secured.client(api_key=old) as a, secured.client(api_key=new) as b:
        assert a.get_member({"member": CARD}).card == b.get_member({"member": CARD}).card == "7000001"
        time.sleep(1.6)
        with expect_status("UNAUTHENTICATED", "grace period is over"):
            a.get_member({"member": CARD})
        assert b.get_member({"member": CARD}).card == "7000001"


def test_keys_are_stored_as_hashes_and_never_logged(secured):
    key = secured.key("admin", name="secret-keeper")
    secret = key.split("_", 2)[2]
    with secured.client(api_key=key) as client:
        client.list_program_versions()
    with secured.client(api_key=key[:-1] + "x") as client, expect_status("UNAUTHENTICATED"):
        client.list_program_versions()
    from sqlalchemy import create_engine, text
    engine = create_engine(secured.url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).all()
    engine.dispose()
    assert rows and not any(secret in str(value) for row in rows for value in row)
    import hashlib
    assert hashlib.sha256(secret.encode()).hexdigest() in {row.secret_hash for row in rows}
    assert secret not in secured.server.log()


def test_health_stays_open(secured):
    with secured.client() as client:
        assert client.health() == "SERVING"


def _list_services(target: str, metadata=()) -> set[str]:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5, metadata=metadata))
    return {s.name for s in replies[0].list_services_response.service}


def test_reflection_is_for_admin_credentials_only(secured):
    import grpc
    admin, pos = secured.key("admin", name="reflector"), secured.key("pos", name="curious-till")
    assert {"loyalty.v1.Processing", "loyalty.v1.Admin"} <= _list_services(
        secured.server.target, [("authorization", f"Bearer {admin}")])
    for metadata, code, words in (((), grpc.StatusCode.UNAUTHENTICATED, "missing credential"),
                                  ([("authorization", f"Bearer {pos}")], grpc.StatusCode.PERMISSION_DENIED,
                                   "may not call reflection")):
        with pytest.raises(grpc.RpcError) as info:
            _list_services(secured.server.target, metadata)
        assert info.value.code() == code and words in info.value.details()
