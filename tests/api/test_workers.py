"""``loyalty serve --workers 2``: two processes share the port (SO_REUSEPORT), and a program published
through one of them is what every process calculates with within a second (SPEC 10, Scale-out)."""
from __future__ import annotations

import time

import grpc

from loyalty.server.demo import DEMO_PROGRAM_PATH
from loyalty.v1 import processing_pb2, processing_pb2_grpc
from serverutil import now_at, start_server

REQUEST = processing_pb2.CalculateReceiptRequest(receipt={
    "store": "msk-01", "terminal": "pos-1", "number": "w", "at": now_at(),
    "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000, "price": 8990}]})


def test_published_program_reaches_every_worker_within_a_second(tmp_path):
    srv = start_server(tmp_path, workers=2)
    channels = []
    try:
        # A private subchannel pool per channel: without it gRPC would share one TCP connection (one worker).
        channels = [grpc.insecure_channel(srv.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(16)]
        stubs = [processing_pb2_grpc.ProcessingStub(c) for c in channels]
        for stub in stubs:                                        # connect them all before the clock starts
            assert stub.CalculateReceipt(REQUEST, timeout=10).answer.program_version == 1
        with srv.client() as client:
            published = client.publish_program({"yaml": DEMO_PROGRAM_PATH.read_text() + "\n# v2\n",
                                                "comment": "workers test"})
        t0 = time.monotonic()
        assert published.version == 2
        pending = set(range(len(stubs)))
        while pending and time.monotonic() - t0 < 3:
            for i in list(pending):
                if stubs[i].CalculateReceipt(REQUEST, timeout=5).answer.program_version == 2:
                    pending.discard(i)
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        assert not pending, f"{len(pending)} connections still on version 1 after {elapsed:.2f}s"
        assert elapsed <= 1.0, f"took {elapsed:.2f}s"
        log = srv.log()
        assert "worker 0" in log and "worker 1" in log        # both processes were up
    finally:
        for c in channels:
            c.close()
        assert srv.stop() == 0
