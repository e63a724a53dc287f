"""Request metrics (``loyalty.server.metrics``): the Prometheus text, the log summary, the HTTP responder, and
the group-commit counters a running PostgreSQL server exposes."""
from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest

from loyalty.server.metrics import BUCKETS, Metrics
from helpers.metrics import series
from serverutil import fresh_postgres_database, start_server


def test_requests_and_latency_render_as_prometheus_text():
    m = Metrics()
    for seconds in (0.0003, 0.0004, 0.003, 0.2):
        m.observe("CalculateReceipt", "OK", seconds)
    m.observe("CalculateReceipt", "INVALID_ARGUMENT", 0.0001)
    got = series(m.render())
    assert got['loyalty_grpc_requests_total{method="CalculateReceipt",code="OK"}'] == 4
    assert got['loyalty_grpc_requests_total{method="CalculateReceipt",code="INVALID_ARGUMENT"}'] == 1
    # cumulative buckets: 0.0001, 0.0003, 0.0004 <= 0.5 ms; 0.003 <= 5 ms; 0.2 <= 250 ms
    bucket = 'loyalty_grpc_request_seconds_bucket{method="CalculateReceipt",le="%s"}'
    assert got[bucket % "0.0005"] == 3
    assert got[bucket % "0.002"] == 3
    assert got[bucket % "0.005"] == 4
    assert got[bucket % "0.1"] == 4
    assert got[bucket % "0.25"] == 5
    assert got[bucket % "+Inf"] == 5
    assert len([k for k in got if k.startswith("loyalty_grpc_request_seconds_bucket")]) == len(BUCKETS) + 1
    assert got['loyalty_grpc_request_seconds_count{method="CalculateReceipt"}'] == 5
    assert got['loyalty_grpc_request_seconds_sum{method="CalculateReceipt"}'] == pytest.approx(0.2038)
    assert "# TYPE loyalty_grpc_request_seconds histogram" in m.render()


def test_counters_of_other_parts_are_rendered_and_summarised_as_deltas():
    m = Metrics()
    state = {"batches": 0, "items": 0}
    m.add_counters(lambda: {"loyalty_confirm_batches_total": ("batches", state["batches"]),
                            "loyalty_confirm_batched_total": ("confirms", state["items"])})
    assert m.summary() is None                  # no traffic, no line
    for _ in range(6):
        m.observe("ConfirmPurchase", "OK", 0.02)
    state.update(batches=2, items=6)
    text = m.render()
    assert "# TYPE loyalty_confirm_batches_total counter" in text
    assert series(text)["loyalty_confirm_batches_total"] == 2
    assert series(text)["loyalty_confirm_batched_total"] == 6
    line = m.summary()
    assert "ConfirmPurchase: OK=6" in line and "confirm batches: 2 of 3.0 on average" in line
    # the next summary counts only what happened since
    for _ in range(4):
        m.observe("ConfirmPurchase", "OK", 0.02)
    state.update(batches=3, items=10)
    line = m.summary()
    assert "ConfirmPurchase: OK=4" in line and "confirm batches: 1 of 4.0 on average" in line
    assert m.summary() is None


def test_http_responder_answers_get_and_refuses_other_methods():
    async def main():
        m = Metrics()
        m.observe("GetMember", "NOT_FOUND", 0.001)
        server = await m.serve_http("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def ask(request: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            data = await reader.read()
            writer.close()
            return data

        got = await ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        refused = await ask(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        server.close()
        return got, refused

    got, refused = asyncio.run(main())
    head, body = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"text/plain; version=0.0.4" in head
    assert series(body.decode())['loyalty_grpc_requests_total{method="GetMember",code="NOT_FOUND"}'] == 1
    assert refused.startswith(b"HTTP/1.1 405")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.postgres
def test_a_postgresql_server_exposes_its_confirm_batches(tmp_path):
    port = _free_port()
    with fresh_postgres_database() as url:
        server = start_server(tmp_path, database_url=url, args=("--metrics-port", str(port)))
        try:
            with server.client(retries=0) as client:
                for i in range(5):
                    client.confirm_purchase({
                        "member": {"card": "7000002"},
                        "receipt": {"store": "msk-01", "terminal": "pos-m", "number": f"m-{i}",
                                    "at": "2026-03-02T12:30:00+03:00",
                                    "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000,
                                               "price": 8990}]}})
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                got = series(response.read().decode())
        finally:
            server.stop()
    assert got['loyalty_grpc_requests_total{method="ConfirmPurchase",code="OK"}'] == 5
    assert got["loyalty_confirm_batched_total"] == 5        # one after another: five batches of one
    assert got["loyalty_confirm_batches_total"] == 5
