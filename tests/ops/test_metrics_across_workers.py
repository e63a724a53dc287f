"""``serve --workers 2 --metrics-port P``: one scrape of the parent's port sums what both worker processes did
(prometheus_client's multi-process mode), a directory left by an earlier run is emptied first, and each
worker's process series come through labelled by its pid."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import grpc
import pytest

from helpers.metrics import scrape
from loyalty.v1 import processing_pb2, processing_pb2_grpc
from serverutil import fresh_postgres_database, now_at, start_server

CONFIRMS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stale_file(directory) -> None:
    """What a crashed earlier run leaves: 1000 CalculateReceipt calls in a metrics file of a dead pid."""
    code = ("from loyalty.server.metrics import Metrics\n"
            "m = Metrics()\n"
            "for _ in range(1000): m.observe('CalculateReceipt', 'OK', 0.001)\n")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"})
    assert list(directory.glob("*.db"))


def _wait_for_both_workers(srv, timeout: float = 30) -> None:
    """Until both workers listen (the server is SERVING as soon as one does, and the kernel only spreads
    connections over the processes listening)."""
    deadline = time.monotonic() + timeout
    while not all(f"worker {i} (pid" in srv.log() for i in (0, 1)):
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)


def _confirm(number: int) -> processing_pb2.ConfirmPurchaseRequest:
    return processing_pb2.ConfirmPurchaseRequest(
        member={"card": f"700000{1 + number % 5}"},
        receipt={"store": "msk-01", "terminal": "pos-ops", "number": f"mw-{number}", "at": now_at(),
                 "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000, "price": 8990}]})


@pytest.mark.postgres
def test_one_scrape_sums_every_worker(tmp_path, monkeypatch):
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    _stale_file(metrics_dir)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    port = _free_port()
    channels = []
    with fresh_postgres_database() as url:
        srv = start_server(tmp_path, database_url=url, workers=2,
                           args=("--metrics-port", str(port), "--log-format", "json"))
        try:
            _wait_for_both_workers(srv)
            # A private subchannel pool per channel: each its own TCP connection, spread over both workers.
            channels = [grpc.insecure_channel(srv.target, options=[("grpc.use_local_subchannel_pool", 1)])
                        for _ in range(16)]
            stubs = [processing_pb2_grpc.ProcessingStub(c) for c in channels]
            for i in range(CONFIRMS):
                stubs[i % len(stubs)].ConfirmPurchase(_confirm(i), timeout=20)
            got = scrape(port)
        finally:
            for c in channels:
                c.close()
            assert srv.stop() == 0
    calls = [json.loads(line) for line in srv.log().splitlines() if '"method":"ConfirmPurchase"' in line]
    pids = {call["pid"] for call in calls}
    assert len(calls) == CONFIRMS and len(pids) == 2, f"the confirms landed on {pids}"

    assert got['loyalty_grpc_requests_total{method="ConfirmPurchase",code="OK"}'] == CONFIRMS
    assert got['loyalty_grpc_request_seconds_count{method="ConfirmPurchase"}'] == CONFIRMS
    assert 'loyalty_grpc_requests_total{method="CalculateReceipt",code="OK"}' not in got   # the stale file went
    assert got["loyalty_grpc_requests_in_flight"] == 0
    # group commit: every confirm in exactly one batch, whichever worker ran it
    assert got["loyalty_confirm_batched_total"] == CONFIRMS
    assert got["loyalty_confirm_batch_size_sum"] == CONFIRMS
    assert got["loyalty_confirm_batch_size_count"] == got["loyalty_confirm_batches_total"] >= 1
    # each worker's process series, by pid
    memory = got.matching("process_resident_memory_bytes")
    assert {dict(labels)["pid"] for labels in memory} == {str(pid) for pid in pids}
    assert all(value > 10_000_000 for value in memory.values())


def test_the_metrics_directory_we_made_is_removed_at_exit(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    port = _free_port()
    srv = start_server(tmp_path, workers=2, args=("--metrics-port", str(port)))
    try:
        made = list(tmp_path.glob("loyalty-metrics-*"))
        assert len(made) == 1 and list(made[0].glob("*.db"))
        assert scrape(port)["loyalty_grpc_requests_in_flight"] == 0
        assert re.search(r"metrics of all 2 workers at http://127\.0\.0\.1:\d+/metrics", srv.log())
    finally:
        assert srv.stop() == 0
    assert not list(tmp_path.glob("loyalty-metrics-*"))
