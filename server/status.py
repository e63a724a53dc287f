"""Domain errors as gRPC statuses: the one map from a ``ServiceError`` to its code, its client-facing message
and the rich details a program reads (``google.rpc`` BadRequest, ErrorInfo, PreconditionFailure, RetryInfo),
for every server that answers the API (``grpc_server``'s handlers and ``grpc_register``'s plain path)."""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from loyalty.server.errors import InvalidArgument, ServiceError

__all__ = ["status_for", "internal_status", "ERROR_DOMAIN", "STATUS_LIMIT"]

ERROR_DOMAIN = "loyalty.v1"


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# A status travels in the trailers, and a default gRPC client refuses trailers over 8 KiB: it then reports
# RESOURCE_EXHAUSTED, not the code we sent. Messages quote at most a prefix of a client's value
# (``loyalty.core.errors.quote``); as a safety net every text of a status is cut to STATUS_TEXT_LIMIT bytes and
# the whole (message percent-encoded, details base64-encoded, as they travel) kept under STATUS_LIMIT.
STATUS_TEXT_LIMIT = 512
STATUS_LIMIT = 4096
MAX_VIOLATIONS = 8


def _short(text: str, limit: int = STATUS_TEXT_LIMIT) -> str:
    """``text`` when its UTF-8 fits ``limit`` bytes, else as much of it as fits and its length."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return f"{data[:limit].decode(errors='ignore')}… ({len(text)} characters)"


def _trailer_size(status: status_pb2.Status) -> int:
    """About the bytes ``status`` takes in the trailers: ``grpc-message`` percent-encodes every byte outside
    printable ASCII, ``grpc-status-details-bin`` is base64."""
    message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in status.message.encode())
    return message + (status.ByteSize() * 4 + 2) // 3


def status_for(exc: ServiceError) -> grpc.Status:
    """The rich status of a domain error: its code, its client-facing message, and details a program can read
    (BadRequest field violations for bad input, ErrorInfo with the numbers for the rest), at most
    ``STATUS_LIMIT`` bytes of it: when the full one is larger, the message and the first field violation cut
    to 200 bytes, and the ErrorInfo with its short metadata values only."""
    status = _status(exc, STATUS_TEXT_LIMIT, MAX_VIOLATIONS, metadata=True)
    if _trailer_size(status) > STATUS_LIMIT:
        status = _status(exc, 200, 1, metadata=False)
    return rpc_status.to_status(status)


def _status(exc: ServiceError, limit: int, violations: int, *, metadata: bool) -> status_pb2.Status:
    code = getattr(code_pb2, exc.code, code_pb2.INTERNAL)
    details = []
    if isinstance(exc, InvalidArgument):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=_short(path, min(limit, 256)),
                                                        description=_short(reason, limit))
            for path, reason in exc.violations[:violations]])))
    else:
        items = [(k, str(v)) for k, v in list(exc.details.items())[:16] if v is not None]
        # cut short: only the short values (numbers such as available_points, a field name)
        info = ({k: _short(v, min(limit, 256)) for k, v in items} if metadata else
                {k: v for k, v in items[:8] if len(v) <= 64})
        reason = exc.details.get("reason") or exc.code
        failure = _precondition(exc)
        if failure is not None:
            if failure[0] == "NOT_ENOUGH_POINTS":
                reason = failure[0]
            violation = error_details_pb2.PreconditionFailure.Violation(
                type=failure[0], subject=failure[1], description=_short(exc.message, limit))
            details.append(_pack(error_details_pb2.PreconditionFailure(violations=[violation])))
        details.insert(0, _pack(error_details_pb2.ErrorInfo(reason=_short(str(reason), 64), domain=ERROR_DOMAIN,
                                                            metadata=info)))
        if exc.code == "UNAVAILABLE":
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=200_000_000))))
    return status_pb2.Status(code=code, message=_short(exc.message, limit), details=details)


def _precondition(exc: ServiceError) -> tuple[str, str] | None:
    """``(type, subject)`` of the PreconditionFailure a failed precondition carries: not enough points (the
    receipt's ``redeem_points``), or an operation limit (``security.limits``: the limit's name)."""
    if exc.code != "FAILED_PRECONDITION":
        return None
    if "available_points" in exc.details:
        return "NOT_ENOUGH_POINTS", "receipt.redeem_points"
    if "limit" in exc.details:
        return "OPERATION_LIMIT", str(exc.details["limit"])
    return None


def internal_status(incident: str) -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error (incident {incident}, logged on the server)",
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN,
                                                   metadata={"incident": incident}))]))
