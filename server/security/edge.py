"""Authentication and authorization at the gRPC edge: which scope each RPC needs, and who the caller is.

``SCOPE_OF`` is the one table: every RPC of every ``loyalty.v1`` service needs one scope (``GetMember``, the
till's member lookup, is also open to ``read``). ``admin`` includes ``read`` and ``integration``
(``keys.IMPLIED``); ``pos`` is apart and is the only scope bound to stores: a ``pos`` credential with stores may
calculate, confirm, refund or cancel only receipts of those stores (refunds and cancels by the purchase's
store, which is part of the purchase key) and the call is refused before anything is read or written.

Who is calling, in this order: ``authorization: Bearer <credential>`` (an API key ``lk_<id>_<secret>``, or a
JWT: three dot-separated parts) when sent; else, with mutual TLS, the client certificate's subject registered
as a certificate credential; else UNAUTHENTICATED. :meth:`Gate.identify` answers from memory (a key in the
ring, a token verified before): on the event loop, microseconds. When it cannot (a key created a moment ago,
a new token) it returns None and :meth:`Gate.identify_slow` runs in the I/O pool (refresh the ring, verify
the token's signature, maybe fetch the issuer's keys).

Health stays open. Reflection: ``open``, ``admin`` (the default: an admin credential) or ``off``.
"""
from __future__ import annotations

import asyncio

from grpc_reflection.v1alpha import _async as reflection_aio

from loyalty.server.errors import PermissionDenied, Unauthenticated
from loyalty.server.security import Principal

from .keys import PREFIX, KeyRing
from .oidc import OidcVerifier, is_jwt

__all__ = ["SCOPE_OF", "Gate", "GuardedReflection", "REFLECTION_MODES", "authorize", "authorize_store",
           "exposure_problem", "is_loopback"]

_POS, _INTEGRATION, _ADMIN, _READ = ("pos",), ("integration",), ("admin",), ("read",)

# Every RPC -> the scopes that may call it (one, except the member lookup).
SCOPE_OF: dict[str, dict[str, tuple[str, ...]]] = {
    "loyalty.v1.Processing": {
        "CalculateReceipt": _POS, "ConfirmPurchase": _POS, "RefundPurchase": _POS, "CancelPurchase": _POS,
        "GetMember": ("pos", "read"),
        "EnrollMember": _INTEGRATION, "UpdateMember": _INTEGRATION,
        "AdjustPoints": _ADMIN, "SetCardStatus": _ADMIN,
    },
    "loyalty.v1.Admin": {
        "PublishProgram": _ADMIN, "GetProgram": _READ, "ListProgramVersions": _READ,
        "ListAudit": _ADMIN, "ListLimitBreaches": _ADMIN, "EraseMember": _ADMIN, "ExportMember": _ADMIN,
    },
    "loyalty.v1.Segments": {
        "CreateSegment": _ADMIN, "UpdateSegment": _ADMIN, "DefineAudience": _ADMIN, "RecalculateSegment": _ADMIN,
        "AddMembers": _ADMIN, "RemoveMembers": _ADMIN, "ImportCsv": _ADMIN, "SetTag": _ADMIN,
        "GetSegment": _READ, "ListSegments": _READ, "CountMembers": _READ, "PreviewMembers": _READ,
        "ExportMembers": _READ, "ExportMembersStream": _READ, "GetHistory": _READ, "GetChanges": _READ,
    },
    "loyalty.v1.Scenarios": {
        "CreateScenario": _ADMIN, "UpdateScenario": _ADMIN, "RetryDeadLetter": _ADMIN, "StartBatch": _ADMIN,
        "ListScenarios": _READ, "GetScenarioStats": _READ, "GetFunnel": _READ, "ListDeadLetters": _READ,
        "GetBatchProgress": _READ,
        "RecordMessageEvents": _INTEGRATION,
    },
    "loyalty.v1.Keys": {
        "CreateKey": _ADMIN, "ListKeys": _ADMIN, "RevokeKey": _ADMIN, "RotateKey": _ADMIN,
    },
}

REFLECTION_MODES = ("open", "admin", "off")
_MISSING = "missing credential: send the metadata `authorization: Bearer <API key or token>`"


