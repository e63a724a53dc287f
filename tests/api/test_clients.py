"""``loyalty.clients.client``: retries resend the same request (so its idempotency key) and only on
UNAVAILABLE / DEADLINE_EXCEEDED; errors carry the rich details. Against a real server on SQLite."""
from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from loyalty.clients.client import AsyncLoyaltyClient, LoyaltyClient, LoyaltyError
from serverutil import now_at, start_server

AT = now_at()       # printed now: its points wait out the return window


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("clients"))
    yield srv
    srv.stop()


class _Lost(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection reset (simulated)"

    def trailing_metadata(self):
        return ()


class _Failed:
    def result(self, timeout=None):
        raise _Lost()


class LoseFirstAnswer(grpc.UnaryUnaryClientInterceptor):
    """Lets every call reach the server but drops the first answer of ``method`` (a reset after the server
    wrote); records the bytes of every attempt."""

    def __init__(self, method: str):
        self.method = method
        self.sent: list[bytes] = []

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        if details.method.endswith(self.method):
            self.sent.append(request.SerializeToString())
            if len(self.sent) == 1:
                try:
                    outcome.result()          # the server did the work...
                finally:
                    return _Failed()          # ...and the answer is lost on the way back
        return outcome


class CountCalls(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.calls = 0

    def intercept_unary_unary(self, continuation, details, request):
        self.calls += 1
        return continuation(details, request)


def test_retry_after_a_lost_confirm_answer_does_not_charge_twice(server):
    lose = LoseFirstAnswer("ConfirmPurchase")
    with LoyaltyClient(server.target, interceptors=[lose], backoff=0.01) as client:
        response = client.confirm_purchase({"member": {"card": "7000002"}, "receipt": {
            "store": "msk-01", "terminal": "pos-2", "number": "lost-1", "at": AT, "redeem_points": 50,
            "lines": [{"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000, "price": 89900}]}})
        assert len(lose.sent) == 2 and lose.sent[0] == lose.sent[1]     # the same request, same key
        assert response.replayed                                      # the server recognised the retry
        assert client.get_member({"member": {"card": "7000002"}}).active_points == 250 - 50


def test_an_empty_operation_id_is_filled_once_and_kept_across_retries(server):
    lose = LoseFirstAnswer("AdjustPoints")
    with LoyaltyClient(server.target, interceptors=[lose], backoff=0.01) as client:
        before = client.get_member({"member": {"card": "7000005"}}).active_points
        response = client.adjust_points({"member": {"card": "7000005"}, "kind": "credit", "points": 7,
                                         "reason": "goodwill"})
        assert len(lose.sent) == 2 and lose.sent[0] == lose.sent[1]
        assert response.operation_id and response.replayed
        assert client.get_member({"member": {"card": "7000005"}}).active_points == before + 7


@pytest.mark.parametrize("request_dict, code", [
    ({"member": {"card": "7000002"}, "kind": "debit", "points": 10**6, "reason": "x", "operation_id": "nr-1"},
     grpc.StatusCode.FAILED_PRECONDITION),
    ({"member": {"card": "7000002"}, "kind": "credit", "points": 0, "reason": "x", "operation_id": "nr-2"},
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_errors_that_a_retry_cannot_change_are_not_retried(server, request_dict, code):
    counter = CountCalls()
    with LoyaltyClient(server.target, interceptors=[counter], retries=5, backoff=0.01) as client:
        with pytest.raises(LoyaltyError) as err:
            client.adjust_points(request_dict)
    assert err.value.code == code
    assert counter.calls == 1 and err.value.attempts == 1


def test_already_exists_is_not_retried(server):
    counter = CountCalls()
    with LoyaltyClient(server.target, interceptors=[counter], retries=5, backoff=0.01) as client:
        with pytest.raises(LoyaltyError) as err:
            client.enroll_member({"card": "7000001"})
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and counter.calls == 1


def test_unreachable_server_is_retried_then_unavailable():
    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LoyaltyClient(f"127.0.0.1:{port}", retries=2, backoff=0.01, timeout=1) as client:
        with pytest.raises(LoyaltyError) as err:
            client.get_member({"member": {"card": "7000001"}})
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 3


def test_async_client_calls_and_maps_errors(server):
    async def run():
        async with AsyncLoyaltyClient(server.target) as client:
            member = await client.get_member({"member": {"card": "7000003"}})
            with pytest.raises(LoyaltyError) as err:
                await client.get_member({"member": {}})
            return member, err.value, await client.health()

    member, error, health = asyncio.run(run())
    assert (member.status, member.active_points) == ("restricted", 400)     # demo member 7000003
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "member.card"
    assert health == "SERVING"
