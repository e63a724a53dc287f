"""The scope table (``security.edge.SCOPE_OF``) names every RPC of every ``loyalty.v1`` service, and only those,
with scopes that exist; the till's calls are ``pos``, the changes an administrator makes are ``admin``. And
which addresses may be served without authentication and TLS (only loopback)."""
from __future__ import annotations

import pytest

from loyalty.server.grpc_server import SERVICE_NAMES
from loyalty.server.security import SCOPES
from loyalty.server.security.edge import SCOPE_OF, exposure_problem, is_loopback
from loyalty.v1 import admin_pb2, processing_pb2, scenarios_pb2, security_pb2, segments_pb2

MODULES = (processing_pb2, admin_pb2, segments_pb2, scenarios_pb2, security_pb2)


def _rpcs() -> dict[str, set[str]]:
    out = {}
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            out[service.full_name] = {method.name for method in service.methods}
    return out


def test_every_rpc_in_the_descriptors_has_exactly_one_entry():
    rpcs = _rpcs()
    assert set(rpcs) == set(SERVICE_NAMES) == set(SCOPE_OF)
    for service, methods in rpcs.items():
        assert set(SCOPE_OF[service]) == methods, service


def test_every_entry_names_known_scopes():
    for methods in SCOPE_OF.values():
        for scopes in methods.values():
            assert scopes and set(scopes) <= set(SCOPES)


def test_the_tills_calls_are_pos_and_changes_are_admin():
    processing = SCOPE_OF["loyalty.v1.Processing"]
    for rpc in ("CalculateReceipt", "ConfirmPurchase", "RefundPurchase", "CancelPurchase"):
        assert processing[rpc] == ("pos",)
    assert processing["GetMember"] == ("pos", "read")
    assert processing["AdjustPoints"] == processing["SetCardStatus"] == ("admin",)
    assert SCOPE_OF["loyalty.v1.Admin"]["PublishProgram"] == ("admin",)
    assert SCOPE_OF["loyalty.v1.Scenarios"]["StartBatch"] == ("admin",)
    assert SCOPE_OF["loyalty.v1.Scenarios"]["RecordMessageEvents"] == ("integration",)
    assert SCOPE_OF["loyalty.v1.Segments"]["ExportMembers"] == ("read",)
    assert set(SCOPE_OF["loyalty.v1.Keys"].values()) == {("admin",)}


@pytest.mark.parametrize("host, auth, tls, insecure, refused", [
    ("127.0.0.1", False, False, False, False), ("::1", False, False, False, False),
    ("localhost", False, False, False, False), ("127.0.0.2", False, False, False, False),
    ("0.0.0.0", True, True, False, False), ("10.1.2.3", False, False, True, False),
    ("0.0.0.0", False, True, False, True), ("192.168.0.5", True, False, False, True),
    ("::", False, False, False, True), ("shop.example", True, False, False, True),
])
def test_only_loopback_may_listen_without_auth_and_tls(host, auth, tls, insecure, refused):
    problem = exposure_problem(host, auth_required=auth, tls=tls, insecure=insecure)
    assert (problem is not None) == refused
    assert is_loopback(host) == (host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"))
