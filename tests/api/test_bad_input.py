"""Bad input beside the fixed cases, found by a black-box run: every field answers INVALID_ARGUMENT naming it
(never INTERNAL), on SQLite and PostgreSQL, through the gRPC API and the CLI, and nothing is written.

- times whose UTC conversion leaves the calendar (``0001-01-01T00:00:00+03:00``) and dates a program or a segment
  cannot add a day to (``9999-12-31``);
- a subscription channel that does not exist;
- StartBatch without a reason (every manual points operation has one), or with two targets at once;
- a message event whose card and phone are two members;
- a negative list limit;
- ``loyalty member enroll`` without ``--gender``.
"""
from __future__ import annotations

import json

import grpc
import pytest

from loyalty.clients.client import LoyaltyError
from loyalty.v1 import scenarios_pb2 as S, scenarios_pb2_grpc, segments_pb2 as G, segments_pb2_grpc
from serverutil import BACKENDS, cli, now_at, server_on

ANCIENT = "0001-01-01T00:00:00+03:00"


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    with server_on(request.param, tmp_path_factory.mktemp(f"siblings-{request.param}")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client(retries=0, timeout=30) as c:
        yield c


def invalid(call, field: str):
    with pytest.raises((LoyaltyError, grpc.RpcError)) as err:
        call()
    exc = err.value
    code = exc.code if isinstance(exc, LoyaltyError) else exc.code()
    text = exc.message if isinstance(exc, LoyaltyError) else exc.details()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, text
    assert field in text, text
    return text


def receipt(number: str, at: str) -> dict:
    return {"store": "msk-02", "terminal": "pos-5", "number": number, "at": at,
            "lines": [{"sku": "tea", "quantity": 1000, "price": 10000}]}


def test_times_out_of_the_calendar_are_invalid_argument(client, server):
    for call in (client.calculate_receipt, client.confirm_purchase):
        invalid(lambda: call({"member": {"card": "7000001"}, "receipt": receipt("ancient", ANCIENT)}), "receipt.at")
    invalid(lambda: client.enroll_member({"card": "8600001", "registered_at": ANCIENT}), "registered_at")
    events = scenarios_pb2_grpc.ScenariosStub(client.channel)
    invalid(lambda: events.RecordMessageEvents(S.RecordMessageEventsRequest(events=[S.MessageEvent(
        id="e-ancient", card="7000001", channel="email", kind="opened", at=ANCIENT)]), timeout=30), "events[0].at")
    segments = segments_pb2_grpc.SegmentsStub(client.channel)
    invalid(lambda: segments.CreateSegment(G.DefineSegmentRequest(id="forever", type="updatable", conditions_json=
            json.dumps({"purchases": {"last_date": {"between": ["0001-01-01", "9999-12-31"]}}})), timeout=30),
            "last_date.between")
    program = ("program: forever\npromotions:\n  - {id: p, valid: {from: 2026-01-01, to: 9999-12-31}, "
               "effect: {percent_off: 5}}\n")
    invalid(lambda: client.publish_program({"yaml": program}), "promotions[0].valid.to")
    assert client.get_program({}).version == 1                      # still the demo: nothing published


def test_an_unknown_subscription_channel_is_invalid_argument(client):
    invalid(lambda: client.enroll_member({"card": "8600002", "subscriptions": {"pigeon": True}}), "subscriptions")
    with pytest.raises(LoyaltyError) as err:
        client.get_member({"member": {"card": "8600002"}})
    assert err.value.code == grpc.StatusCode.NOT_FOUND                # nothing was written
    invalid(lambda: client.update_member({"member": {"card": "7000001"}, "subscriptions": {"fax": False}}),
            "subscriptions")


def test_start_batch_needs_a_reason_and_one_target(client):
    stub = scenarios_pb2_grpc.ScenariosStub(client.channel)
    for reason in ("", "   "):
        invalid(lambda: stub.StartBatch(S.StartBatchRequest(batch_id="no-reason", kind="award", points=1,
                                                            reason=reason, members=["7000001"]), timeout=30),
                "reason")
    invalid(lambda: stub.StartBatch(S.StartBatchRequest(batch_id="two-targets", kind="award", points=1, reason="x",
                                                        members=["7000001"], all_members=True), timeout=30),
            "all_members")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetBatchProgress(S.BatchRef(batch_id="two-targets"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_message_event_with_the_card_and_phone_of_two_members_names_both(client):
    stub = scenarios_pb2_grpc.ScenariosStub(client.channel)
    two = client.get_member({"member": {"card": "7000002"}})
    reply = stub.RecordMessageEvents(S.RecordMessageEventsRequest(events=[
        S.MessageEvent(id="pair-1", card="7000001", phone=two.phone, channel="email", kind="opened", at=now_at()),
        S.MessageEvent(id="pair-2", card="7000002", phone=two.phone, channel="email", kind="opened", at=now_at()),
    ]), timeout=30)
    assert reply.recorded == 1
    [rejected] = reply.rejected
    assert (rejected.index, rejected.field) == (0, "events[0].card") and "events[0].phone" in rejected.reason


def test_a_negative_list_limit_is_invalid_argument(client):
    stub = scenarios_pb2_grpc.ScenariosStub(client.channel)
    invalid(lambda: stub.ListDeadLetters(S.ListDeadLettersRequest(limit=-1), timeout=30), "limit")
    segments = segments_pb2_grpc.SegmentsStub(client.channel)
    segments.CreateSegment(G.DefineSegmentRequest(id="list", type="static"), timeout=30)
    invalid(lambda: segments.GetHistory(G.HistoryRequest(id="list", limit=-5), timeout=30), "limit")


def test_member_enroll_from_the_cli_without_a_gender(server):
    done = cli("member", "enroll", "--card", "8600003", "--email", "vera@example.com", "--subscribe", "email",
               "--server", server.target)
    assert done.returncode == 0, done.stderr
    with server.client() as client:
        m = client.get_member({"member": {"card": "8600003"}})
    assert (m.profile.gender, m.profile.email, dict(m.subscriptions)) == ("", "vera@example.com", {"email": True})


@pytest.mark.parametrize("change, field", [
    (lambda r: {**r, "channel": "c" * 101}, "receipt.channel"),
    (lambda r: {**r, "coupons": ["ok", "x" * 101]}, "receipt.coupons[1]"),
    (lambda r: {**r, "coupons": [f"c{i}" for i in range(101)]}, "receipt.coupons"),
    (lambda r: {**r, "lines": [{**r["lines"][0], "categories": ["tea", "к" * 101]}]}, "receipt.lines[0].categories[1]"),
    (lambda r: {**r, "lines": [{**r["lines"][0], "categories": [f"c{i}" for i in range(101)]}]},
     "receipt.lines[0].categories"),
])
def test_a_receipts_codes_have_limits_of_length_and_number(client, server, change, field):
    """Channel, coupon codes and categories are matched, not stored, and still bounded: 100 characters each, 100
    coupons a receipt, 100 categories a line; past that INVALID_ARGUMENT naming the field, nothing written; at
    the limit they pass (a 100-character Cyrillic category is 200 bytes)."""
    base = receipt(f"codes-{field}", now_at())
    for call in (client.calculate_receipt, client.confirm_purchase):
        text = invalid(lambda: call({"member": {"card": "7000001"}, "receipt": change(base)}), field)
        assert f"{field}:" in text
    at_limit = {**base, "channel": "c" * 100, "coupons": [f"c{i}" for i in range(100)],
                "lines": [{**base["lines"][0], "categories": ["к" * 100] + [f"c{i}" for i in range(99)]}]}
    assert client.calculate_receipt({"member": {"card": "7000001"}, "receipt": at_limit}).answer.totals.payable > 0
