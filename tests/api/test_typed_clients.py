"""``loyalty.clients``: one typed method per RPC of every service on both clients, requests as messages,
dicts or keyword fields, a typo in a key as a ``LoyaltyError`` naming its path (and nothing sent), and the
``iter_*`` methods walking every page of a List RPC against a real server."""
from __future__ import annotations

import asyncio
import inspect
import socket
import typing
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from loyalty.clients import RPCS, AsyncLoyaltyClient, LoyaltyClient, LoyaltyError, build_request
from loyalty.v1 import admin_pb2, processing_pb2, receipt_pb2, scenarios_pb2, segments_pb2
from serverutil import start_server

SERVICE_MODULES = (processing_pb2, admin_pb2, segments_pb2, scenarios_pb2)
ALL_RPCS = [(module, service, method) for module in SERVICE_MODULES
            for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("typed"))
    yield srv
    srv.stop()


def _unreachable() -> str:
    with socket.socket() as s:           # a port nobody listens on: anything sent would be UNAVAILABLE
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _method_name(rpc: str) -> str:
    """CamelCase to snake_case, written out here rather than taken from the code under test."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in rpc).lstrip("_")


@pytest.mark.parametrize("module, service, method", ALL_RPCS, ids=[f"{s.name}.{m.name}" for _, s, m in ALL_RPCS])
def test_every_rpc_has_a_typed_method_on_both_clients(module, service, method):
    name = _method_name(method.name)
    request_cls = getattr(module, method.input_type.name)
    response_cls = getattr(module, method.output_type.name)
    for cls in (LoyaltyClient, AsyncLoyaltyClient):
        fn = getattr(cls, name)
        hints = typing.get_type_hints(fn)
        assert request_cls in typing.get_args(hints["request"]), (cls.__name__, name, hints["request"])
        returned = typing.get_args(hints["return"]) if method.server_streaming else (hints["return"],)
        assert response_cls in returned, (cls.__name__, name, hints["return"])
        params = inspect.signature(fn).parameters
        assert {"timeout", "retries"} <= set(params)
        assert set(request_cls.DESCRIPTOR.fields_by_name) <= set(params)   # every field as a keyword too
        assert method.name in fn.__doc__ and service.full_name in fn.__doc__
    assert inspect.iscoroutinefunction(getattr(AsyncLoyaltyClient, name)) != method.server_streaming
    assert RPCS[name].path == f"/{service.full_name}/{method.name}"


def test_paged_lists_get_an_iterator_and_the_export_streams():
    assert {n for n in dir(LoyaltyClient) if n.startswith("iter_")} == {
        "iter_program_versions", "iter_segments", "iter_history", "iter_changes", "iter_scenarios",
        "iter_dead_letters", "iter_audit", "iter_limit_breaches", "iter_keys", "iter_preview_members"}
    assert typing.get_type_hints(LoyaltyClient.iter_segments)["return"] == Iterator[segments_pb2.Segment]
    assert typing.get_type_hints(AsyncLoyaltyClient.iter_segments)["return"] == \
        AsyncIterator[segments_pb2.Segment]
    assert RPCS["export_members_stream"].streaming and not RPCS["export_members"].streaming


@pytest.mark.parametrize("request_dict, path", [
    ({"receipt": {"lnes": []}}, "receipt.lnes"),
    ({"member": {"crad": "7000001"}}, "member.crad"),
    ({"receipt": {"lines": [{"sku": "a", "quantity": 1}, {"sku": "b", "qty": 1}]}}, "receipt.lines[1].qty"),
    ({"recipt": {}}, "recipt"),
])
def test_a_typo_in_a_key_is_a_loyalty_error_naming_it_and_nothing_is_sent(request_dict, path):
    with LoyaltyClient(_unreachable(), retries=0, timeout=1) as client:
        with pytest.raises(LoyaltyError) as err:
            client.calculate_receipt(request_dict)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT       # not UNAVAILABLE: never sent
    assert err.value.field == path
    assert err.value.message == f"{path}: unknown field"


def test_a_value_of_the_wrong_type_names_its_field_with_the_index():
    with pytest.raises(LoyaltyError) as err:
        build_request("calculate_receipt", {"receipt": {"lines": [{"sku": "a", "quantity": 1},
                                                                  {"sku": "b", "quantity": "two"}]}})
    assert err.value.field == "receipt.lines[1].quantity"
    with pytest.raises(LoyaltyError) as err:
        build_request("get_program", None, {"version": "latest"})
    assert err.value.field == "version"


def test_keyword_fields_dicts_and_messages_build_the_same_request():
    as_dict = build_request("confirm_purchase", {"member": {"card": "7000001"},
                                                 "receipt": {"number": "n-1", "lines": [{"sku": "a", "price": 5}]}})
    receipt = receipt_pb2.Receipt(number="n-1", lines=[receipt_pb2.Line(sku="a", price=5)])
    as_kwargs = build_request("confirm_purchase", None, {"member": receipt_pb2.MemberRef(card="7000001"),
                                                         "receipt": receipt})
    assert as_dict == as_kwargs
    assert build_request("confirm_purchase", {"member": {"card": "7000001"}}, {"receipt": receipt}) == as_dict
    over = build_request("get_program", admin_pb2.GetProgramRequest(version=3), {"version": 7})
    assert over.version == 7
    given = admin_pb2.GetProgramRequest(version=3)
    build_request("get_program", given, {"version": 9})
    assert given.version == 3                                       # the caller's message is not changed


def test_typed_methods_take_keywords_against_a_real_server(server):
    with LoyaltyClient(server.target) as client:
        member = client.get_member(member={"card": "7000002"})
        assert (member.card, member.active_points) == ("7000002", 250)
        program = client.get_program(version=0)
        assert program.current and program.program


def _names(segments) -> list[str]:
    return [s.id for s in segments]


def test_segments_come_page_by_page_in_id_order_without_repeats(server):
    ids = [f"page-{i:02d}" for i in (7, 3, 11, 0, 5)]
    with LoyaltyClient(server.target) as client:
        for sid in ids:
            client.create_segment(id=sid, type="static", title=sid)
        before = _names(client.list_segments(page_size=1000).segments)
        first = client.list_segments(page_size=2)
        assert len(first.segments) == 2 and first.next_page_token
        second = client.list_segments(page_size=2, page_token=first.next_page_token)
        assert _names(first.segments) + _names(second.segments) == before[:4]
        walked = _names(client.iter_segments(page_size=2))
    assert walked == before
    assert [s for s in walked if s.startswith("page-")] == sorted(ids)


def test_a_segments_members_walk_every_preview_page_by_id(server):
    with LoyaltyClient(server.target) as client:
        cards = [f"77{n:05d}" for n in (41, 7, 23, 3, 9)]
        members = [int(client.enroll_member(card=card, request_id=f"preview-{card}").member_id) for card in cards]
        client.create_segment(id="preview-walk", type="static", title="preview walk")
        client.add_members(id="preview-walk", members=cards, actor="typed-test")
        rows = list(client.iter_preview_members(id="preview-walk", columns=["member_id", "card"], page_size=2))
    assert [r.values[0] for r in rows] == [str(m) for m in sorted(members)]
    assert sorted(r.values[1] for r in rows) == sorted(cards)


def test_the_last_page_has_no_token_and_a_bad_token_or_size_names_the_field(server):
    with LoyaltyClient(server.target) as client:
        assert client.list_scenarios(page_size=1000).next_page_token == ""
        token = client.list_segments(page_size=1).next_page_token
        for bad in ("not-a-token", "eyJ4Ijox", token[:-3]):
            with pytest.raises(LoyaltyError) as err:
                client.list_segments(page_token=bad)
            assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "page_token")
        with pytest.raises(LoyaltyError) as err:        # a token of another list
            client.list_scenarios(page_token=token)
        assert err.value.field == "page_token"
        with pytest.raises(LoyaltyError) as err:
            client.list_segments(page_size=-1)
        assert err.value.field == "page_size"


def test_history_and_changes_page_newest_first(server):
    with LoyaltyClient(server.target) as client:
        client.create_segment(id="hist", type="updatable", conditions_json='{"points": {"active": {"gte": 300}}}')
        runs = [client.recalculate_segment(id="hist").id for _ in range(3)]
        assert [r.id for r in client.iter_history(id="hist", page_size=1)] == runs[::-1]
        assert [r.id for r in client.get_history(id="hist", limit=2).runs] == runs[:0:-1]   # old limit: a page
        client.create_segment(id="hand", type="static")
        for card in ("7000001", "7000002", "7000005"):
            client.add_members(id="hand", members=[card], actor="ops")
        changes = list(client.iter_changes(id="hand", page_size=2))
        newest = client.get_member(member={"card": "7000005"}).member_id     # a string in Member
    assert [c.action for c in changes] == ["add"] * 3
    assert len({c.member_id for c in changes}) == 3
    assert str(changes[0].member_id) == newest


def test_program_versions_and_dead_letters_page(server):
    with LoyaltyClient(server.target) as client:
        yaml = client.get_program(version=0).yaml
        for i in range(3):
            client.publish_program(yaml=yaml.replace("program:", f"# edit {i}\nprogram:", 1), comment=f"v{i}")
        every = [v.version for v in client.list_program_versions(page_size=1000).versions]
        assert [v.version for v in client.iter_program_versions(page_size=2)] == every
        assert every == sorted(every, reverse=True) and len(every) >= 4
        assert list(client.iter_dead_letters(page_size=5)) == []


def test_the_async_client_walks_pages_and_retries_nothing_on_bad_input(server):
    async def main():
        async with AsyncLoyaltyClient(server.target) as client:
            walked = [s.id async for s in client.iter_segments(page_size=3)]
            listed = (await client.list_segments(page_size=1000)).segments
            with pytest.raises(LoyaltyError) as err:
                await client.list_segments({"page_sise": 3})
            return walked, _names(listed), err.value
    walked, listed, err = asyncio.run(main())
    assert walked == listed and err.field == "page_sise"
