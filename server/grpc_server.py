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
a parent that forwards signals and waits (``serving``). What each call goes through besides the server object
(decoders, the pool hop as its caller, the outcome and its log line) is ``edge_calls``; health with ``List`` and
reflection under both names, ``edge_services``.

What operators see of a call (README, Operating): its request id (``logs``: the caller's ``x-request-id`` or a new
one, always sent back in the trailing metadata), one log line, the Prometheus series (``metrics``; with workers
and ``--metrics-port`` the parent serves every worker's, from prometheus_client's multi-process directory it
manages) and, with ``--otel``, its spans (``tracing``; off, no interceptor and no wrapper exist at all).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loyalty.server.convert import encode_calculate_response, encode_confirm_response
from loyalty.server.db import deadline as db_deadline
from loyalty.server.edge_calls import (
    STORE_OF, abort, audit_refusal, bounded, calculate_key, close_when_done, code_of, decode_calculate, decode_confirm,
    end_failed, log_call, message_decoder, next_chunk, request_key, serializing, ERROR_LEVELS,
)
from loyalty.server.edge_services import HealthWithList, enable_reflection
from loyalty.server.errors import ServiceError
from loyalty.server.logs import REQUEST_ID, request_id
from loyalty.server.grpc_register import snake
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

__all__ = ["ServeConfig", "LoyaltyServer", "SERVICE_NAMES"]

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


# ---- the server -----------------------------------------------------------------------------------------------

def host_port(host: str, port: int) -> str:
    """``HOST:PORT`` as gRPC takes it: an IPv6 address in brackets (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


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
        self.health = HealthWithList()
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
            service.trace_group_commit(*tracing.batch_hooks())
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
            enable_reflection(self.server, names)
            return
        from loyalty.server.security.edge import GuardedReflection
        enable_reflection(self.server, names, lambda all_names: GuardedReflection(all_names, self.gate,
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
                handler = self._bytes_handler(f"{service_name}/{method.name}", decode_calculate,
                                              self._calculate_bytes, calculate_key, pool, inline)
            elif service_name == PROCESSING and method.name == "ConfirmPurchase" and hasattr(self.service,
                                                                                              "confirm_future"):
                # The same codec; with group commit the call waits for its batch on the loop (no thread).
                handler = self._bytes_handler(f"{service_name}/{method.name}", decode_confirm,
                                              self._confirm_bytes, calculate_key, pool, self._confirm_inline)
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
                    self._stream_handler(f"{full_name}/{name}", message_decoder(request_cls), fn, self.io_pool))
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    self._make_handler(f"{full_name}/{name}", request_cls, fn, self.io_pool))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, handlers),))

    def _scopes(self, service_name: str, method: str) -> tuple[str, ...] | None:
        """The scopes that may call a method (``SCOPE_OF``); a method without an entry is served only while
        authentication is off (tests' own services): with it on, serving one is a defect, refused at start."""
        scopes = SCOPE_OF.get(service_name, {}).get(method)
        if scopes is None and self.gate is not None:
            raise KeyError(f"{service_name}/{method} has no scope in security.edge.SCOPE_OF")
        return scopes

    def _stream_handler(self, path: str, decode, chunks_of, pool):
        """The grpc.aio handler of the server-streaming method ``path``: the caller identified and held to the
        method's scope as for every other method, then ``chunks_of(request)``, a generator of response messages,
        each taken from it in ``pool`` (as the caller) only when the previous one was sent (so an export holds
        one chunk in memory, and a slow client slows the reading down); the generator is closed when the call
        ends, however it ends. Errors before or between chunks map as for every other method."""
        metrics = self.metrics
        service_name, method = path.split("/")
        scopes = self._scopes(service_name, method)
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
                    pending = pool.submit(bounded, until, principal, next_chunk, chunks)
                    chunk = await asyncio.wrap_future(pending)
                    if chunk is None:
                        break
                    yield chunk.SerializeToString()
            except BaseException as exc:
                code = code_of(exc)
                await end_failed(context, method, exc, code, request_key(request) if request else "")
            finally:
                if chunks is not None:
                    close_when_done(pending, chunks)
                metrics.observe(method, code, time.perf_counter() - started)

        handler.__name__ = method
        return handler

    def _make_handler(self, method: str, request_cls, fn, pool):
        """The handler of a method whose service function takes the request message and returns the response
        message (every method but CalculateReceipt, and those of the Segments and Scenarios services)."""
        rpc = method.rsplit("/", 1)[-1]
        if rpc in audit.AUDITED_RPCS:           # admin changes: the call named for the audit log, refusals recorded
            fn = audit.audited(self.service.db, rpc, fn)
        return self._bytes_handler(method, message_decoder(request_cls), serializing(fn), request_key, pool)

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
        scopes = self._scopes(service_name, method)
        store_of = STORE_OF.get(method) if service_name == PROCESSING else None
        gate = self.gate
        io_pool = self.io_pool
        # an audited call refused before its service function (a credential missing, unknown or without the
        # scope; bytes that are not the request) is recorded here; refusals after it, by ``audit.audited``
        audit_refusals = gate is not None and method in audit.AUDITED_RPCS

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            code = "OK"
            detail = request = None
            reached = False
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
                reached = True
                if inline is not None:
                    with db_deadline(until), acting_as(principal):
                        response = inline(request)
                    if response is not None:
                        return response if type(response) is bytes else await response
                if traced:
                    return await loop_holder[0].run_in_executor(pool, contextvars.copy_context().run, bounded,
                                                                until, principal, call, request)
                return await loop_holder[0].run_in_executor(pool, bounded, until, principal, call, request)
            except ServiceError as exc:
                code, detail = exc.code, exc.message
                if audit_refusals and not reached and code != "UNAVAILABLE":
                    await loop_holder[0].run_in_executor(io_pool, audit_refusal, self.service.db, method,
                                                         principal, decode, raw, code, detail)
                await abort(context, status_for(exc), rid)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                incident = uuid.uuid4().hex[:12]
                detail = f"incident={incident}"
                log.exception("%s INTERNAL incident=%s request_id=%s %s", method, incident, rid,
                              (describe(request) if request else "") or "-", extra={"request_id": rid})
                await abort(context, internal_status(incident), rid)
            finally:
                in_flight.dec()
                elapsed = time.perf_counter() - started
                metrics.observe(method, code, elapsed)
                level = ok_level if code == "OK" else ERROR_LEVELS.get(code, logging.INFO)
                if log.isEnabledFor(level):
                    log_call(level, method, code, elapsed, rid, context, describe(request) if request else "",
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
        address = host_port(self.config.host, self.config.port)
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
            raise OSError(f"cannot listen on {address}")
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
