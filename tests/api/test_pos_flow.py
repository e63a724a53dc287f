"""The gRPC API end to end against a real ``loyalty serve`` (SQLite, demo seeded): the POS flow, idempotency,
error statuses with their rich details, health, reflection and graceful shutdown.

Expected numbers come from SPEC section 4's worked example A (member 7000001: Basic, 1000 active points):
lines milk 2 x 89.90, cheese 450.00, coffee 899.00; sum 152880; a request of 500 points is capped at 20%:
floor(152880 x 20 / 100) = 30576 -> max_points 305, applied 305 (30500 minor units); points earned 36.
"""
from __future__ import annotations

import copy
import json
import pathlib
import sqlite3
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loyalty.clients.client import LoyaltyError
from serverutil import cli, now_at, start_server

EXAMPLE_A = json.loads((pathlib.Path(__file__).parents[2] / "examples" / "receipt-a.json").read_text())
CARD = "7000001"


def receipt(number: str, **changes) -> dict:
    """Example A's receipt, printed now (its points wait out the return window; none of the demo's
    time-limited promotions touches its lines)."""
    r = copy.deepcopy(EXAMPLE_A["receipt"])
    r["number"] = number
    r["at"] = now_at()
    r.update(changes)
    return r


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("api-flow"))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with server.client(retries=0) as c:
        yield c


def test_pos_flow_calculate_confirm_partial_and_final_refund(server, client):
    member = client.get_member({"member": {"card": CARD}})
    assert (member.status, member.tier, member.active_points, member.pending_points) == ("active", "Basic", 1000, 0)

    answer = client.calculate_receipt({"member": {"card": CARD}, "receipt": receipt("flow-1")}).answer
    assert answer.totals.amount == 152880
    assert (answer.totals.max_points, answer.totals.redeemed_points, answer.totals.redeemed_amount) == (305, 305, 30500)
    assert [line.redeemed for line in answer.lines] == [3587, 8978, 17935]    # SPEC example A allocation
    assert answer.totals.accrued_points == 36
    # calculating has no side effects
    assert client.get_member({"member": {"card": CARD}}).active_points == 1000

    confirmed = client.confirm_purchase({"member": {"card": CARD}, "receipt": receipt("flow-1")})
    assert not confirmed.replayed
    assert confirmed.answer.totals.redeemed_points == 305
    after = client.get_member({"member": {"card": CARD}})
    assert (after.active_points, after.pending_points) == (1000 - 305, 36)

    key = {"store": "msk-01", "terminal": "pos-3", "number": "flow-1"}
    partial = client.refund_purchase({"refund_id": "flow-1-r1", "purchase": key,
                                      "lines": [{"line": 0, "quantity": 1000}]})   # one of the two milks
    assert not partial.final
    assert partial.refunded_amount > 0 and partial.returned_points > 0
    final = client.refund_purchase({"refund_id": "flow-1-r2", "purchase": key, "all_remaining": True})
    assert final.final
    # together the two returns give back exactly what the purchase took and take back what it earned
    assert partial.returned_points + final.returned_points == 305
    assert partial.taken_back_points + final.taken_back_points == 36
    assert partial.refunded_amount + final.refunded_amount == 152880 - 30500
    assert (final.active_points, final.pending_points) == (1000, 0)

    again = client.refund_purchase({"refund_id": "flow-1-r1", "purchase": key,
                                    "lines": [{"line": 0, "quantity": 1000}]})
    assert again.replayed and again.returned_points == partial.returned_points
    assert client.get_member({"member": {"card": CARD}}).active_points == 1000

    result = cli("ledger", "check", "--database-url", server.database_url)
    assert result.returncode == 0, result.stdout + result.stderr


def test_confirm_again_with_the_same_payload_returns_the_stored_answer(client):
    first = client.confirm_purchase({"member": {"card": "7000005"}, "receipt": receipt("replay-1", redeem_points=10)})
    second = client.confirm_purchase({"member": {"card": "7000005"}, "receipt": receipt("replay-1", redeem_points=10)})
    assert second.replayed and not first.replayed
    assert second.purchase_id == first.purchase_id and second.answer == first.answer
    # charged once: 3000 - 10
    assert client.get_member({"member": {"card": "7000005"}}).active_points == 2990


def test_same_key_with_another_payload_is_already_exists(client):
    client.confirm_purchase({"member": {"card": "7000002"}, "receipt": receipt("clash-1", redeem_points=0)})
    with pytest.raises(LoyaltyError) as err:
        client.confirm_purchase({"member": {"card": "7000002"}, "receipt": receipt("clash-1", redeem_points=5)})
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert client.get_member({"member": {"card": "7000002"}}).active_points == 250   # demo balance untouched


