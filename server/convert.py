"""Between the API's messages (``loyalty.v1``) and the core's plain dicts (SPEC section 4's JSON).

The names are the same on both sides, so this is copying, not translating: a proto ``Receipt`` becomes the
``receipt`` object of the calc JSON (proto3 defaults become absent keys, so the core applies its own
defaults), and the core's answer dict becomes a ``ReceiptAnswer``. Paths in the core's ``InputError`` are
therefore already the proto field paths the client sent.
"""
from __future__ import annotations

import datetime as dt

from loyalty.v1 import receipt_pb2

__all__ = ["receipt_to_dict", "answer_to_proto", "iso"]


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


def iso(value: dt.datetime | dt.date | None) -> str:
    """ISO 8601 for the API; empty for None."""
    if value is None:
        return ""
    return value.isoformat()
