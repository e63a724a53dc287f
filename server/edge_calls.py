"""What every call of the gRPC edge goes through, apart from the server object (``grpc_server.LoyaltyServer``):
the request bytes decoded (into messages, or straight into the core's dicts for CalculateReceipt and
ConfirmPurchase), the work run on a pool thread as its caller within its storage deadline, the key an operator
greps for, a stream's chunks taken one at a time, and the outcome: the status with the request id in the
trailers, one log line, the audit row of an admin call refused for its credential."""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import uuid

import grpc
from google.protobuf.message import DecodeError

from loyalty.server.convert import decode_receipt_request
from loyalty.server.db import deadline as db_deadline
from loyalty.server.errors import InvalidArgument, ServiceError
from loyalty.server.logs import REQUEST_ID
from loyalty.server.security import acting_as, audit
from loyalty.server.status import internal_status, status_for

log = logging.getLogger("loyalty.server.grpc")


def bounded(until: float, principal, call, request):
    """``call(request)`` on a pool thread, as ``principal`` (``security.current()``), its storage work bounded
    by ``until`` (``db.deadline``)."""
    with db_deadline(until), acting_as(principal):
        return call(request)


def audit_refusal(db, rpc: str, principal, decode, raw: bytes, code: str, detail: str) -> None:
    """The audit row of an admin call refused before its service function was reached: for its credential,
    or because ``raw`` is not its request (then recorded by the bytes' sha256 alone)."""
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


def next_chunk(chunks):
    """The next message of a streaming method's generator, None after the last."""
    return next(chunks, None)


def close_when_done(pending: concurrent.futures.Future | None, chunks) -> None:
    """Close a stream's generator (its database read ends) once no pool thread is inside it any more."""
    if pending is None:
        chunks.close()
    else:
        pending.add_done_callback(lambda _future: chunks.close())


def code_of(exc: BaseException) -> str:
    """The code a failed call is counted under: a domain error's, CANCELLED when the call was cancelled (or
    its stream closed), else INTERNAL."""
    if isinstance(exc, ServiceError):
        return exc.code
    return "INTERNAL" if isinstance(exc, Exception) else "CANCELLED"


async def end_failed(context, method: str, exc: BaseException, code: str, where: str) -> None:
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


def calculate_key(request: tuple[str, str, dict, bool]) -> str:
    """``request_key`` of a decoded ``CalculateReceiptRequest`` (``(card, phone, receipt dict, fits)``)."""
    card, _phone, receipt, _fits = request
    key = ""
    if receipt["store"] or receipt["terminal"] or receipt["number"]:
        key = f"receipt={receipt['store']}/{receipt['terminal']}/{receipt['number']}"
    if card:
        key += f" card={card}"
    return key.strip()


# ---- request and response bytes -------------------------------------------------------------------------------

def message_decoder(request_cls):
    full_name = request_cls.DESCRIPTOR.full_name

    def decode(raw: bytes):
        try:
            return request_cls.FromString(raw)
        except DecodeError:
            raise InvalidArgument("", f"not a valid {full_name} message") from None
    return decode


def serializing(fn):
    def call(request) -> bytes:
        return fn(request).SerializeToString()
    return call


def dict_decoder(full_name: str):
    """The request bytes of CalculateReceipt or ConfirmPurchase (both ``member = 1, receipt = 2``) straight to
    ``(card, phone, receipt dict, fits)`` (the compiled codec; ``fits``: the strings need no storage check)."""
    def decode(raw: bytes) -> tuple[str, str, dict, bool]:
        try:
            return decode_receipt_request(raw)
        except ValueError:
            raise InvalidArgument("", f"not a valid {full_name} message") from None
    return decode


decode_calculate = dict_decoder("loyalty.v1.CalculateReceiptRequest")
decode_confirm = dict_decoder("loyalty.v1.ConfirmPurchaseRequest")


# ---- the call's outcome ---------------------------------------------------------------------------------------

# The level of a failed call's line: the server's trouble warns, the caller's is information.
ERROR_LEVELS = {"UNAVAILABLE": logging.WARNING, "INTERNAL": logging.WARNING}


async def abort(context: grpc.aio.ServicerContext, status: grpc.Status, rid: str) -> None:
    """End the call with ``status``, its trailing metadata (rich details) and the request id together (an
    abort's own trailers replace the ones set before)."""
    await context.abort(status.code, status.details, tuple(status.trailing_metadata) + ((REQUEST_ID, rid),))


def log_call(level: int, method: str, code: str, elapsed: float, rid: str, context, key: str,
              detail: str | None) -> None:
    """The call's line (``logs``): in the text, and as fields for JSON."""
    peer = context.peer()
    duration_ms = round(elapsed * 1000, 3)
    log.log(level, "%s %s %.2fms request_id=%s peer=%s %s%s", method, code, duration_ms, rid, peer, key or "-",
            f": {detail}" if detail else "",
            extra={"request_id": rid, "method": method, "code": code, "duration_ms": duration_ms, "peer": peer,
                   "key": key, "detail": detail})
