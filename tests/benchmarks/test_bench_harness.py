"""The server benchmark's load generator sends what it says: the requests it splices from a template are the
very bytes protobuf serializes for the message it describes."""
from __future__ import annotations

import importlib.util
import pathlib

from loyalty.v1 import processing_pb2

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "server.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_server", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_confirm_requests_are_protobufs_bytes_with_a_unique_number_and_a_rotating_card():
    bench = _bench()
    make = bench.request_maker("confirm", "s1")
    seen = set()
    for i in (0, 1, 15):
        for n in (0, 1, 9, 10, 63, 64, 12345, 999_999_999):
            want = processing_pb2.ConfirmPurchaseRequest(
                member={"card": f"bench-{(i * 7919 + n) % bench.MEMBERS:04d}"},
                receipt={"store": "msk-01", "terminal": f"bench-s1-{i}", "number": f"{n:09d}", "at": bench.AT,
                         "lines": bench.fixed_lines()})
            assert make(i, n) == want.SerializeToString()
            seen.add((i, n))
    assert len(seen) == 24


def test_calculate_and_echo_send_one_fixed_request():
    bench = _bench()
    for scenario in ("echo", "calculate"):
        make = bench.request_maker(scenario, "s2")
        request = processing_pb2.CalculateReceiptRequest.FromString(make(0, 0))
        assert make(5, 7) == make(0, 0)
        assert request.member.card == "7000001" and len(request.receipt.lines) == 20
