"""OpenTelemetry traces, an option (``serve --otel``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` set; the packages come
with the ``[otel]`` extra).

What a trace of a call holds:

- the server span of the standard gRPC instrumentation (``opentelemetry-instrumentation-grpc``'s grpc.aio
  server interceptor: method, status code, peer; a caller's ``traceparent`` makes it a child of the caller's);
- ``calculate`` / ``confirm``: the edge's work on a CalculateReceipt / ConfirmPurchase, decode to answer;
- ``storage``: every database transaction, BEGIN to COMMIT or ROLLBACK (SQLAlchemy's connection events, on every
  engine of the process; attributes ``db.system`` and ``db.outcome``), a child of the span current in the thread
  that began it. The edge carries the call's context into the pool thread that runs it, so a confirm's
  transaction is a child of its ``confirm``;
- ``confirm_batch``: with group commit (PostgreSQL) one transaction serves many confirms on the batcher's thread,
  so it cannot be the child of each: it runs under a ``confirm_batch`` span (attribute ``batch.size``) that
  links to the ``confirm`` span of every confirm in the batch; its ``storage`` span is its child. A trace
  viewer follows the links from the batch to the confirms it wrote.

Export: OTLP over gRPC (``opentelemetry-exporter-otlp-proto-grpc``; endpoint, headers and the service name from the
standard ``OTEL_*`` variables), through a batching processor, so a call never waits for the collector. Tests
pass their own exporter (the SDK's in-memory one).

Off (the default) it costs nothing: no interceptor is installed, no listener is registered, no handler is
wrapped, and the OpenTelemetry packages are not even imported.
"""
from __future__ import annotations

import os

__all__ = ["Tracing", "wanted", "missing", "SPAN_NAMES"]

# The edge's spans, by gRPC method.
SPAN_NAMES = {"CalculateReceipt": "calculate", "ConfirmPurchase": "confirm"}


def wanted(flag: bool) -> bool:
    """Tracing is on with ``--otel`` or when an OTLP endpoint is configured in the environment."""
    return flag or bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
                        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def missing() -> str | None:
    """Why traces cannot be made here (the packages of the ``[otel]`` extra are not installed), or None."""
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        import opentelemetry.instrumentation.grpc  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        return f"traces need the OpenTelemetry packages: pip install 'loyalty-server[otel]' ({exc})"
    return None


class Tracing:
    """A tracer provider with its exporter, the gRPC server interceptor, and the storage spans."""

    def __init__(self, exporter=None):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        self.provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get(
            "OTEL_SERVICE_NAME", "loyalty-server")}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("loyalty.server")
        self._listening = False
        self._listeners = self._storage_listeners()

    def interceptors(self) -> list:
        """The standard grpc.aio server interceptor, for ``grpc.aio.server(interceptors=...)``."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        return [aio_server_interceptor(tracer_provider=self.provider)]

    def traced(self, method: str, handler):
        """``handler`` (a grpc.aio unary handler) in a span named for ``method`` when it has one."""
        name = SPAN_NAMES.get(method)
        if name is None:
            return handler
        tracer = self.tracer

        async def traced_handler(raw: bytes, context):
            with tracer.start_as_current_span(name, attributes={"rpc.method": method}):
                return await handler(raw, context)

        traced_handler.__name__ = handler.__name__
        return traced_handler

    def batch_hooks(self) -> tuple:
        """``(capture, around)`` for a ``Batcher``: ``capture()`` takes the submitting thread's span context;
        ``around(batch)`` is the ``confirm_batch`` span, linked to the valid ones among them."""
        from opentelemetry import trace
        tracer = self.tracer

        def capture():
            return trace.get_current_span().get_span_context()

        def around(batch):
            links = [trace.Link(s.origin) for s in batch if s.origin is not None and s.origin.is_valid]
            return tracer.start_as_current_span("confirm_batch", links=links,
                                                attributes={"batch.size": len(batch)})
        return capture, around

    # ---- storage spans --------------------------------------------------------------------------------------

    def watch_storage(self) -> None:
        """A ``storage`` span for every transaction of every SQLAlchemy engine of the process."""
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        for name, fn in self._listeners:
            event.listen(Engine, name, fn)
        self._listening = True

    def _storage_listeners(self) -> tuple:
        """The connection events that open and close a ``storage`` span (kept in the connection's ``info``)."""
        tracer = self.tracer

        def begin(conn) -> None:
            conn.info["loyalty.storage_span"] = tracer.start_span(
                "storage", attributes={"db.system": conn.engine.dialect.name})

        def ended(outcome: str):
            def end(conn) -> None:
                span = conn.info.pop("loyalty.storage_span", None)
                if span is not None:
                    span.set_attribute("db.outcome", outcome)
                    span.end()
            return end

        return ("begin", begin), ("commit", ended("commit")), ("rollback", ended("rollback"))

    def close(self) -> None:
        """Stop the storage spans and flush what is left to the exporter."""
        if self._listening:
            from sqlalchemy import event
            from sqlalchemy.engine import Engine
            for name, fn in self._listeners:
                event.remove(Engine, name, fn)
            self._listening = False
        self.provider.shutdown()

