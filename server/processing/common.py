"""What every use case of the processing service shares: request hashes (the idempotency keys' payloads),
the storage-value safety net, the limits of free text and receipts, the retry signals."""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging

import orjson
from sqlalchemy.exc import DataError

from loyalty.v1 import processing_pb2

from ..convert import receipt_lists, receipt_strings
from ..errors import InvalidArgument
from ..members import check_text

log = logging.getLogger(__name__)


def _hash(message) -> str:
    """The canonical hash of a request: protobuf's deterministic encoding (map keys sorted) of the fields this
    server knows; unknown fields (a newer client's additions) are not part of the payload it checks."""
    known = type(message)()
    known.CopyFrom(message)
    known.DiscardUnknownFields()
    return hashlib.sha256(known.SerializeToString(deterministic=True)).hexdigest()


def _receipt_hash(card: str, phone: str, receipt: dict) -> str:
    """The canonical hash of a confirm's payload: the member reference and the receipt as the server reads them
    (``convert.receipt_to_dict``'s shape, which holds every field of ``Receipt``), keys sorted. Two requests
    with the same hash confirm the same purchase; how the client ordered or encoded its fields does not count,
    and neither do fields this server does not know."""
    return hashlib.sha256(orjson.dumps((card, phone, receipt), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _legacy_hashes(card: str, phone: str, receipt: dict) -> set[str]:
    """What releases before ``_receipt_hash`` stored for the same payload: ``_hash`` of the
    ``ConfirmPurchaseRequest`` message, rebuilt from what the server read (``receipt_to_dict``'s keys are the
    proto's field names, and an optional ``amount`` is present exactly when it was set; with neither card nor
    phone the message may have carried an empty ``member`` or none, so both). A retry across an upgrade, or
    between workers of two releases, replays instead of being ``AlreadyExists``."""
    message = processing_pb2.ConfirmPurchaseRequest(receipt=receipt)
    if card or phone:
        message.member.card, message.member.phone = card, phone
        return {_hash(message)}
    bare = _hash(message)
    message.member.SetInParent()
    return {bare, _hash(message)}


def _data_errors(method):
    """Safety net behind the validation: a value storage refuses (``DataError``: too long for its column, a
    character the database cannot hold) is the client's ``InvalidArgument``, never ``INTERNAL``; the
    driver's text goes to the log only."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except DataError as exc:
            log.warning("storage refused a value in %s: %s", method.__name__, exc)
            raise InvalidArgument("", "a value does not fit the field it is stored in (too long, or a "
                                      "character storage cannot hold)") from None
    return wrapper


# How far ahead of the server's clock a receipt's time may be (tills' clocks drift, time zones are misset).
RECEIPT_AHEAD = dt.timedelta(days=1)

# A group-commit batch is given at least this long in storage, even when a caller's deadline is nearer (a caller
# whose deadline is nearer than this when its batch starts is answered at once and nothing of it is written).
BATCH_MIN_TIME_S = 0.2

def _check_receipt(receipt: dict, path: str = "receipt") -> None:
    """Every string of a receipt (``convert.receipt_to_dict``'s shape) that the service stores or looks up
    fits storage (``check_text``): store / terminal / number and skus at most ``limits.ID_LIMIT`` characters,
    ``at`` at most ``limits.AT_LIMIT``, and no NUL character anywhere. (``convert.decode_receipt_request``'s ``fits`` tells a caller that
    decoded the request itself that this would pass.)"""
    for field, value, limit in receipt_strings(receipt, path):
        check_text(field, value, limit)
    for field, n, most in receipt_lists(receipt, path):
        if n > most:
            raise InvalidArgument(field, f"at most {most}, got {n}")


class _Retry(Exception):
    """A concurrent writer took the idempotency key first: run the transaction again to replay its answer."""


class _BudgetMoved(Exception):
    """A group-commit batch applied a budgeted promotion on a budget figure that other writers have since
    exhausted: the batch is rolled back and every confirm of it runs alone, on locked figures."""