def test_not_enough_points_is_failed_precondition_with_the_available_balance(client):
    # 7000002 has 250 points; debiting 251 must fail and say 250 are available
    with pytest.raises(LoyaltyError) as err:
        client.adjust_points({"member": {"card": "7000002"}, "kind": "debit", "points": 251, "reason": "test",
                              "operation_id": "debit-too-much"})
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.available_points == 250


def test_unknown_card_is_not_found(client):
    with pytest.raises(LoyaltyError) as err:
        client.get_member({"member": {"card": "0000000"}})
    assert err.value.code == grpc.StatusCode.NOT_FOUND


MALFORMED = [
    ("calculate_receipt", {"receipt": receipt("m", lines=[])}, "receipt.lines"),
    ("calculate_receipt", {"receipt": receipt("m", at="yesterday")}, "receipt.at"),
    ("calculate_receipt", {"receipt": receipt("m", redeem_points=-1)}, "receipt.redeem_points"),
    ("calculate_receipt", {"receipt": {**receipt("m"), "lines": [
        {"sku": "a", "quantity": 1000, "price": 100}, {"sku": "b", "quantity": -5, "price": 100}]}},
     "receipt.lines[1].quantity"),
    ("calculate_receipt", {"receipt": {**receipt("m"), "lines": [{"sku": "", "quantity": 1000, "price": 1}]}},
     "receipt.lines[0].sku"),
    ("confirm_purchase", {"member": {"card": CARD}, "receipt": receipt("")}, "receipt.number"),
    ("get_member", {}, "member.card"),
    ("adjust_points", {"member": {"card": CARD}, "kind": "credit", "points": 0, "reason": "x",
                       "operation_id": "m0"}, "points"),
    ("adjust_points", {"member": {"card": CARD}, "kind": "steal", "points": 5, "reason": "x",
                       "operation_id": "m1"}, "kind"),
    ("refund_purchase", {"refund_id": "m2", "purchase": {"store": "msk-01"}}, "purchase.terminal"),
    ("set_card_status", {"card": "7000002", "status": "weird"}, "status"),
    ("enroll_member", {"card": ""}, "card"),
    ("publish_program", {"yaml": "program: x\npromotions: [{id: 1}]"}, "promotions[0].id"),
    ("get_program", {"version": -1}, "version"),
]


@pytest.mark.parametrize("method, request_dict, field", MALFORMED, ids=[m[2] for m in MALFORMED])
def test_malformed_request_is_invalid_argument_naming_the_field(client, method, request_dict, field):
    with pytest.raises(LoyaltyError) as err:
        client.call(method, request_dict)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == field
    assert "Traceback" not in err.value.message


def test_bytes_that_are_not_a_request_are_invalid_argument_not_internal(server):
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/loyalty.v1.Processing/CalculateReceipt")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = next(status_pb2.Status.FromString(v) for k, v in err.value.trailing_metadata()
                  if k == "grpc-status-details-bin")
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert "CalculateReceiptRequest" in bad.field_violations[0].description


def test_health_and_reflection_answer(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "loyalty.v1.Processing", "loyalty.v1.Admin"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"loyalty.v1.Processing", "loyalty.v1.Admin", "grpc.health.v1.Health"} <= names
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="loyalty.v1.Processing")]), timeout=5))
        assert replies[0].file_descriptor_response.file_descriptor_proto


def test_sigterm_finishes_the_call_in_flight_and_refuses_new_ones(tmp_path):
    srv = start_server(tmp_path)
    try:
        # Hold SQLite's write lock from outside, so that a confirm waits inside the server (busy timeout 10 s).
        db = sqlite3.connect(srv.database_url[len("sqlite:///"):], isolation_level=None, timeout=10)
        db.execute("BEGIN IMMEDIATE")
        result = {}

        def confirm():
            with srv.client(retries=0, timeout=20) as c:
                try:
                    result["ok"] = c.confirm_purchase({"member": {"card": CARD}, "receipt": receipt("in-flight")})
                except LoyaltyError as exc:
                    result["error"] = exc

        thread = threading.Thread(target=confirm)
        thread.start()
        time.sleep(1.0)                        # the confirm is now waiting for the lock
        srv.signal()
        time.sleep(0.5)
        with srv.client(retries=0, timeout=2) as c:
            with pytest.raises((LoyaltyError, grpc.RpcError)):   # no new calls once shutdown started
                c.get_member({"member": {"card": CARD}})
        db.execute("ROLLBACK")
        db.close()
        thread.join(15)
        assert "error" not in result, result.get("error")
        assert result["ok"].answer.totals.redeemed_points == 305
        assert srv.proc.wait(15) == 0
    finally:
        srv.stop()
    # the purchase the server finished is really stored
    check = sqlite3.connect(srv.database_url[len("sqlite:///"):])
    try:
        assert "in-flight" in {row[0] for row in check.execute("SELECT number FROM purchases")}
    finally:
        check.close()
