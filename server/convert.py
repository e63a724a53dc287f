"""Between the API's messages (``loyalty.v1``) and the core's plain dicts (SPEC section 4's JSON).

The names are the same on both sides, so this is copying, not translating: a proto ``Receipt`` becomes the
``receipt`` object of the calc JSON (proto3 defaults become absent keys, so the core applies its own
defaults), and the core's answer dict becomes a ``ReceiptAnswer``. Paths in the core's ``InputError`` are
therefore already the proto field paths the client sent.

``CalculateReceipt`` and ``ConfirmPurchase`` skip the messages altogether: ``decode_calculate_request(raw) ->
(card, phone, receipt)`` (both requests are ``member = 1, receipt = 2``; ``decode_receipt_request`` adds
``fits``: the receipt's strings are known to pass the service's storage check, which then need not run),
``encode_calculate_response(answer, program_version) -> bytes`` and ``encode_confirm_response(purchase_id,
answer, replayed) -> bytes`` go between the wire bytes and the dicts directly. They are the compiled codec
``loyalty.server._wire`` unless ``LOYALTY_NO_EXTENSIONS=1`` asks for the reference (or the extension is
missing), as for the core: the reference is the same two steps through protobuf (``*_py`` below), and
tests/core/test_wire_codec.py holds the compiled one to it byte for byte.
"""
from __future__ import annotations


from google.protobuf.message import DecodeError

from loyalty.core import NO_EXTENSIONS
from loyalty.v1 import processing_pb2, receipt_pb2

from .limits import AT_LIMIT, CODE_LIMIT, ID_LIMIT, MAX_CATEGORIES, MAX_COUPONS
from .timeutil import iso

__all__ = ["receipt_to_dict", "answer_to_proto", "iso", "decode_calculate_request", "decode_receipt_request",
           "encode_calculate_response", "encode_confirm_response", "receipt_fits_storage", "receipt_strings",
           "WIRE_COMPILED"]

# The longest strings of a receipt, in characters, that storage takes are ``limits.ID_LIMIT`` (store, terminal,
# number, line sku) and ``limits.AT_LIMIT`` (the service checks them with ``processing._check_receipt``; the
# compiled decoder's ``fits`` applies the same figures to UTF-8 bytes).


def receipt_to_dict(receipt: receipt_pb2.Receipt) -> dict:
    lines = []
    for ln in receipt.lines:
        d = {"sku": ln.sku, "quantity": ln.quantity, "price": ln.price,
             "external_discount": ln.external_discount, "min_price": ln.min_price,
             "no_discount": ln.no_discount, "no_accrual": ln.no_accrual, "no_redeem": ln.no_redeem}
        if ln.categories:
            d["categories"] = list(ln.categories)
        if ln.HasField("amount"):
            d["amount"] = ln.amount
        lines.append(d)
    out = {"store": receipt.store, "terminal": receipt.terminal, "number": receipt.number,
           "coupons": list(receipt.coupons), "redeem_points": receipt.redeem_points, "lines": lines}
    if receipt.channel:
        out["channel"] = receipt.channel
    if receipt.at:
        out["at"] = receipt.at
    return out


def answer_to_proto(answer: dict) -> receipt_pb2.ReceiptAnswer:
    msg = receipt_pb2.ReceiptAnswer(
        promotions=answer.get("promotions", ()),
        messages=answer.get("messages", ()),
        program_version=answer.get("program_version", 0),
    )
    for ln in answer["lines"]:
        msg.lines.add(sku=ln["sku"], amount=ln["amount"], external_discount=ln.get("external_discount", 0),
                      discounts=[receipt_pb2.Discount(promotion=d["promotion"], amount=d["amount"])
                                 for d in ln.get("discounts", ())],
                      payable=ln["payable"], redeemed=ln["redeemed"], points=ln["points"])
    t = answer["totals"]
    msg.totals.CopyFrom(receipt_pb2.Totals(
        amount=t["amount"], external_discount=t.get("external_discount", 0), discount=t["discount"],
        payable=t["payable"], max_points=t["max_points"], redeemed_points=t["redeemed_points"],
        redeemed_amount=t["redeemed_amount"], accrued_points=t["accrued_points"]))
    for h in answer.get("hints", ()):
        msg.hints.add(promotion=h["promotion"], condition=h["condition"], missing=h["missing"],
                      message=h["message"])
    m = answer.get("member")
    if m:
        state = receipt_pb2.MemberState(
            card=m.get("card") or "", status=m.get("status") or "", tier=m.get("tier") or "",
            anonymous=bool(m.get("anonymous")), active_before=m.get("active_before") or 0,
            active_after=m.get("active_after") or 0, pending_before=m.get("pending_before") or 0,
            pending_after=m.get("pending_after") or 0, next_tier=m.get("next_tier") or "")
        if m.get("to_next_tier") is not None:
            state.to_next_tier = m["to_next_tier"]
        msg.member.CopyFrom(state)
    return msg


