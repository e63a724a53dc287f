"""Python clients of the loyalty server: :class:`LoyaltyClient` (blocking) and :class:`AsyncLoyaltyClient`
(grpc.aio), one typed method per RPC of every ``loyalty.v1`` service (Processing, Admin, Segments,
Scenarios), generated at build time from the protos (``codegen.py`` says why), with the proto's comment as
docstring. Paged lists also get ``iter_*`` methods that walk every page (``iter_segments``), and
server-streaming RPCs (``export_members_stream``) yield their messages as they arrive.

Each call has a deadline (``timeout``) and is retried with exponential backoff and jitter when the answer is
UNAVAILABLE or DEADLINE_EXCEEDED: the server may have written and lost the answer, so a retry resends the
*same* request, with the same idempotency key (store/terminal/number, ``refund_id``, ``operation_id``,
``request_id``), and the server returns the stored answer instead of writing twice. Where a key is optional
and empty (``request_id`` of Enroll/UpdateMember) or required and empty (``refund_id``, ``operation_id``), the
client fills in a random one *before* the first attempt, so that every attempt carries it; the response
repeats it. INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION and the rest are never retried:
sending the same thing again cannot change them.

Failures raise :class:`LoyaltyError` with the status code, the server's message and the rich details decoded
(``field`` of a BadRequest, ``available_points`` of a FailedPrecondition, ...).

Requests are ``loyalty.v1`` messages, plain dicts with the proto's field names, or keyword arguments; a key
that is not a field is a ``LoyaltyError`` naming it (``receipt.lnes: unknown field``), nothing sent. Who is calling and over
what (``loyalty.clients.channel``): ``api_key=`` or ``token=`` (sent as ``authorization: Bearer ...``),
``tls_ca=`` / ``tls=True`` for TLS, ``tls_cert=`` / ``tls_key=`` for mutual TLS::

    with LoyaltyClient("127.0.0.1:50051") as client:
        answer = client.calculate_receipt(member={"card": "7000001"}, receipt={...}).answer
        for segment in client.iter_segments(page_size=50):
            ...
"""
from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .channel import connection_options
from ._typed import AsyncMethods, SyncMethods
from .errors import LoyaltyError
from .rpcs import RPCS, Rpc, build_request

__all__ = ["LoyaltyClient", "AsyncLoyaltyClient", "LoyaltyError", "RETRYABLE", "RPCS", "to_dict", "build_request",
           "make_channel"]

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def to_dict(message) -> dict:
    """A response as a dict with the proto's field names, zeros included (for ``--json`` output)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _backoff(attempt: int, base: float, cap: float) -> float:
    return random.uniform(0.5, 1.0) * min(cap, base * (2 ** attempt))


_OPTIONS = [("grpc.keepalive_time_ms", 30_000), ("grpc.enable_retries", 0)]


def make_channel(target: str, *, aio: bool, interceptors=(), credentials=None):
    """The channel every call of a client goes through (the one place that decides its transport and
    credentials): blocking or grpc.aio, plaintext or TLS (``credentials``: ``grpc.ChannelCredentials``, from
    ``channel.connection_options``), with ``interceptors`` (tracing, tests)."""
    if aio:
        interceptors = list(interceptors) or None
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=_OPTIONS, interceptors=interceptors)
        return grpc.aio.secure_channel(target, credentials, options=_OPTIONS, interceptors=interceptors)
    channel = (grpc.insecure_channel(target, options=_OPTIONS) if credentials is None
               else grpc.secure_channel(target, credentials, options=_OPTIONS))
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def _callable(channel, rpc: Rpc):
    factory = channel.unary_stream if rpc.streaming else channel.unary_unary
    return factory(rpc.path, request_serializer=rpc.request.SerializeToString,
                   response_deserializer=rpc.response.FromString)


class _Base:
    def __init__(self, target: str, *, timeout: float = 5.0, retries: int = 4, backoff: float = 0.05,
                 max_backoff: float = 2.0, metadata=None, interceptors=(), aio: bool = False, **connection):
        """``connection``: ``api_key`` / ``token`` / ``tls_ca`` / ``tls`` / ``tls_cert`` / ``tls_key``
        (``loyalty.clients.channel``)."""
        credentials, auth = connection_options(connection)
        if connection:
            raise TypeError(f"unexpected keyword argument {next(iter(connection))!r}")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.metadata = tuple(metadata or ()) + tuple(auth)
        self.channel = make_channel(target, aio=aio, interceptors=interceptors, credentials=credentials)
        self._callables = {name: _callable(self.channel, rpc) for name, rpc in RPCS.items()}

    def _prepare(self, name: str, request, fields, timeout, retries):
        """The request message (built once, so every attempt sends the same key), the method, the deadline
        and the number of retries of one call."""
        return (build_request(name, request, fields), self._callables[name], timeout or self.timeout,
                self.retries if retries is None else retries)

    def _pause(self, err: grpc.RpcError, attempt: int, retries: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` after ``err``; a final ``err`` (not retryable, or
        the retries used up) is raised as a ``LoyaltyError``."""
        if err.code() in RETRYABLE and attempt < retries:
            return _backoff(attempt, self.backoff, self.max_backoff)
        raise LoyaltyError.from_rpc_error(err, err.trailing_metadata(), attempt + 1) from None


