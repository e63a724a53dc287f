"""The audit log: who changed what, when, by which call, and how it ended (issue 13, SPEC 10).

Decided here:

- **Same transaction.** Every admin change and manual points operation calls :func:`record` on the connection
  of the transaction that makes the change, after it decided to make it: the row commits with the change or
  not at all, and a keyed call that replays a stored answer (a retried ``AdjustPoints`` with its operation id)
  returns before reaching the call, so a retry never writes a second row.
- **Refusals in their own transaction.** A refused admin call (bad argument, not found, failed precondition,
  permission denied) changed nothing, so :func:`record_refusal` writes its row alone. :func:`audited` wraps an
  admin RPC's service function for the edge: it names the call (:func:`calling`) and records the refusal of
  any ``ServiceError`` but ``UNAVAILABLE`` (storage down: the row could not be written either).
- **What a row holds.** The actor is ``security.current()`` (the principal the edge authenticated; ``local``
  without authentication); the digest is the sha256 of the request's canonical form (protobuf's deterministic
  encoding of the fields this server knows, the secret fields emptied first: :func:`digest`), so a row proves
  which request it was without keeping its content. Targets name members by id, never by card or phone: the
  log is append-only and must not keep what an erasure removes.
- **Append-only.** Nothing here updates or deletes a row; a trigger refuses UPDATE, DELETE (and on PostgreSQL
  TRUNCATE) of ``audit_log`` (migration ``0009_audit``), and on SQLite an INSERT over an existing id (REPLACE;
  ``0010_audit_no_replace``).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
import logging

from sqlalchemy import insert, select

from ..errors import InvalidArgument, ServiceError
from ..members import normalize_phone
from ..timeutil import utcnow
from . import Principal, current
from .models import audit_log

__all__ = ["AUDITED_RPCS", "audited", "calling", "digest", "listing", "record", "record_refusal", "target_of"]

log = logging.getLogger(__name__)

# The admin RPCs whose calls are audited (successes by the transaction that changes, refusals by ``audited``).
# ``ExportMember`` changes nothing but reads everything held about a person: who did so is recorded too.
AUDITED_RPCS = frozenset({
    "PublishProgram", "EraseMember", "ExportMember",
    "AdjustPoints", "SetCardStatus",
    "CreateSegment", "UpdateSegment", "DefineAudience", "RecalculateSegment", "AddMembers", "RemoveMembers",
    "ImportCsv", "SetTag",
    "CreateScenario", "UpdateScenario", "StartBatch", "RetryDeadLetter",
    "CreateKey", "RevokeKey", "RotateKey",
})

# Who a refused call was when no credential identified it (missing, unknown, expired...).
UNIDENTIFIED = Principal("unidentified", "none", frozenset())

# Request fields never digested as they are (a key's secret): emptied before hashing.
SECRET_FIELDS = ("secret", "api_key", "token", "password")

_TEXT = 200                 # target and actor columns
_call: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("loyalty_audit_call", default=None)


def digest(message) -> str:
    """sha256 (hex) of ``message``'s canonical form: the fields this server knows (unknown ones dropped), secret
    fields emptied, protobuf's deterministic encoding (map keys sorted)."""
    known = type(message)()
    known.CopyFrom(message)
    known.DiscardUnknownFields()
    for name in SECRET_FIELDS:
        if name in known.DESCRIPTOR.fields_by_name:
            known.ClearField(name)
    return hashlib.sha256(known.SerializeToString(deterministic=True)).hexdigest()


@contextlib.contextmanager
def calling(rpc: str, request):
    """Serve ``request`` of ``rpc`` on this thread: :func:`record` takes the request's digest from here."""
    token = _call.set((rpc, digest(request)))
    try:
        yield
    finally:
        _call.reset(token)


def record(conn, rpc: str, target: str, now: dt.datetime | None = None) -> None:
    """The row of a change ``rpc`` makes to ``target`` (``member:12``, ``segment:vip``, ``program:7``), on
    ``conn``, the transaction making it; actor: ``security.current()``; digest: the request being served
    (:func:`calling`; empty when the change has no request, e.g. the demo seed)."""
    call = _call.get()
    _insert(conn, current(), rpc, target, call[1] if call else "", "OK", "", now or utcnow())


