"""Domain errors of the processing service. The gRPC layer maps each to its status code and a rich detail;
the message is written for the client (never ``str()`` of an internal exception, never a traceback)."""

__all__ = ["ServiceError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition",
           "Unavailable", "Unauthenticated", "PermissionDenied"]


class ServiceError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidArgument(ServiceError):
    """Bad input; ``path`` names the field as the client sent it (``receipt.lines[2].quantity``). ``also``:
    more ``(path, reason)`` of the same request, for fields that are wrong only together (``member.card`` and
    ``member.phone`` of two members); each becomes a field violation of the status's BadRequest."""
    code = "INVALID_ARGUMENT"

    def __init__(self, path: str, reason: str, *, also: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{path}: {reason}" if path else reason, path=path, reason=reason)
        self.path = path
        self.reason = reason
        self.violations = ((path, reason),) + tuple(also)


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """The idempotency key was used before with a different payload, or a unique value (a card, a phone) is
    taken; ``details["field"]`` then names the request's field."""
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    """E.g. not enough points: ``details["available_points"]`` says how many are."""
    code = "FAILED_PRECONDITION"


class Unavailable(ServiceError):
    """Storage (or another dependency) cannot be reached; nothing was written."""
    code = "UNAVAILABLE"


class Unauthenticated(ServiceError):
    """The call carries no credential the server accepts (none, unknown, expired, revoked, badly signed); the
    message says which, never echoing the credential."""
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """A known caller whose scopes (or stores, for a ``pos`` credential) do not cover the call."""
    code = "PERMISSION_DENIED"
