"""The gRPC edge: ``loyalty.v1.Processing`` and ``loyalty.v1.Admin`` over grpc.aio, in front of the synchronous
:class:`~loyalty.server.processing.ProcessingService`.

This module only moves bytes and maps outcomes; everything the business cares about (validation beyond the
wire format, idempotency, concurrency) lives in the service and its storage transactions. Per request:

    raw bytes -> decode (bad wire format: INVALID_ARGUMENT) -> service method in a thread pool -> bytes
    ServiceError -> its status code + a rich detail (google.rpc.BadRequest / ErrorInfo / PreconditionFailure)
    anything else -> INTERNAL "internal error <incident>" (the traceback goes to the log, never to the client)

``CalculateReceipt``, the call a checkout makes many times per receipt, builds no message objects: the
compiled codec (``convert.decode_receipt_request`` / ``encode_calculate_response``, i.e.
``loyalty.server._wire``) reads the request bytes straight into the core's dicts (checking on the way whether
every string fits storage; when it says so, ``fits``, the service need not check again) and writes the answer
dict straight into the response bytes, and the call runs on the event loop itself whenever the service can answer
from memory (``calculate_answer(..., wait=False)``: the member's context cached, the program snapshot and
budget figures fresh), which saves the thread hop; otherwise, and never blocking the loop on storage, it runs
in the CPU pool. ``ConfirmPurchase`` shares the codec (its request has the same layout); with group commit
(PostgreSQL) the handler validates on the loop, hands the confirm to the batcher and awaits its future, so no
thread waits for the batch; without it (SQLite) it runs in the I/O pool. ``LOYALTY_CALCULATE_IN_POOL=1``
sends every call to the pool (to compare). Against the bare echo server on 2 shared cores (medians of
interleaved rounds of ``benchmarks/server.py``'s load) this runs at about 0.7-0.75x its calls per second
(single rounds 0.6-0.9x) with 1.3-1.5x its p99, the server spending about 1.4x echo's CPU a call (e.g. 245 us
to 175 us; our own code is about a tenth of the server's samples, gRPC the rest); through protobuf messages in
the pool it was 0.6x, 1.5x and 2.3x.

Two bounded pools, because the two kinds of work differ: ``CalculateReceipt`` is short and CPU-bound (it
holds the GIL, so more threads than cores only add switching; a few threads still overlap its member read),
the other calls wait on the database (a pool about the size of the connection pool lets them overlap).
The number of calls in flight is bounded by ``maximum_concurrent_rpcs``; beyond it gRPC answers
RESOURCE_EXHAUSTED instead of queueing without end. A call whose client gave up still finishes its
transaction in its thread: every write is idempotent by its key, so the client's retry gets the stored answer.

Health (``grpc.health.v1``): SERVING while ``service.check_ready()`` says storage answers (checked every
``health_interval`` seconds), NOT_SERVING when it does not and from the moment shutdown starts. Reflection is
on, admin-only with ``--auth required`` (``ServeConfig.reflection``). SIGTERM / SIGINT: NOT_SERVING, stop taking
calls, finish those in flight within ``grace`` seconds; SIGHUP: reload the TLS certificates.

Security (``loyalty.server.security``): ``--auth required`` identifies the caller of every call but health
(``security.edge.Gate``: API key, OIDC token or client certificate) and holds it to the method's scope and,
for a store-bound ``pos`` credential, the request's store, before the request is decoded; the work then runs
as that principal (``security.acting_as``, on the loop or on the pool thread). TLS (``security.tls``) with
optional client certificates, reloaded on SIGHUP.
``workers > 1``: that many processes bind the same port (SO_REUSEPORT; the kernel spreads connections) under
a parent that forwards signals and waits.

What operators see of a call (README, Operating): its request id (``logs``: the caller's ``x-request-id`` or a new
one, always sent back in the trailing metadata), one log line, the Prometheus series (``metrics``; with workers
and ``--metrics-port`` the parent serves every worker's, from prometheus_client's multi-process directory it
manages) and, with ``--otel``, its spans (``tracing``; off, no interceptor and no wrapper exist at all).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import gc
import hashlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import uuid
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from loyalty.server.convert import decode_receipt_request, encode_calculate_response, encode_confirm_response
from loyalty.server.db import deadline as db_deadline
from loyalty.server.errors import InvalidArgument, ServiceError
from loyalty.server.grpc_register import snake
from loyalty.server.logs import REQUEST_ID, configure_logging, request_id
from loyalty.server.metrics import Metrics
from loyalty.server.security import LOCAL, acting_as
from loyalty.server.security.edge import SCOPE_OF, authorize, authorize_store
from loyalty.server.security.grpc_service import add_keys_service
from loyalty.server.scenarios.grpc_service import add_scenarios_service
from loyalty.server.security import audit
from loyalty.server.segments.grpc_service import add_segments_service
from loyalty.server.status import internal_status, status_for
from loyalty.server.tracing import wanted as tracing_wanted
from loyalty.v1 import admin_pb2, processing_pb2

if TYPE_CHECKING:
    from loyalty.server.processing import ProcessingService

__all__ = ["ServeConfig", "LoyaltyServer", "SERVICE_NAMES", "serve", "run_server", "check_serving"]

log = logging.getLogger("loyalty.server.grpc")

PROCESSING = "loyalty.v1.Processing"
ADMIN = "loyalty.v1.Admin"
SEGMENTS = "loyalty.v1.Segments"
SCENARIOS = "loyalty.v1.Scenarios"
KEYS = "loyalty.v1.Keys"
SERVICE_NAMES = (PROCESSING, ADMIN, SEGMENTS, SCENARIOS, KEYS)

# Methods that run in the CPU pool; every other one waits on storage and runs in the I/O pool.
CPU_METHODS = frozenset({"CalculateReceipt"})
# The storage time of a call that sent no deadline: $LOYALTY_STORAGE_TIMEOUT_S (a call's own deadline rules).
STORAGE_TIMEOUT_S = float(os.environ.get("LOYALTY_STORAGE_TIMEOUT_S", "60") or 60)


def _bounded(until: float, principal, call, request):
    """``call(request)`` on a pool thread, as ``principal`` (``security.current()``), its storage work bounded
    by ``until`` (``db.deadline``)."""
    with db_deadline(until), acting_as(principal):
        return call(request)


def _audit_refusal(db, rpc: str, principal, decode, raw: bytes, code: str, detail: str) -> None:
    """The audit row of an admin call refused for its credential (before its request was read)."""
    try:
        request = decode(raw)
    except Exception:  # noqa: BLE001 - bytes that are not the request: recorded by their digest alone
        request = None
    audit.record_refusal(db, principal, rpc, audit.target_of(rpc, request) if request is not None else "",
                         audit.digest(request) if request is not None else hashlib.sha256(raw).hexdigest(), code,
                         detail)


# The store a pos credential must be bound to, per method: (where it is in the decoded request, its field).
def _receipt_store(request) -> tuple[str, str]:
    """Of the decoded ``(card, phone, receipt dict, fits)``, or of the message (a service without group commit)."""
    return (request[2]["store"] if type(request) is tuple else request.receipt.store), "receipt.store"


def _purchase_store(request) -> tuple[str, str]:
    return request.purchase.store, "purchase.store"


STORE_OF = {"CalculateReceipt": _receipt_store, "ConfirmPurchase": _receipt_store,
            "RefundPurchase": _purchase_store, "CancelPurchase": _purchase_store}


def _next_chunk(chunks):
    """The next message of a streaming method's generator, None after the last."""
    return next(chunks, None)