def _bearer(context) -> str | None:
    """The credential of ``authorization: Bearer <credential>``; None when there is no such metadata. Sent more
    than once it is ambiguous, and refused."""
    found = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            if found is not None:
                raise Unauthenticated("authorization: sent more than once; send one credential")
            scheme, _, credential = value.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise Unauthenticated("authorization: expected `Bearer <API key or token>`")
            found = credential.strip()
    return found


class Gate:
    """The authentication of one server process: ``keys`` (always, with ``--auth required``), ``oidc``
    (with ``--oidc-issuer``), ``certificates`` (mutual TLS: a registered client certificate identifies)."""

    def __init__(self, keys: KeyRing, oidc: OidcVerifier | None = None, *, certificates: bool = False):
        self.keys = keys
        self.oidc = oidc
        self.certificates = certificates

    def identify(self, context) -> Principal | None:
        """The caller from memory; None when only :meth:`identify_slow` can tell; ``Unauthenticated``."""
        value = _bearer(context)
        if value is None:
            if self.certificates:
                return self._certificate(context)
            raise Unauthenticated(_MISSING)
        if value.startswith(PREFIX):
            return self.keys.verify(value)
        if is_jwt(value):
            if self.oidc is None:
                raise Unauthenticated("authorization: this server accepts no tokens (no --oidc-issuer)")
            return self.oidc.cached(value)
        raise Unauthenticated("authorization: neither an API key (lk_...) nor a JWT")

    def identify_slow(self, context) -> Principal:
        """The caller when memory could not tell (blocking: storage, the issuer)."""
        value = _bearer(context)
        if value.startswith(PREFIX):
            self.keys.refresh_for_miss()
            principal = self.keys.verify(value)
            if principal is None:
                raise Unauthenticated("authorization: unknown API key")
            return principal
        return self.oidc.verify(value)

    async def principal(self, context, pool) -> Principal:
        principal = self.identify(context)
        if principal is None:
            principal = await asyncio.get_running_loop().run_in_executor(pool, self.identify_slow, context)
        return principal

    def _certificate(self, context) -> Principal:
        subjects = context.auth_context().get("x509_subject") or ()
        subject = subjects[0].decode() if subjects else ""
        principal = self.keys.certificate(subject) if subject else None
        if principal is None:
            raise Unauthenticated(f"client certificate {subject!r} is not registered "
                                  f"(`loyalty keys create --certificate SUBJECT`)" if subject else _MISSING)
        return principal


def authorize(principal: Principal, scopes: tuple[str, ...], method: str) -> None:
    """PERMISSION_DENIED unless ``principal`` holds one of ``scopes``."""
    for scope in scopes:
        if scope in principal.scopes:
            return
    raise PermissionDenied(f"{principal.kind} {principal.name!r} may not call {method} "
                           f"(needs scope {' or '.join(scopes)})")


def authorize_store(principal: Principal, store: str, field: str) -> None:
    """PERMISSION_DENIED when a store-bound credential names another store."""
    if not principal.may_serve_store(store):
        raise PermissionDenied(f"{field}: {principal.kind} {principal.name!r} may not serve store {store!r}",
                               field=field)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, *, auth_required: bool, tls: bool, insecure: bool) -> str | None:
    """Why the server must not listen on ``host`` as configured (None: it may). Loopback is the quick start;
    any other address is reachable by others, so it needs credentials and an encrypted channel, unless the
    operator says ``--insecure`` (a trusted network, TLS ended by a proxy in front)."""
    if is_loopback(host) or insecure:
        return None
    missing = [what for what, ok in (("--auth required", auth_required), ("TLS", tls))
               if not ok]
    if not missing:
        return None
    return (f"refusing to listen on {host}: an address beyond loopback needs --auth required and TLS "
            f"(--tls-cert and --tls-key), here without {' and '.join(missing)}; add them, bind 127.0.0.1, "
            f"or pass --insecure to accept that anyone who reaches the port may call every RPC")


class GuardedReflection(reflection_aio.ReflectionServicer):
    """Server reflection for admin credentials only (``--reflection admin``)."""

    def __init__(self, service_names, gate: Gate, pool):
        super().__init__(service_names)
        self._gate = gate
        self._pool = pool

    async def ServerReflectionInfo(self, request_iterator, context):  # noqa: N802 - grpc's name
        import grpc
        try:
            authorize(await self._gate.principal(context, self._pool), _ADMIN, "reflection")
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        except PermissionDenied as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.message)
        async for response in super().ServerReflectionInfo(request_iterator, context):
            yield response