def record_refusal(db, principal: Principal, rpc: str, target: str, request_digest: str, status: str,
                   detail: str = "") -> None:
    """The row of a refused call (``status``: the gRPC code name, e.g. ``PERMISSION_DENIED``), in a transaction
    of its own (the change did not happen). Never raises: a refusal is answered even when its row cannot be
    written (logged)."""
    try:
        db.run_write(_insert, principal, rpc, target, request_digest, status, detail[:1000], utcnow())
    except Exception:  # noqa: BLE001 - the caller's answer is the refusal, not this
        log.warning("could not audit the refusal of %s (%s) by %s", rpc, status, principal.name, exc_info=True)


def _insert(conn, principal: Principal, rpc: str, target: str, request_digest: str, outcome: str, detail: str,
            now: dt.datetime) -> None:
    conn.execute(insert(audit_log).values(
        at=now, actor=principal.name[:_TEXT], actor_kind=principal.kind, rpc=rpc, target=target[:_TEXT],
        digest=request_digest, outcome=outcome, detail=detail))


def target_of(rpc: str, request) -> str:
    """What a refused request was about, from its non-personal keys (a refused call's member is not resolved,
    and a card or phone must not outlive an erasure in this log): ``operation:<id>``, ``batch:<id>``,
    ``message:<id>`` / ``run:<id>``, ``segment:<id>`` (the Segments RPCs' ``id``), ``program``; "" when it names
    only a member or carries a definition's text (the digest still identifies the request)."""
    fields = request.DESCRIPTOR.fields_by_name

    def field(name: str):
        return getattr(request, name) if name in fields else ""
    if rpc in ("RevokeKey", "RotateKey") and field("id"):
        return f"key:{request.id}"
    if field("operation_id"):
        return f"operation:{request.operation_id}"
    if field("batch_id"):
        return f"batch:{request.batch_id}"
    if rpc == "RetryDeadLetter":
        return f"{request.kind}:{request.id}"
    if field("id"):
        return f"segment:{request.id}"
    return "program" if rpc == "PublishProgram" else ""


def _repeated(field) -> bool:
    """Whether ``field`` is a list (protobuf 7's descriptors have ``is_repeated`` and no ``label``)."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def _identifiers(message, found: set[str]) -> set[str]:
    """The card numbers and phones ``message`` carries, at any depth."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for item in (value if _repeated(field) else (value,)):
                if hasattr(item, "ListFields"):
                    _identifiers(item, found)
        elif field.name in ("card", "phone", "cards", "phones"):
            for v in (value if _repeated(field) else (value,)):
                if v.strip():
                    # as sent, and as the services quote it (a phone normalised, a card stripped)
                    found.update({v, v.strip(), normalize_phone(v)} if "phone" in field.name else {v, v.strip()})
    return found


def without_identifiers(detail: str, request) -> str:
    """A refusal's message as the audit log keeps it: the request's card numbers and phones left out (the log
    is append-only and must not keep what an erasure removes; the digest still identifies the request)."""
    for value in sorted(_identifiers(request, set()), key=len, reverse=True):
        detail = detail.replace(value, "<member>")
    return detail


def audited(db, rpc: str, fn):
    """``fn(request)`` served as ``rpc``: named for :func:`record`, its refusals recorded."""
    def call(request):
        with calling(rpc, request):
            try:
                return fn(request)
            except ServiceError as exc:
                if exc.code != "UNAVAILABLE":
                    record_refusal(db, current(), rpc, target_of(rpc, request), digest(request), exc.code,
                                   without_identifiers(exc.message, request))
                raise
    call.__name__ = getattr(fn, "__name__", rpc)
    return call


# ---- reading ----------------------------------------------------------------------------------------------------

def listing(conn, *, since: dt.datetime | None = None, actor: str = "", limit: int = 100, after: int = 0) -> list[dict]:
    """At most ``limit`` rows with ids above ``after``, oldest first (by id: the order they were committed in
    is close enough for a reader, and ids never repeat); the paging is ``paging``'s, as every list's."""
    c = audit_log.c
    stmt = select(audit_log).where(c.id > after).order_by(c.id).limit(limit)
    if since is not None:
        stmt = stmt.where(c.at >= since)
    if actor:
        stmt = stmt.where(c.actor == actor)
    return [dict(r._mapping) for r in conn.execute(stmt)]