_END = object()


def _opened(call):
    """A streaming call with its first message read (``_END`` when there is none): until then a failure may
    be retried, after it a retry could not tell what the caller already took."""
    return call, next(call, _END)


async def _opened_async(call):
    return call, await anext(aiter(call), _END)


class LoyaltyClient(SyncMethods, _Base):
    """Blocking client. ``timeout`` is the deadline of each attempt; ``retries`` the attempts after the first;
    ``interceptors`` are grpc client interceptors (tracing, tests); ``api_key`` / ``token`` / ``tls_*``: see
    ``loyalty.clients.channel``."""

    def __init__(self, target: str, *, interceptors=(), **kwargs):
        super().__init__(target, interceptors=interceptors, aio=False, **kwargs)

    def call(self, name: str, request=None, *, timeout: float | None = None, retries: int | None = None):
        """The RPC whose method is ``name`` (``"confirm_purchase"``), for callers that pick it at run time."""
        return self._invoke(name, request, {}, timeout, retries)

    def _invoke(self, name: str, request, fields, timeout, retries):
        request, method, timeout, retries = self._prepare(name, request, fields, timeout, retries)
        return self._attempts(lambda: method(request, timeout=timeout, metadata=self.metadata), retries)

    def _attempts(self, send, retries: int):
        """``send()`` until it answers, again after a retryable failure (the same request: the same key)."""
        for attempt in itertools.count():
            try:
                return send()
            except grpc.RpcError as err:
                time.sleep(self._pause(err, attempt, retries))

    def _invoke_stream(self, name: str, request, fields, timeout, retries) -> Iterator[Any]:
        """The messages of a server-streaming call as they arrive; retried only until the first arrives.
        ``timeout`` bounds the whole stream."""
        request, method, timeout, retries = self._prepare(name, request, fields, timeout, retries)
        call, first = self._attempts(lambda: _opened(method(request, timeout=timeout, metadata=self.metadata)),
                                     retries)
        if first is _END:
            return
        yield first
        try:
            yield from call
        except grpc.RpcError as err:
            raise LoyaltyError.from_rpc_error(err, err.trailing_metadata(), 1) from None

    def _invoke_pages(self, name: str, items: str, request, fields, timeout, retries) -> Iterator[Any]:
        """Each item of every page: the call repeated with the last answer's ``next_page_token``."""
        page = build_request(name, request, fields)
        while True:
            answer = self._invoke(name, page, {}, timeout, retries)
            yield from getattr(answer, items)
            if not answer.next_page_token:
                return
            page.page_token = answer.next_page_token

    def health(self, service: str = "", timeout: float = 2.0) -> str:
        """``SERVING`` / ``NOT_SERVING`` / ... of ``service`` ("" for the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout:g}s")
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncLoyaltyClient(AsyncMethods, _Base):
    """grpc.aio client; create it inside the running event loop."""

    def __init__(self, target: str, *, interceptors=(), **kwargs):
        super().__init__(target, interceptors=interceptors, aio=True, **kwargs)

    async def call(self, name: str, request=None, *, timeout: float | None = None, retries: int | None = None):
        """The RPC whose method is ``name`` (``"confirm_purchase"``), for callers that pick it at run time."""
        return await self._invoke(name, request, {}, timeout, retries)

    async def _invoke(self, name: str, request, fields, timeout, retries):
        request, method, timeout, retries = self._prepare(name, request, fields, timeout, retries)
        return await self._attempts(lambda: method(request, timeout=timeout, metadata=self.metadata), retries)

    async def _attempts(self, send, retries: int):
        """As the blocking client's: ``await send()`` until it answers, again after a retryable failure."""
        for attempt in itertools.count():
            try:
                return await send()
            except grpc.RpcError as err:
                await asyncio.sleep(self._pause(err, attempt, retries))

    async def _invoke_stream(self, name: str, request, fields, timeout, retries) -> AsyncIterator[Any]:
        """As the blocking client's: messages as they arrive, retried only until the first arrives."""
        request, method, timeout, retries = self._prepare(name, request, fields, timeout, retries)
        call, first = await self._attempts(
            lambda: _opened_async(method(request, timeout=timeout, metadata=self.metadata)), retries)
        if first is _END:
            return
        yield first
        try:
            async for message in call:
                yield message
        except grpc.RpcError as err:
            raise LoyaltyError.from_rpc_error(err, err.trailing_metadata(), 1) from None

    async def _invoke_pages(self, name: str, items: str, request, fields, timeout, retries) -> AsyncIterator[Any]:
        """Each item of every page: the call repeated with the last answer's ``next_page_token``."""
        page = build_request(name, request, fields)
        while True:
            answer = await self._invoke(name, page, {}, timeout, retries)
            for item in getattr(answer, items):
                yield item
            if not answer.next_page_token:
                return
            page.page_token = answer.next_page_token

    async def health(self, service: str = "", timeout: float = 2.0) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc):
        await self.close()