def _close_when_done(pending: concurrent.futures.Future | None, chunks) -> None:
    """Close a stream's generator (its database read ends) once no pool thread is inside it any more."""
    if pending is None:
        chunks.close()
    else:
        pending.add_done_callback(lambda _future: chunks.close())


def _code_of(exc: BaseException) -> str:
    """The code a failed call is counted under: a domain error's, CANCELLED when the call was cancelled (or
    its stream closed), else INTERNAL."""
    if isinstance(exc, ServiceError):
        return exc.code
    return "INTERNAL" if isinstance(exc, Exception) else "CANCELLED"


async def _end_failed(context, method: str, exc: BaseException, code: str, where: str) -> None:
    """End a call that failed: a cancellation goes on as it was raised; a domain error becomes its status
    (logged at INFO, or WARNING when storage is the cause), anything else INTERNAL with an incident id (the
    traceback in the log, never to the client)."""
    if not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, ServiceError):
        level = logging.WARNING if code in ("UNAVAILABLE", "INTERNAL") else logging.INFO
        log.log(level, "%s %s %s: %s", method, code, where or "-", exc.message)
        status = status_for(exc)
    else:
        incident = uuid.uuid4().hex[:12]
        log.error("%s INTERNAL incident=%s %s", method, incident, where or "-", exc_info=exc)
        status = internal_status(incident)
    await context.abort_with_status(status)


class _Health(health.aio.HealthServicer):
    """grpcio-health-checking's asyncio servicer, plus ``List`` (its own answers UNIMPLEMENTED, with a
    traceback in the log): every service's status, as ``Check`` answers it, kept as the statuses are set."""

    def __init__(self):
        super().__init__()
        self._statuses = {"": health_pb2.HealthCheckResponse.SERVING}
        self._final = False

    async def set(self, service: str, status) -> None:
        if not self._final:
            self._statuses[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._final = True
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._statuses.items()})


