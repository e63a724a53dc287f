"""The series of one server process (``--metrics-port`` without workers): calls in flight counted while they
run, and the library's process and runtime series beside the request series; a taken metrics port with
``--workers`` is one clear line."""
from __future__ import annotations

import asyncio
import socket
import threading

import grpc

from helpers.metrics import scrape, series
from loyalty.server.grpc_server import LoyaltyServer, ServeConfig
from loyalty.v1 import processing_pb2
from serverutil import cli, start_server


def test_calls_in_flight_are_counted_while_they_run(sqlite_service):
    service, url = sqlite_service
    release = threading.Event()
    entered = threading.Semaphore(0)

    def wait(request):
        entered.release()
        release.wait(10)
        return processing_pb2.GetMemberRequest()

    async def main():
        server = LoyaltyServer(service, ServeConfig(database_url=url, port=0))
        server.add_module_service("test.Blocking", {"Wait": (processing_pb2.GetMemberRequest, wait, False)})
        port = await server.start()
        gauge = "loyalty_grpc_requests_in_flight"
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Blocking/Wait")
                before = series(server.metrics.render())[gauge]
                calls = [asyncio.ensure_future(call(b"", timeout=10)) for _ in range(3)]
                for _ in range(3):
                    await asyncio.get_running_loop().run_in_executor(None, entered.acquire)
                during = series(server.metrics.render())[gauge]
                release.set()
                await asyncio.gather(*calls)
                after = series(server.metrics.render())
        finally:
            await server.stop(0)
        return before, during, after

    before, during, after = asyncio.run(main())
    assert (before, during, after["loyalty_grpc_requests_in_flight"]) == (0, 3, 0)
    assert after['loyalty_grpc_requests_total{method="Wait",code="OK"}'] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_exposes_process_and_runtime_series(tmp_path):
    port = _free_port()
    srv = start_server(tmp_path, args=("--metrics-port", str(port)))
    try:
        with srv.client() as client:
            client.get_member({"member": {"card": "7000001"}})
        got = scrape(port)
    finally:
        assert srv.stop() == 0
    assert got['loyalty_grpc_requests_total{method="GetMember",code="OK"}'] == 1
    assert got["process_resident_memory_bytes"] > 10_000_000
    assert got["process_cpu_seconds_total"] > 0
    assert got.matching("python_gc_collections_total")
    assert "loyalty_confirm_batches_total" not in got          # SQLite: no group commit, no such series


def test_a_taken_metrics_port_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--workers", "2",
                   "--metrics-port", str(port), timeout=60)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"metrics port {port}" in lines[0] and "Traceback" not in done.stderr, done.stderr
