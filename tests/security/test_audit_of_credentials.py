"""The audit log under ``--auth required``: key changes are recorded with the admin who made them, and admin
calls refused for their credential (none, or one without the scope) are recorded too, by whom they were
tried, with nothing else written (issue 13: "refused admin calls are audited")."""
from __future__ import annotations

import hashlib

import grpc

from helpers.security import expect_status, rows
from loyalty.v1 import admin_pb2, security_pb2, security_pb2_grpc


def _audit(secured, rpc: str) -> list[dict]:
    return rows(secured.url, "SELECT actor, actor_kind, rpc, target, outcome FROM audit_log WHERE rpc = :rpc "
                             "ORDER BY id", rpc=rpc)


def test_a_key_made_over_the_api_is_recorded_with_the_admin_who_made_it(secured):
    admin = secured.key("admin", name="ops-admin")
    with grpc.insecure_channel(secured.server.target) as channel:
        stub = security_pb2_grpc.KeysStub(channel)
        made = stub.CreateKey(security_pb2.CreateKeyRequest(name="till-audit", scopes=["pos"], stores=["msk-01"]),
                              metadata=(("authorization", f"Bearer {admin}"),), timeout=30)
    recorded = _audit(secured, "CreateKey")
    assert {"actor": "ops-admin", "actor_kind": "key", "rpc": "CreateKey", "target": f"key:{made.key.id}",
            "outcome": "OK"} in recorded


def test_an_admin_call_without_the_scope_is_refused_and_recorded(secured):
    till = secured.key("pos", stores=["msk-01"], name="till-refused")
    versions = secured.count("program_versions")
    with secured.client(api_key=till) as client, expect_status("PERMISSION_DENIED", "PublishProgram"):
        client.publish_program({"yaml": "program: x", "comment": "not mine to publish"})
    assert secured.count("program_versions") == versions
    assert {"actor": "till-refused", "actor_kind": "key", "rpc": "PublishProgram", "target": "program",
            "outcome": "PERMISSION_DENIED"} in _audit(secured, "PublishProgram")


def test_an_admin_call_without_a_credential_is_refused_and_recorded(secured):
    before = len(_audit(secured, "AdjustPoints"))
    with secured.client() as client, expect_status("UNAUTHENTICATED"):
        client.adjust_points({"member": {"card": "7000001"}, "kind": "credit", "points": 1000000,
                              "reason": "free points", "operation_id": "no-cred-adjust"})
    recorded = _audit(secured, "AdjustPoints")
    assert len(recorded) == before + 1
    assert recorded[-1] == {"actor": "unidentified", "actor_kind": "none", "rpc": "AdjustPoints",
                            "target": "operation:no-cred-adjust", "outcome": "UNAUTHENTICATED"}
    assert rows(secured.url, "SELECT count(*) AS n FROM ledger WHERE operation_id = 'no-cred-adjust'")[0]["n"] == 0


def test_reading_the_audit_log_needs_admin(secured):
    reader = secured.key("read", name="auditor-read")
    with secured.client(api_key=reader) as client, expect_status("PERMISSION_DENIED", "ListAudit"):
        client.list_audit(admin_pb2.ListAuditRequest())


def test_an_admin_call_whose_bytes_are_not_its_request_is_refused_and_recorded(secured):
    """An admin with a good key sends AdjustPoints bytes that do not decode: INVALID_ARGUMENT, nothing written,
    and a row naming the admin, the status and the bytes' sha256 (there is no request to digest)."""
    admin = secured.key("admin", name="ops-garbled")
    garbage = b"\x0a\xff\xff\xff"               # field 1, length-delimited, a length running past the end
    with grpc.insecure_channel(secured.server.target) as channel:
        adjust = channel.unary_unary("/loyalty.v1.Processing/AdjustPoints")
        try:
            adjust(garbage, metadata=(("authorization", f"Bearer {admin}"),), timeout=30)
            raise AssertionError("undecodable bytes were accepted")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "loyalty.v1.AdjustPointsRequest" in err.details()
    recorded = rows(secured.url, "SELECT actor, rpc, target, digest, outcome FROM audit_log "
                                 "WHERE actor = 'ops-garbled'")
    assert recorded == [{"actor": "ops-garbled", "rpc": "AdjustPoints", "target": "",
                         "digest": hashlib.sha256(garbage).hexdigest(), "outcome": "INVALID_ARGUMENT"}]


def test_two_authorization_headers_are_ambiguous_and_refused_whatever_their_order(secured):
    reader = secured.key("read", name="reader-twice")
    with grpc.insecure_channel(secured.server.target) as channel:
        list_keys = security_pb2_grpc.KeysStub(channel).ListKeys
        admin = secured.key("admin", name="admin-twice")
        for pair in ((admin, "garbage"), ("garbage", admin), (admin, reader)):
            try:
                list_keys(security_pb2.ListKeysRequest(), timeout=30,
                          metadata=tuple(("authorization", f"Bearer {k}") for k in pair))
                raise AssertionError(f"two credentials were accepted: {pair}")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
                assert "more than once" in err.details()
        assert list_keys(security_pb2.ListKeysRequest(), timeout=30,
                         metadata=(("authorization", f"Bearer {admin}"),)).keys