# grpcio-reflection implements v1alpha only; v1 (grpc.reflection.v1.ServerReflection, what current grpcurl,
# Postman and grpcui ask first) is the same protocol with the package renamed: identical messages, field
# numbers and semantics, so the v1alpha servicer answers it, registered under the v1 name.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server, service_names: tuple[str, ...], guarded=None) -> None:
    """Serve reflection as ``grpc.reflection.v1`` and ``v1alpha``, both listing ``service_names`` and
    themselves; ``guarded(names)``: the servicer to use instead of the open one (admin credentials only)."""
    names = service_names + (REFLECTION_V1, reflection.SERVICE_NAME)
    servicer = guarded(names) if guarded is not None else reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(tuple(grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
                                          for name in (REFLECTION_V1, reflection.SERVICE_NAME)))


@dataclasses.dataclass
class ServeConfig:
    database_url: str
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str | None = None
    workers: int = 1
    cpu_threads: int = 0            # 0: min(4, cores + 1)
    io_threads: int = 16            # about the database connection pool: more would only wait for a connection
    max_concurrent_rpcs: int = 1024
    grace: float = 10.0
    health_interval: float = 2.0
    metrics_port: int | None = None
    metrics_log_interval: float = 60.0
    metrics_shared: bool = False    # a worker of several: its series go to the parent's multi-process directory
    log_format: str = "text"        # or "json" (``logs.configure_logging``)
    access_log: bool = True         # a log line for every call, OK ones included (``logs``)
    otel: bool = False              # OpenTelemetry traces (``tracing``; also on with OTEL_EXPORTER_OTLP_ENDPOINT)
    reuse_port: bool = False        # set for workers; a single process refuses a port that is taken
    # security (issue 13; README "Security")
    auth: str = "off"               # "required": every call but health carries a credential
    tls: object | None = None       # security.tls.TlsFiles
    insecure: bool = False          # listen beyond loopback without auth and TLS anyway
    reflection: str = "admin"       # open / admin (an admin credential, when auth is required) / off
    oidc: dict | None = None        # OidcVerifier's arguments: issuer, audience, roles, client, refresh_interval


def request_key(request) -> str:
    """What an operator greps for: the idempotency key or the card of a request ("" when it has none)."""
    receipt = getattr(request, "receipt", None)
    if receipt is not None and (receipt.store or receipt.terminal or receipt.number):
        key = f"receipt={receipt.store}/{receipt.terminal}/{receipt.number}"
    else:
        purchase = getattr(request, "purchase", None)
        key = f"purchase={purchase.store}/{purchase.terminal}/{purchase.number}" if purchase is not None else ""
    for field in ("refund_id", "operation_id", "request_id"):
        value = getattr(request, field, "")
        if value:
            key += f" {field}={value}"
    member = getattr(request, "member", None)
    card = getattr(member, "card", "") or getattr(request, "card", "")
    if card:
        key += f" card={card}"
    return key.strip()


def _calculate_key(request: tuple[str, str, dict, bool]) -> str:
    """``request_key`` of a decoded ``CalculateReceiptRequest`` (``(card, phone, receipt dict, fits)``)."""
    card, _phone, receipt, _fits = request
    key = ""
    if receipt["store"] or receipt["terminal"] or receipt["number"]:
        key = f"receipt={receipt['store']}/{receipt['terminal']}/{receipt['number']}"
    if card:
        key += f" card={card}"
    return key.strip()


# ---- request and response bytes -------------------------------------------------------------------------------

def _message_decoder(request_cls):
    full_name = request_cls.DESCRIPTOR.full_name

    def decode(raw: bytes):
        try:
            return request_cls.FromString(raw)
        except DecodeError:
            raise InvalidArgument("", f"not a valid {full_name} message") from None
    return decode


def _serializing(fn):
    def call(request) -> bytes:
        return fn(request).SerializeToString()
    return call


def _dict_decoder(full_name: str):
    """The request bytes of CalculateReceipt or ConfirmPurchase (both ``member = 1, receipt = 2``) straight to
    ``(card, phone, receipt dict, fits)`` (the compiled codec; ``fits``: the strings need no storage check)."""
    def decode(raw: bytes) -> tuple[str, str, dict, bool]:
        try:
            return decode_receipt_request(raw)
        except ValueError:
            raise InvalidArgument("", f"not a valid {full_name} message") from None
    return decode


_decode_calculate = _dict_decoder("loyalty.v1.CalculateReceiptRequest")
_decode_confirm = _dict_decoder("loyalty.v1.ConfirmPurchaseRequest")


# ---- the call's outcome ---------------------------------------------------------------------------------------

# The level of a failed call's line: the server's trouble warns, the caller's is information.
_ERROR_LEVELS = {"UNAVAILABLE": logging.WARNING, "INTERNAL": logging.WARNING}


