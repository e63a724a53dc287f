"""Typing stub of the compiled CalculateReceipt / ConfirmPurchase wire codec (``_wire.pyx``); the protobuf-based
reference with the same API is ``loyalty.server.convert``'s ``*_py`` functions."""
from typing import Any, Mapping

__all__ = ["decode_calculate_request", "decode_receipt_request", "encode_calculate_response", "encode_confirm_response"]

def decode_calculate_request(data: bytes) -> tuple[str, str, dict[str, Any]]:
    """``(member.card, member.phone, receipt)`` of a serialized ``loyalty.v1.CalculateReceiptRequest``, the
    receipt exactly as ``convert.receipt_to_dict`` makes it. ``ValueError`` when the bytes are not one
    (protobuf would raise ``DecodeError``)."""
    ...

def decode_receipt_request(data: bytes) -> tuple[str, str, dict[str, Any], bool]:
    """``decode_calculate_request``'s values and ``fits``: True when no string of the receipt holds a NUL and
    store / terminal / number / skus are at most 64 UTF-8 bytes and ``at`` at most 40 (what the service's
    receipt check lets through, so it need not run); False: the service must check."""
    ...

def encode_calculate_response(answer: Mapping[str, Any], program_version: int) -> bytes:
    """The serialized ``loyalty.v1.CalculateReceiptResponse`` of the core's answer dict (docs/ENGINE.md
    "Answer"), byte for byte what ``convert.answer_to_proto`` + ``SerializeToString`` give."""
    ...

def encode_confirm_response(purchase_id: str, answer: Mapping[str, Any], replayed: bool) -> bytes:
    """The serialized ``loyalty.v1.ConfirmPurchaseResponse`` (the answer carries its own ``program_version``),
    byte for byte what ``convert.encode_confirm_response_py`` gives."""
    ...
