"""``ExportMembersStream``: the members' CSV arrives in chunks of whole rows as the server reads them (the
server's streaming handler, the asyncio and blocking clients, ``loyalty segments export --server``), equal
to what the unary ``ExportMembers`` answers; a bad request fails before any chunk."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from helpers.segments import add_member
from loyalty.clients import AsyncLoyaltyClient, LoyaltyClient, LoyaltyError
from loyalty.server.grpc_server import LoyaltyServer, ServeConfig
from loyalty.server.processing import ProcessingService
from loyalty.server.segments import service as segment_service
from serverutil import cli, start_server


async def _serve_and(url: str, body):
    """Run ``body(target)`` against an in-process server on ``url`` (so the test can shrink the chunk)."""
    service = ProcessingService.open(url)
    server = LoyaltyServer(service, ServeConfig(database_url=url, port=0))
    port = await server.start()
    try:
        return await body(f"127.0.0.1:{port}")
    finally:
        await server.stop(0)


def test_the_export_streams_in_chunks_of_whole_rows(sqlite_url, monkeypatch):
    monkeypatch.setattr(segment_service, "_CHUNK", 3)
    service = ProcessingService.open(sqlite_url)
    with service.db.engine.begin() as conn:
        for mid in range(1, 11):
            add_member(conn, mid, active=100 * mid)
    service.close()
    expected = "member_id,card,active_points\r\n" + "".join(f"{m},C{m},{100 * m}\r\n" for m in range(1, 11))

    async def body(target):
        async with AsyncLoyaltyClient(target) as client:
            await client.create_segment(id="all", type="updatable",
                                        conditions_json='{"points": {"active": {"gte": 0}}}')
            await client.recalculate_segment(id="all")
            chunks = [c async for c in client.export_members_stream(
                id="all", columns=["member_id", "card", "active_points"])]
            whole = await client.export_members(id="all", columns=["member_id", "card", "active_points"])
            with pytest.raises(LoyaltyError) as err:
                [c async for c in client.export_members_stream(id="all", columns=["card", "shoe_size"])]
            return chunks, whole, err.value

    chunks, whole, err = asyncio.run(_serve_and(sqlite_url, body))
    assert [c.count for c in chunks] == [3, 3, 3, 1]
    assert all(c.csv.endswith(b"\r\n") for c in chunks)                 # whole rows in every chunk
    assert b"".join(c.csv for c in chunks).decode() == expected == whole.csv.decode()
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "shoe_size" in err.message


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("export"))
    yield srv
    srv.stop()


def test_the_blocking_client_and_the_cli_write_the_stream_as_it_arrives(server, tmp_path):
    with LoyaltyClient(server.target) as client:
        client.create_segment(id="moscow", type="updatable", conditions_json='{"city": {"eq": "Moscow"}}')
        client.recalculate_segment(id="moscow")
        chunks = list(client.export_members_stream(id="moscow", columns=["card", "city"]))
        with pytest.raises(LoyaltyError) as err:
            list(client.export_members_stream(id="nowhere"))
    assert b"".join(c.csv for c in chunks) == b"card,city\r\n7000001,Moscow\r\n7000002,Moscow\r\n7000005,Moscow\r\n"
    assert sum(c.count for c in chunks) == 3
    assert err.value.code == grpc.StatusCode.NOT_FOUND

    out = tmp_path / "moscow.csv"
    done = cli("segments", "export", "moscow", "--columns", "card,city", "--server", server.target, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"".join(c.csv for c in chunks)
    assert "3 members written" in done.stderr
    missing = cli("segments", "export", "nowhere", "--server", server.target)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "NOT_FOUND" in missing.stderr