async def _abort(context: grpc.aio.ServicerContext, status: grpc.Status, rid: str) -> None:
    """End the call with ``status``, its trailing metadata (rich details) and the request id together (an
    abort's own trailers replace the ones set before)."""
    await context.abort(status.code, status.details, tuple(status.trailing_metadata) + ((REQUEST_ID, rid),))


def _log_call(level: int, method: str, code: str, elapsed: float, rid: str, context, key: str,
              detail: str | None) -> None:
    """The call's line (``logs``): in the text, and as fields for JSON."""
    peer = context.peer()
    duration_ms = round(elapsed * 1000, 3)
    log.log(level, "%s %s %.2fms request_id=%s peer=%s %s%s", method, code, duration_ms, rid, peer, key or "-",
            f": {detail}" if detail else "",
            extra={"request_id": rid, "method": method, "code": code, "duration_ms": duration_ms, "peer": peer,
                   "key": key, "detail": detail})


# ---- the server -----------------------------------------------------------------------------------------------

class LoyaltyServer:
    """One process's gRPC server around one service. ``await start()``, then ``await stop()``."""

    def __init__(self, service: ProcessingService, config: ServeConfig, *, tracing=None):
        """``tracing``: a ``tracing.Tracing`` (None: made when ``config`` or the environment asks for traces)."""
        self.service = service
        self.config = config
        self.metrics = Metrics()
        service.watch_group_commit(self.metrics.group_commit_observer)      # nothing without group commit
        if tracing is None and tracing_wanted(config.otel):
            from loyalty.server.tracing import Tracing
            tracing = Tracing()
        self.tracing = tracing
        cpu = config.cpu_threads or min(4, (os.cpu_count() or 1) + 1)
        self.cpu_pool = concurrent.futures.ThreadPoolExecutor(cpu, thread_name_prefix="loyalty-cpu")
        self.io_pool = concurrent.futures.ThreadPoolExecutor(config.io_threads, thread_name_prefix="loyalty-io")
        self.health = _Health()
        self._probe: asyncio.Future | None = None       # the storage probe in flight (``_check_health``)
        self.port: int | None = None
        self._tasks: list[asyncio.Task] = []
        self._metrics_http = None
        self._stopping = False
        options = [
            ("grpc.so_reuseport", 1 if config.reuse_port else 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        interceptors = [] if tracing is None else tracing.interceptors()
        if tracing is not None:
            tracing.watch_storage()
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs,
                                      interceptors=interceptors)
        self.gate = _gate(config, service) if config.auth == "required" else None
        self.certificates = None
        self.server.add_generic_rpc_handlers((self._generic_handler(PROCESSING, processing_pb2),
                                              self._generic_handler(ADMIN, admin_pb2)))
        add_segments_service(self, service.runtime, redis_url=config.redis_url)
        add_scenarios_service(self, service.runtime)
        add_keys_service(self, service, redis_url=config.redis_url)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._add_reflection()

    def _add_reflection(self) -> None:
        """Reflection as configured: open (or auth off), admin credentials only, or not served."""
        names = SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,)
        if self.config.reflection == "off":
            return
        if self.gate is None or self.config.reflection == "open":
            _enable_reflection(self.server, names)
            return
        from loyalty.server.security.edge import GuardedReflection
        _enable_reflection(self.server, names, lambda all_names: GuardedReflection(all_names, self.gate,
                                                                                  self.io_pool))

    def _generic_handler(self, service_name: str, module) -> grpc.GenericRpcHandler:
        descriptor = module.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]]
        handlers = {}
        for method in descriptor.methods:
            pool = self.cpu_pool if method.name in CPU_METHODS else self.io_pool
            # Raw bytes in and out: we decode ourselves, so that a malformed message is INVALID_ARGUMENT
            # (gRPC's own deserializer would answer INTERNAL) and nothing is decoded twice.
            if service_name == PROCESSING and method.name == "CalculateReceipt":
                # No message objects at all: the compiled codec turns the bytes into the core's dicts and the
                # answer dict into the response bytes; on the loop when nothing needs storage.
                inline = None if os.environ.get("LOYALTY_CALCULATE_IN_POOL") else self._calculate_inline
                handler = self._bytes_handler(f"{service_name}/{method.name}", _decode_calculate,
                                              self._calculate_bytes, _calculate_key, pool, inline)
            elif service_name == PROCESSING and method.name == "ConfirmPurchase" and hasattr(self.service,
                                                                                              "confirm_future"):
                # The same codec; with group commit the call waits for its batch on the loop (no thread).
                handler = self._bytes_handler(f"{service_name}/{method.name}", _decode_confirm,
                                              self._confirm_bytes, _calculate_key, pool, self._confirm_inline)
            else:
                handler = self._make_handler(f"{service_name}/{method.name}",
                                             getattr(module, method.input_type.name),
                                             getattr(self.service, snake(method.name)), pool)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(handler)
        return grpc.method_handlers_generic_handler(service_name, handlers)

    def _calculate_bytes(self, request: tuple[str, str, dict, bool]) -> bytes:
        card, phone, receipt, fits = request
        answer = self.service.calculate_answer(card, phone, receipt, fits=fits)
        return encode_calculate_response(answer, answer["program_version"])

    def _calculate_inline(self, request: tuple[str, str, dict, bool]) -> bytes | None:
        """The response when the service can answer from memory alone (None: it needs storage, use the pool)."""
        card, phone, receipt, fits = request
        answer = self.service.calculate_answer(card, phone, receipt, wait=False, fits=fits)
        return None if answer is None else encode_calculate_response(answer, answer["program_version"])

    def _confirm_bytes(self, request: tuple[str, str, dict, bool]) -> bytes:
        card, phone, receipt, fits = request
        purchase_id, answer, replayed = self.service.confirm_answer(card, phone, receipt, fits=fits)
        return encode_confirm_response(str(purchase_id), answer, replayed)

    def _confirm_inline(self, request: tuple[str, str, dict, bool]):
        """An awaitable of the response when the service batches confirms (None: use the pool). Validation
        errors are raised here, on the loop."""
        card, phone, receipt, fits = request
        future = self.service.confirm_future(card, phone, receipt, fits=fits)
        return None if future is None else self._confirm_awaited(future)

    @staticmethod
    async def _confirm_awaited(future) -> bytes:
        purchase_id, answer, replayed = await asyncio.wrap_future(future)
        return encode_confirm_response(str(purchase_id), answer, replayed)

    def add_module_service(self, full_name: str, methods: dict) -> None:
        """Serve a module's service (Segments, Scenarios; ``grpc_register.register_servicer``): ``methods`` maps
        each RPC name to ``(request class, fn(request) -> response, server streaming)`` (a streaming ``fn``
        returns a generator of responses); they get the handlers every method of
        this server has (a pool thread, the call's deadline, the error map, metrics)."""
        handlers = {}
        for name, (request_cls, fn, streaming) in methods.items():
            if streaming:
                handlers[name] = grpc.unary_stream_rpc_method_handler(
                    self._stream_handler(f"{full_name}/{name}", _message_decoder(request_cls), fn, self.io_pool))
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    self._make_handler(f"{full_name}/{name}", request_cls, fn, self.io_pool))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, handlers),))

    def _stream_handler(self, path: str, decode, chunks_of, pool):
        """The grpc.aio handler of the server-streaming method ``path``: the caller identified and held to the
        method's scope as for every other method, then ``chunks_of(request)``, a generator of response messages,
        each taken from it in ``pool`` (as the caller) only when the previous one was sent (so an export holds
        one chunk in memory, and a slow client slows the reading down); the generator is closed when the call
        ends, however it ends. Errors before or between chunks map as for every other method."""
        metrics = self.metrics
        service_name, method = path.split("/")
        scopes = SCOPE_OF[service_name][method]
        gate = self.gate

        async def handler(raw: bytes, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            code = "OK"
            request = chunks = None
            principal = LOCAL
            pending: concurrent.futures.Future | None = None
            remaining = context.time_remaining()
            until = time.monotonic() + (STORAGE_TIMEOUT_S if remaining is None else remaining)
            try:
                if gate is not None:
                    principal = await gate.principal(context, self.io_pool)
                    authorize(principal, scopes, method)
                request = decode(raw)
                chunks = chunks_of(request)
                while True:
                    pending = pool.submit(_bounded, until, principal, _next_chunk, chunks)
                    chunk = await asyncio.wrap_future(pending)
                    if chunk is None:
                        break
                    yield chunk.SerializeToString()
            except BaseException as exc:
                code = _code_of(exc)
                await _end_failed(context, method, exc, code, request_key(request) if request else "")
            finally:
                if chunks is not None:
                    _close_when_done(pending, chunks)
                metrics.observe(method, code, time.perf_counter() - started)

        handler.__name__ = method
        return handler

    def _make_handler(self, method: str, request_cls, fn, pool):
        """The handler of a method whose service function takes the request message and returns the response
        message (every method but CalculateReceipt, and those of the Segments and Scenarios services)."""
        rpc = method.rsplit("/", 1)[-1]
        if rpc in audit.AUDITED_RPCS:           # admin changes: the call named for the audit log, refusals recorded
            fn = audit.audited(self.service.db, rpc, fn)
        return self._bytes_handler(method, _message_decoder(request_cls), _serializing(fn), request_key, pool)

    def _bytes_handler(self, path: str, decode, call, describe, pool, inline=None):
        """The grpc.aio handler of the method ``path`` (``loyalty.v1.Processing/ConfirmPurchase``): with
        authentication, the caller identified (from memory on the loop, else in the I/O pool) and held to the
        method's scope (``SCOPE_OF``); ``decode(raw)`` on the loop (``InvalidArgument`` when the bytes are not
        the request); a store-bound caller held to the request's store (``STORE_OF``); then, as the caller
        (``security.acting_as``), ``inline(request)`` on the loop if given (bytes, an awaitable of bytes, or
        None), and when it gives None (or is not given) ``call(request) -> bytes`` in ``pool``; the outcome
        mapped to a status. Around it: the request id (``logs.request_id``, sent back in the trailing metadata),
        the metrics, the call's log line (``describe(request)`` is the key an operator greps for) and, when
        tracing, the method's span, whose context the pool thread runs in."""
        loop_holder: list = []
        metrics = self.metrics
        in_flight = metrics.in_flight
        ok_level = logging.INFO if self.config.access_log else logging.DEBUG
        traced = self.tracing is not None
        service_name, method = path.split("/")
        scopes = SCOPE_OF[service_name][method]
        store_of = STORE_OF.get(method) if service_name == PROCESSING else None
        gate = self.gate
        io_pool = self.io_pool
        # an audited call refused for its credential (missing, unknown, without the scope) is recorded too
        audit_refusals = gate is not None and method in audit.AUDITED_RPCS

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            code = "OK"
            detail = request = None
            principal = LOCAL
            rid = request_id(context.invocation_metadata())
            context.set_trailing_metadata(((REQUEST_ID, rid),))
            remaining = context.time_remaining()
            # storage work of this call ends by the client's deadline (``db.deadline``; none sent: ours)
            until = time.monotonic() + (STORAGE_TIMEOUT_S if remaining is None else remaining)
            if not loop_holder:
                loop_holder.append(asyncio.get_running_loop())
            in_flight.inc()
            try:
                if gate is not None:
                    principal = audit.UNIDENTIFIED
                    principal = gate.identify(context)
                    if principal is None:
                        principal = audit.UNIDENTIFIED
                        principal = await loop_holder[0].run_in_executor(io_pool, gate.identify_slow, context)
                    authorize(principal, scopes, method)
                request = decode(raw)
                if store_of is not None and principal.stores:
                    authorize_store(principal, *store_of(request))
                if inline is not None:
                    with db_deadline(until), acting_as(principal):
                        response = inline(request)
                    if response is not None:
                        return response if type(response) is bytes else await response
                if traced:
                    return await loop_holder[0].run_in_executor(pool, contextvars.copy_context().run, _bounded,
                                                                until, principal, call, request)
                return await loop_holder[0].run_in_executor(pool, _bounded, until, principal, call, request)
            except ServiceError as exc:
                code, detail = exc.code, exc.message
                if audit_refusals and request is None and code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                    await loop_holder[0].run_in_executor(io_pool, _audit_refusal, self.service.db, method,
                                                         principal, decode, raw, code, detail)
                await _abort(context, status_for(exc), rid)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                incident = uuid.uuid4().hex[:12]
                detail = f"incident={incident}"
                log.exception("%s INTERNAL incident=%s request_id=%s %s", method, incident, rid,
                              (describe(request) if request else "") or "-", extra={"request_id": rid})
                await _abort(context, internal_status(incident), rid)
            finally:
                in_flight.dec()
                elapsed = time.perf_counter() - started
                metrics.observe(method, code, elapsed)
                level = ok_level if code == "OK" else _ERROR_LEVELS.get(code, logging.INFO)
                if log.isEnabledFor(level):
                    _log_call(level, method, code, elapsed, rid, context, describe(request) if request else "",
                              detail)

        handler.__name__ = method
        return handler if self.tracing is None else self.tracing.traced(method, handler)

    # ---- lifecycle ------------------------------------------------------------------------------------------

    async def _set_health(self, status) -> None:
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, status)

    async def _check_health(self) -> bool:
        loop = asyncio.get_running_loop()
        timeout = max(0.5, min(self.config.health_interval, 5.0))
        try:
            if self._probe is None or self._probe.done():
                self._probe = loop.run_in_executor(self.io_pool, self.service.check_ready, timeout)
            # a probe that does not answer in time (a hung database) is NOT_SERVING, and is waited for, not
            # repeated, by the next checks
            ready = bool(await asyncio.wait_for(asyncio.shield(self._probe), timeout + 0.5))
        except asyncio.TimeoutError:
            log.warning("storage did not answer the health probe within %.1fs", timeout + 0.5)
            ready = False
        except Exception:   # check_ready should never raise; if it does, storage is not known to be good
            log.exception("check_ready raised")
            ready = False
        if not self._stopping:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING if ready
                                   else health_pb2.HealthCheckResponse.NOT_SERVING)
        return ready

    async def _watch_health(self) -> None:
        was = True
        while True:
            await asyncio.sleep(self.config.health_interval)
            ready = await self._check_health()
            if ready != was:
                (log.info if ready else log.warning)("storage %s: health %s", "reachable" if ready else "unreachable",
                                                     "SERVING" if ready else "NOT_SERVING")
                was = ready

    async def start(self, metrics_port: int | None = None) -> int:
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls is not None:
                from loyalty.server.security.tls import Certificates
                self.certificates = Certificates(self.config.tls)
                self.port = self.server.add_secure_port(address, self.certificates.credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:     # grpc: "Failed to bind"
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        await self._check_health()
        await self.server.start()
        self._tasks.append(asyncio.create_task(self._watch_health()))
        if self.config.metrics_shared:
            self._tasks.append(asyncio.create_task(self.metrics.mirror_process_periodically()))
        elif metrics_port is not None:
            self._metrics_http = await self.metrics.serve_http(self.config.host, metrics_port)
            log.info("metrics at http://%s:%d/metrics", self.config.host, metrics_port)
        else:
            self._tasks.append(asyncio.create_task(self.metrics.log_periodically(self.config.metrics_log_interval)))
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (load balancers stop sending), then refuse new calls and let the ones in flight
        finish within ``grace`` seconds; then release the pools and the service."""
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await self.server.stop(self.config.grace if grace is None else grace)
        if self._metrics_http is not None:
            self._metrics_http.close()
        line = self.metrics.summary()
        if line:
            log.info(line)
        self.cpu_pool.shutdown(wait=True)
        self.io_pool.shutdown(wait=True)
        if self.gate is not None:
            self.gate.keys.close()
        if self.tracing is not None:
            self.tracing.close()

    def reload_certificates(self) -> None:
        """SIGHUP: new connections get the certificate files as they are now (bad files: the old ones stay)."""
        if self.certificates is not None:
            self.certificates.reload()
        else:
            log.info("SIGHUP: no TLS certificates to reload")


def _gate(config: ServeConfig, service):
    """The authentication of ``--auth required``: the API keys (and registered certificates) of the service's
    database, OIDC tokens when an issuer is configured, client certificates with mutual TLS."""
    from loyalty.server.security.edge import Gate
    from loyalty.server.security.keys import KeyRing
    from loyalty.server.security.oidc import OidcVerifier

    oidc = OidcVerifier(**config.oidc) if config.oidc else None
    client_certificates = config.tls is not None and bool(config.tls.client_ca)
    return Gate(KeyRing(service.db, redis_url=config.redis_url), oidc, certificates=client_certificates)


# ---- running it -----------------------------------------------------------------------------------------------

def _open_service(config: ServeConfig):
    from loyalty.server.processing import ProcessingService
    # One group-commit batch in flight per process when several processes serve (each one per core): their
    # batches already overlap each other; two per process then only made each batch smaller (in interleaved
    # runs of benchmarks/server.py on 2 cores, 2 workers x 1 did ~15% more confirms than 2 x 2). One process
    # alone keeps two, so that one batch is calculated while the other waits for its COMMIT.
    threads = None
    if config.workers > 1 and not os.environ.get("LOYALTY_CONFIRM_BATCH_THREADS"):
        threads = 1
    return ProcessingService.open(config.database_url, redis_url=config.redis_url, batch_threads=threads)


def check_serving(config: ServeConfig) -> None:
    """Refuse a configuration that must not serve (``InvalidArgument`` saying why): a non-loopback address
    without authentication and TLS (unless ``insecure``), certificate files that do not load."""
    from loyalty.server.security.edge import exposure_problem
    problem = exposure_problem(config.host, auth_required=config.auth == "required", tls=config.tls is not None,
                               insecure=config.insecure)
    if problem:
        raise InvalidArgument("--host", problem)
    if config.tls is not None:
        from loyalty.server.security import tls
        tls.check(config.tls)


async def run_server(config: ServeConfig, *, service=None, announce=None, worker: int = 0) -> None:
    """Serve until SIGTERM / SIGINT, then shut down gracefully. ``announce(line)`` is called once listening."""
    check_serving(config)
    loop = asyncio.get_running_loop()
    own_service = service is None
    if own_service:
        service = await loop.run_in_executor(None, _open_service, config)
    server = LoyaltyServer(service, config)
    stop = asyncio.Event()

    def on_signal(signum):
        if stop.is_set():
            log.info("already shutting down (signal %s ignored)", signal.Signals(signum).name)
            return
        log.info("%s: shutting down, finishing calls in flight (grace %.0fs)",
                 signal.Signals(signum).name, config.grace)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, server.reload_certificates)
    try:
        port = await server.start(config.metrics_port)
        # What exists by now (the program snapshot, SQLAlchemy's, gRPC's and protobuf's machinery: about 100k
        # objects) lives as long as the process: out of the cyclic collector's sight, a full collection no longer
        # walks it (under load that blocked the event loop for ~50 ms at a time: CalculateReceipt's p99).
        gc.freeze()
        # A request allocates a few hundred containers (receipt and answer dicts) that die with it: at the
        # default threshold (700) the young generation was collected every other request, and older ones
        # often behind it. 50,000 keeps a young collection to a few milliseconds of work, a few times a
        # second (CalculateReceipt against the echo server: about 0.68x -> 0.75x in interleaved runs).
        gc.set_threshold(50_000, 20, 100)
        if announce is not None:
            announce(f"listening on {config.host}:{port}")
        log.info("worker %d (pid %d) serving on %s:%d", worker, os.getpid(), config.host, port)
        await stop.wait()
    finally:
        await server.stop()
        if own_service:
            service.close()
        log.info("worker %d stopped", worker)


def _worker_main(config: ServeConfig, worker: int, log_level: str) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)      # a reload while starting: nothing to reload yet (not death)
    configure_logging(log_level, config.log_format)
    try:
        asyncio.run(run_server(config, worker=worker))
    except ServiceError as exc:
        log.error("worker %d cannot start: %s", worker, exc.message)
        sys.exit(1)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket on the port the workers will share: it turns port 0 into
    a real port, and holds that port against any process that does not opt into sharing it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@contextlib.contextmanager
def _shared_metrics(config: ServeConfig):
    """With ``--metrics-port``, the workers' metrics through the parent (``metrics``' multi-process mode): the
    directory made ready before they start, the parent's HTTP server on the port; yields the workers' config
    and what to call with a worker's pid when it exits. Everything is undone on the way out."""
    if config.metrics_port is None:
        yield config, lambda pid: None
        return
    from loyalty.server import metrics
    path, made = metrics.prepare_multiprocess_dir()
    try:
        try:
            http = metrics.serve_multiprocess(config.host, config.metrics_port, path)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics port {config.metrics_port}: {exc.strerror or exc}") from None
        log.info("metrics of all %d workers at http://%s:%d/metrics", config.workers, config.host,
                 config.metrics_port)
        try:
            yield dataclasses.replace(config, metrics_shared=True), lambda pid: metrics.forget_process(pid, path)
        finally:
            http.shutdown()
    finally:
        if made:
            os.environ.pop(metrics.MULTIPROC_ENV, None)
            metrics.remove_multiprocess_dir(path)


