"""OpenTelemetry traces (``loyalty.server.tracing``), with the SDK's in-memory exporter (no network): a confirm
is a server span of the standard gRPC instrumentation, the edge's ``confirm`` span under it and the ``storage``
span of its transaction under that, all one trace; off (the default), nothing of OpenTelemetry is loaded."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from loyalty.server.grpc_server import LoyaltyServer, ServeConfig
from loyalty.server.tracing import Tracing
from loyalty.v1 import processing_pb2, processing_pb2_grpc
from serverutil import cli, now_at

RECEIPT = {"store": "msk-01", "terminal": "pos-t", "number": "t-1", "at": now_at(),
           "lines": [{"sku": "milk-1l", "categories": ["dairy"], "quantity": 1000, "price": 8990}]}


def _serve_and_call(service, url: str, tracing: Tracing, *requests, together: bool = False) -> None:
    """An in-process server with ``tracing``; each ``(method, request)`` called once over a real channel, one
    after the other or, ``together``, all at once."""
    async def main():
        server = LoyaltyServer(service, ServeConfig(database_url=url, port=0), tracing=tracing)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = processing_pb2_grpc.ProcessingStub(channel)
                if together:
                    await asyncio.gather(*(getattr(stub, m)(request, timeout=10) for m, request in requests))
                else:
                    for method, request in requests:
                        await getattr(stub, method)(request, timeout=10)
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_a_confirm_is_a_server_span_a_confirm_span_and_storage_spans_in_one_trace(sqlite_service):
    service, url = sqlite_service
    exporter = InMemorySpanExporter()
    _serve_and_call(service, url, Tracing(exporter),
                    ("ConfirmPurchase", processing_pb2.ConfirmPurchaseRequest(receipt=RECEIPT)))
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == ["/loyalty.v1.Processing/ConfirmPurchase"]
    server = servers[0]
    trace = [s for s in spans if s.context.trace_id == server.context.trace_id]
    (confirm,) = [s for s in trace if s.name == "confirm"]
    assert confirm.parent.span_id == server.context.span_id
    storage = [s for s in trace if s.name == "storage"]
    assert storage, [s.name for s in trace]
    assert all(s.parent.span_id == confirm.context.span_id for s in storage)
    assert all(s.attributes["db.system"] == "sqlite" for s in storage)
    assert "commit" in {s.attributes["db.outcome"] for s in storage}      # the purchase was written
    assert all(server.start_time <= s.start_time and s.end_time <= server.end_time for s in trace)


@pytest.mark.postgres
def test_a_group_commit_is_a_batch_span_linked_to_every_confirm_it_wrote(postgres_service):
    """On PostgreSQL 12 confirms sent at once are written by group commit: each batch's transaction (a
    ``storage`` span) is a child of a ``confirm_batch`` span whose links are the ``confirm`` spans of exactly
    the confirms it wrote, so every confirm is reachable from one batch and the sizes add up to 12."""
    service, url = postgres_service
    exporter = InMemorySpanExporter()
    _serve_and_call(service, url, Tracing(exporter), *[
        ("ConfirmPurchase", processing_pb2.ConfirmPurchaseRequest(receipt={**RECEIPT, "number": f"g-{i}"}))
        for i in range(12)], together=True)
    spans = exporter.get_finished_spans()
    confirms = {s.context.span_id: s for s in spans if s.name == "confirm"}
    batches = [s for s in spans if s.name == "confirm_batch"]
    assert len(confirms) == 12 and batches
    linked = [link.context.span_id for b in batches for link in b.links]
    assert sorted(linked) == sorted(confirms)                      # every confirm once, nothing else
    assert sum(b.attributes["batch.size"] for b in batches) == 12
    for b in batches:
        assert {link.context.trace_id for link in b.links} == {confirms[link.context.span_id].context.trace_id
                                                               for link in b.links}
        storage = [s for s in spans if s.name == "storage" and s.parent is not None
                   and s.parent.span_id == b.context.span_id]
        assert [s.attributes["db.outcome"] for s in storage] == ["commit"]
        assert storage[0].attributes["db.system"] == "postgresql"


def test_a_calculate_has_its_span_under_the_server_span_and_other_methods_only_the_server_span(sqlite_service):
    service, url = sqlite_service
    exporter = InMemorySpanExporter()
    _serve_and_call(service, url, Tracing(exporter),
                    ("CalculateReceipt", processing_pb2.CalculateReceiptRequest(receipt=RECEIPT)),
                    ("EnrollMember", processing_pb2.EnrollMemberRequest(card="7100001", request_id="t-e")))
    spans = exporter.get_finished_spans()
    server = {s.name: s for s in spans if s.kind == SpanKind.SERVER}
    assert set(server) == {"/loyalty.v1.Processing/CalculateReceipt", "/loyalty.v1.Processing/EnrollMember"}
    (calculate,) = [s for s in spans if s.name == "calculate"]
    assert calculate.parent.span_id == server["/loyalty.v1.Processing/CalculateReceipt"].context.span_id
    assert not [s for s in spans if s.name == "confirm"]
    enroll = server["/loyalty.v1.Processing/EnrollMember"]
    under_enroll = [s for s in spans if s.parent is not None and s.parent.span_id == enroll.context.span_id]
    assert under_enroll and {s.name for s in under_enroll} == {"storage"}     # its transaction, straight under


def test_off_by_default_nothing_of_opentelemetry_is_loaded(sqlite_url):
    code = f"""
import sys
from loyalty.server import db
from loyalty.server.grpc_server import LoyaltyServer, ServeConfig
from loyalty.server.processing import ProcessingService
db.upgrade({sqlite_url!r})
service = ProcessingService.open({sqlite_url!r})
server = LoyaltyServer(service, ServeConfig(database_url={sqlite_url!r}, port=0))
assert server.tracing is None
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
print("untraced")
"""
    env_clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env_clean)
    assert done.returncode == 0 and done.stdout.strip() == "untraced", done.stderr


def test_an_otlp_endpoint_in_the_environment_turns_tracing_on(monkeypatch):
    from loyalty.server.tracing import wanted
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert not wanted(False) and wanted(True)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert wanted(False)


def test_traces_asked_for_without_the_packages_is_one_clear_line(tmp_path):
    # an ``opentelemetry`` package that cannot be imported, ahead of the installed one
    fake = tmp_path / "site" / "opentelemetry"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('opentelemetry is not installed (simulated)')\n")
    for how in (("--otel",), ()):
        env = {"PYTHONPATH": str(fake.parent)}
        if not how:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:4317"
        done = cli("serve", *how, "--port", "0", "--data-dir", str(tmp_path / "d"), env=env)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "loyalty-server[otel]" in lines[0] and "Traceback" not in done.stderr, lines