def decode_calculate_request_py(data: bytes) -> tuple[str, str, dict]:
    """``(member.card, member.phone, receipt_to_dict(receipt))`` of a serialized ``CalculateReceiptRequest``;
    ``ValueError`` when the bytes are not one."""
    try:
        request = processing_pb2.CalculateReceiptRequest.FromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a valid loyalty.v1.CalculateReceiptRequest: {exc}") from None
    return request.member.card, request.member.phone, receipt_to_dict(request.receipt)


def receipt_strings(receipt: dict, path: str = "receipt"):
    """``(field path, value, limit)`` of every string of ``receipt`` (``receipt_to_dict``'s shape) that the
    service stores, looks up or matches; ``limit`` None: any length, only no NUL. What
    ``processing._check_receipt`` checks and ``receipt_fits_storage`` tests."""
    for name in ("store", "terminal", "number"):
        yield f"{path}.{name}", receipt.get(name, ""), ID_LIMIT
    yield f"{path}.at", receipt.get("at", ""), AT_LIMIT
    yield f"{path}.channel", receipt.get("channel", ""), CODE_LIMIT
    for j, coupon in enumerate(receipt.get("coupons", ())):
        yield f"{path}.coupons[{j}]", coupon, CODE_LIMIT
    for i, ln in enumerate(receipt.get("lines", ())):
        yield f"{path}.lines[{i}].sku", ln.get("sku", ""), ID_LIMIT
        for j, category in enumerate(ln.get("categories", ())):
            yield f"{path}.lines[{i}].categories[{j}]", category, CODE_LIMIT


def receipt_lists(receipt: dict, path: str = "receipt"):
    """``(field path, length, most)`` of every list of codes in ``receipt``: the coupons, each line's
    categories."""
    yield f"{path}.coupons", len(receipt.get("coupons", ())), MAX_COUPONS
    for i, ln in enumerate(receipt.get("lines", ())):
        yield f"{path}.lines[{i}].categories", len(ln.get("categories", ())), MAX_CATEGORIES


def receipt_fits_storage(receipt: dict) -> bool:
    """True when no string of ``receipt`` holds a NUL and none is longer than its limit in UTF-8 bytes
    (``receipt_strings``): the ``fits`` of ``decode_receipt_request`` (a conservative test: bytes, not
    characters)."""
    return (all("\x00" not in value and (limit is None or len(value.encode()) <= limit)
                for _path, value, limit in receipt_strings(receipt))
            and all(n <= most for _path, n, most in receipt_lists(receipt)))


def decode_receipt_request_py(data: bytes) -> tuple[str, str, dict, bool]:
    """``decode_calculate_request_py``'s values and ``receipt_fits_storage`` of the receipt."""
    card, phone, receipt = decode_calculate_request_py(data)
    return card, phone, receipt, receipt_fits_storage(receipt)


def encode_calculate_response_py(answer: dict, program_version: int) -> bytes:
    """The serialized ``CalculateReceiptResponse`` of the core's answer dict."""
    message = answer_to_proto(answer)
    message.program_version = program_version
    return processing_pb2.CalculateReceiptResponse(answer=message).SerializeToString()


def encode_confirm_response_py(purchase_id: str, answer: dict, replayed: bool) -> bytes:
    """The serialized ``ConfirmPurchaseResponse`` (the answer carries its own ``program_version``)."""
    return processing_pb2.ConfirmPurchaseResponse(purchase_id=purchase_id, answer=answer_to_proto(answer),
                                                  replayed=replayed).SerializeToString()


_PY_CODEC = (decode_calculate_request_py, decode_receipt_request_py, encode_calculate_response_py,
             encode_confirm_response_py)
if NO_EXTENSIONS:
    decode_calculate_request, decode_receipt_request, encode_calculate_response, encode_confirm_response = _PY_CODEC
    WIRE_COMPILED = False
else:
    try:
        from ._wire import (decode_calculate_request, decode_receipt_request, encode_calculate_response,
                            encode_confirm_response)
        WIRE_COMPILED = True
    except ImportError:  # pragma: no cover - a build without the extension
        (decode_calculate_request, decode_receipt_request, encode_calculate_response,
         encode_confirm_response) = _PY_CODEC
        WIRE_COMPILED = False