def _supervise(config: ServeConfig, announce, log_level: str) -> int:
    reserved = _reserve_port(config.host, config.port)
    config = dataclasses.replace(config, port=reserved.getsockname()[1], reuse_port=True)
    try:
        with _shared_metrics(config) as (config, exited):
            return _run_workers(config, announce, log_level, exited)
    finally:
        reserved.close()


def _run_workers(config: ServeConfig, announce, log_level: str, exited) -> int:
    """Start ``config.workers`` processes, forward SIGTERM / SIGINT to them, wait for all; ``exited(pid)`` as
    each ends."""
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_worker_main, args=(config, i, log_level), name=f"loyalty-worker-{i}")
                for i in range(config.workers)]
    stopping = False

    def signal_children(signum, _frame):
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signum)

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        signal_children(signum, _frame)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.start()           # SIGHUP is ignored here, and so in each child until its server takes it
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal_children)     # reload certificates
        if announce is not None:
            announce(f"listening on {config.host}:{config.port} ({config.workers} worker processes)")
        rc = 0
        alive = list(children)
        while alive:
            ready = multiprocessing.connection.wait([c.sentinel for c in alive])
            for child in [c for c in alive if c.sentinel in ready]:
                child.join()
                alive.remove(child)
                exited(child.pid)
                if child.exitcode != 0 and not stopping:
                    # A worker died on its own: stop the others and fail, so the supervisor (systemd, k8s)
                    # restarts a whole, known-good set rather than a server quietly running on fewer workers.
                    log.error("%s exited with %s: stopping the other workers", child.name, child.exitcode)
                    rc = 1
                    forward(signal.SIGTERM, None)
        return rc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve(config: ServeConfig, *, announce=None, log_level: str = "INFO") -> int:
    """Run the server in the foreground until signalled; returns the process exit code."""
    configure_logging(log_level, config.log_format)
    check_serving(config)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)      # until the server takes it (reload), SIGHUP must not kill
    if config.workers > 1:
        import multiprocessing.connection  # noqa: F401  (wait)
        return _supervise(config, announce, log_level)
    asyncio.run(run_server(config, announce=announce))
    return 0
