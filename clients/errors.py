"""The one exception of the clients: a failed call, or a request the client could not build."""
from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = ["LoyaltyError", "invalid_field"]

_DETAILS_KEY = "grpc-status-details-bin"


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


def invalid_field(field: str, reason: str) -> LoyaltyError:
    """A request the client refuses to send, shaped like the server's INVALID_ARGUMENT: ``field`` is the
    path (``receipt.lines[0].skuu``) and the message starts with it."""
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description=reason)])
    detail = status_pb2.Status().details.add()
    detail.Pack(bad)
    return LoyaltyError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {reason}", [detail])
