"""Python clients of the loyalty server: :class:`LoyaltyClient` (blocking) and :class:`AsyncLoyaltyClient`
(grpc.aio), one method per RPC of ``loyalty.v1.Processing`` and ``loyalty.v1.Admin``, and
``record_message_events`` of ``loyalty.v1.Scenarios`` (what an e-mail / SMS provider's webhook bridge sends).

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

Who is calling and over what (``loyalty.clients.channel``): ``api_key=`` or ``token=`` (sent as
``authorization: Bearer ...``), ``tls_ca=`` / ``tls=True`` for TLS, ``tls_cert=`` / ``tls_key=`` for mutual TLS.

Requests are ``loyalty.v1`` messages or plain dicts with the proto's field names::

    with LoyaltyClient("127.0.0.1:50051") as client:
        answer = client.calculate_receipt({"member": {"card": "7000001"}, "receipt": {...}}).answer
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loyalty.clients.channel import connection_options
from loyalty.v1 import (
    admin_pb2, admin_pb2_grpc, processing_pb2, processing_pb2_grpc, scenarios_pb2, scenarios_pb2_grpc,
)

__all__ = ["LoyaltyClient", "AsyncLoyaltyClient", "LoyaltyError", "RETRYABLE", "to_dict", "build_request"]

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_DETAILS_KEY = "grpc-status-details-bin"

# RPC name -> (stub attribute, service, request class, idempotency key field to fill when empty)
_RPCS = {
    "calculate_receipt": ("CalculateReceipt", "processing", processing_pb2.CalculateReceiptRequest, None),
    "confirm_purchase": ("ConfirmPurchase", "processing", processing_pb2.ConfirmPurchaseRequest, None),
    "refund_purchase": ("RefundPurchase", "processing", processing_pb2.RefundPurchaseRequest, "refund_id"),
    "cancel_purchase": ("CancelPurchase", "processing", processing_pb2.CancelPurchaseRequest, None),
    "get_member": ("GetMember", "processing", processing_pb2.GetMemberRequest, None),
    "enroll_member": ("EnrollMember", "processing", processing_pb2.EnrollMemberRequest, "request_id"),
    "update_member": ("UpdateMember", "processing", processing_pb2.UpdateMemberRequest, "request_id"),
    "adjust_points": ("AdjustPoints", "processing", processing_pb2.AdjustPointsRequest, "operation_id"),
    "set_card_status": ("SetCardStatus", "processing", processing_pb2.SetCardStatusRequest, None),
    "publish_program": ("PublishProgram", "admin", admin_pb2.PublishProgramRequest, None),
    "get_program": ("GetProgram", "admin", admin_pb2.GetProgramRequest, None),
    "list_program_versions": ("ListProgramVersions", "admin", admin_pb2.ListProgramVersionsRequest, None),
    "list_audit": ("ListAudit", "admin", admin_pb2.ListAuditRequest, None),
    "list_limit_breaches": ("ListLimitBreaches", "admin", admin_pb2.ListLimitBreachesRequest, None),
    "erase_member": ("EraseMember", "admin", admin_pb2.EraseMemberRequest, None),     # idempotent by the card
    "export_member": ("ExportMember", "admin", admin_pb2.ExportMemberRequest, None),
    # idempotent by each event's own id, so a retried batch counts nothing twice
    "record_message_events": ("RecordMessageEvents", "scenarios", scenarios_pb2.RecordMessageEventsRequest, None),
}


class LoyaltyError(Exception):
    """A call that failed: ``code`` (grpc.StatusCode), ``message`` (the server's, written for clients),
    ``field`` / ``violations`` (BadRequest), ``reason`` / ``metadata`` (ErrorInfo), ``available_points``,
    ``preconditions`` ((type, subject) of PreconditionFailure: ``("OPERATION_LIMIT", "card_daily_confirms")``)."""

    def __init__(self, code: grpc.StatusCode, message: str, details=(), attempts: int = 1):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.attempts = attempts
        self.violations: list[tuple[str, str]] = []
        self.reason = ""
        self.metadata: dict[str, str] = {}
        self.preconditions: list[tuple[str, str]] = []
        for detail in details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.violations += [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason = info.reason
                self.metadata.update(info.metadata)
            elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
                failure = error_details_pb2.PreconditionFailure()
                detail.Unpack(failure)
                self.preconditions += [(v.type, v.subject) for v in failure.violations]

    @property
    def field(self) -> str | None:
        """The (first) bad field of INVALID_ARGUMENT, or the taken one of ALREADY_EXISTS (``phone``)."""
        return self.violations[0][0] if self.violations else self.metadata.get("field")

    @property
    def available_points(self) -> int | None:
        value = self.metadata.get("available_points")
        return int(value) if value is not None else None

    def one_line(self) -> str:
        """``CODE: message`` (the message already names the field for bad input)."""
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, metadata, attempts: int) -> "LoyaltyError":
        details = ()
        for key, value in metadata or ():
            if key == _DETAILS_KEY:
                details = status_pb2.Status.FromString(value).details
        return cls(err.code(), err.details() or "", details, attempts)


def build_request(name: str, request=None):
    """The request message of the client method ``name`` (``"confirm_purchase"``) from a message, a dict of its
    fields or None, its idempotency key filled when empty: what the method itself sends (for a caller that
    hands it to something else, as the CLI does to a service in process)."""
    _rpc, _service, cls, key_field = _RPCS[name]
    return _request(cls, request, key_field)


def _request(cls, request, key_field):
    if isinstance(request, dict):
        request = json_format.ParseDict(request, cls())
    elif request is None:
        request = cls()
    elif not isinstance(request, cls):
        raise TypeError(f"expected {cls.DESCRIPTOR.full_name} or a dict, got {type(request).__name__}")
    if key_field and not getattr(request, key_field):
        filled = cls()
        filled.CopyFrom(request)
        setattr(filled, key_field, uuid.uuid4().hex)
        request = filled
    return request


def to_dict(message) -> dict:
    """A response as a dict with the proto's field names, zeros included (for ``--json`` output)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _backoff(attempt: int, base: float, cap: float) -> float:
    return random.uniform(0.5, 1.0) * min(cap, base * (2 ** attempt))


_OPTIONS = [("grpc.keepalive_time_ms", 30_000), ("grpc.enable_retries", 0)]


class _Base:
    def __init__(self, target: str, *, timeout: float = 5.0, retries: int = 4, backoff: float = 0.05,
                 max_backoff: float = 2.0, metadata=None):
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.metadata = tuple(metadata or ())


class LoyaltyClient(_Base):
    """Blocking client. ``timeout`` is the deadline of each attempt; ``retries`` the attempts after the first;
    ``interceptors`` are grpc client interceptors (tracing, tests); ``api_key`` / ``token`` / ``tls_*``: see
    ``loyalty.clients.channel``."""

    def __init__(self, target: str, *, interceptors=(), **kwargs):
        credentials, auth = connection_options(kwargs)
        super().__init__(target, **kwargs)
        self.metadata += auth
        self.channel = (grpc.insecure_channel(target, options=_OPTIONS) if credentials is None
                        else grpc.secure_channel(target, credentials, options=_OPTIONS))
        if interceptors:
            self.channel = grpc.intercept_channel(self.channel, *interceptors)
        self._stubs = {"processing": processing_pb2_grpc.ProcessingStub(self.channel),
                       "admin": admin_pb2_grpc.AdminStub(self.channel),
                       "scenarios": scenarios_pb2_grpc.ScenariosStub(self.channel)}

    def call(self, name: str, request=None, *, timeout: float | None = None, retries: int | None = None):
        rpc, service, cls, key_field = _RPCS[name]
        request = _request(cls, request, key_field)
        method = getattr(self._stubs[service], rpc)
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                if err.code() in RETRYABLE and attempt < retries:
                    time.sleep(_backoff(attempt, self.backoff, self.max_backoff))
                    attempt += 1
                    continue
                raise LoyaltyError.from_rpc_error(err, err.trailing_metadata(), attempt + 1) from None

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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncLoyaltyClient(_Base):
    """grpc.aio client; create it inside the running event loop."""

    def __init__(self, target: str, *, interceptors=(), **kwargs):
        credentials, auth = connection_options(kwargs)
        super().__init__(target, **kwargs)
        self.metadata += auth
        interceptors = list(interceptors) or None
        self.channel = (grpc.aio.insecure_channel(target, options=_OPTIONS, interceptors=interceptors)
                        if credentials is None else
                        grpc.aio.secure_channel(target, credentials, options=_OPTIONS, interceptors=interceptors))
        self._stubs = {"processing": processing_pb2_grpc.ProcessingStub(self.channel),
                       "admin": admin_pb2_grpc.AdminStub(self.channel),
                       "scenarios": scenarios_pb2_grpc.ScenariosStub(self.channel)}

    async def call(self, name: str, request=None, *, timeout: float | None = None, retries: int | None = None):
        rpc, service, cls, key_field = _RPCS[name]
        request = _request(cls, request, key_field)
        method = getattr(self._stubs[service], rpc)
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            call = method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            try:
                return await call
            except grpc.RpcError as err:
                if err.code() in RETRYABLE and attempt < retries:
                    await asyncio.sleep(_backoff(attempt, self.backoff, self.max_backoff))
                    attempt += 1
                    continue
                raise LoyaltyError.from_rpc_error(err, await call.trailing_metadata(), attempt + 1) from None

    async def health(self, service: str = "", timeout: float = 2.0) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def _add_methods(cls, is_async: bool) -> None:
    for name, (rpc, _service, req_cls, key_field) in _RPCS.items():
        def make(name=name):
            if is_async:
                async def method(self, request=None, **kwargs):
                    return await self.call(name, request, **kwargs)
            else:
                def method(self, request=None, **kwargs):
                    return self.call(name, request, **kwargs)
            method.__name__ = name
            key = f" An empty ``{key_field}`` is filled with a random one before the first attempt." \
                if key_field else ""
            method.__doc__ = (f"``{rpc}``: ``request`` is a {req_cls.DESCRIPTOR.full_name} or a dict of its "
                              f"fields; ``timeout=`` / ``retries=`` override the client's.{key}")
            return method
        setattr(cls, name, make())


_add_methods(LoyaltyClient, is_async=False)
_add_methods(AsyncLoyaltyClient, is_async=True)
