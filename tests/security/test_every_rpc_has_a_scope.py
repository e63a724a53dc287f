"""The scope table (``security.edge.SCOPE_OF``) names every RPC of every ``loyalty.v1`` service, and only those,
with scopes that exist; the till's calls are ``pos``, the changes an administrator makes are ``admin``."""
from __future__ import annotations

from loyalty.server.grpc_server import SERVICE_NAMES
from loyalty.server.security import SCOPES
from loyalty.server.security.edge import SCOPE_OF
from loyalty.v1 import admin_pb2, processing_pb2, scenarios_pb2, segments_pb2

MODULES = (processing_pb2, admin_pb2, segments_pb2, scenarios_pb2)


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
