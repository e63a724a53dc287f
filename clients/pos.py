"""``loyalty-pos``: a terminal simulator that walks a Frontol-like checkout against a running server.

    identify the card (GetMember) -> scan the lines one by one, recalculating after each (CalculateReceipt)
    -> ask for the write-off (up to max_points) -> close the receipt (ConfirmPurchase)
    -> return part of it (RefundPurchase) -> print the slip

It is what a POS integrator reads to see the calls in order, and what a demo runs against ``loyalty serve``
(the default card 7000001 is a demo member). ``--json`` prints one JSON object instead of the slip.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

from loyalty.clients.client import LoyaltyClient, LoyaltyError, to_dict

__all__ = ["main", "run_checkout", "DEFAULT_BASKET"]

# SPEC 4's worked-example goods plus a loaf, as a cashier scans them.
DEFAULT_BASKET = [
    {"sku": "milk-1l", "categories": ["dairy"], "quantity": 2000, "price": 8990},
    {"sku": "cheese-200", "categories": ["dairy"], "quantity": 1000, "price": 45000},
    {"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000, "price": 89900},
    {"sku": "bread-white", "categories": ["bread"], "quantity": 1000, "price": 5490},
]


def money(v: int) -> str:
    return f"{'-' if v < 0 else ''}{abs(v) // 100}.{abs(v) % 100:02d}"


def qty(q: int) -> str:
    return f"{q // 1000}" if q % 1000 == 0 else f"{q // 1000}.{q % 1000:03d}"


def run_checkout(client: LoyaltyClient, *, card: str, basket: list[dict], store: str, terminal: str, number: str,
                 at: str, redeem: int | None, return_line: int | None, return_quantity: int, log=None) -> dict:
    """The whole flow; returns everything it saw (the slip is printed from this)."""
    say = log or (lambda _line: None)
    member_ref = {"card": card} if card else {}
    member = client.get_member({"member": member_ref}) if card else None
    if member is not None:
        say(f"card {member.card}: {member.status}, {member.tier}, {member.active_points} points")
    receipt = {"store": store, "terminal": terminal, "number": number, "channel": "pos", "at": at,
               "redeem_points": 0, "lines": []}
    scans = []
    for line in basket:
        receipt["lines"].append(line)
        answer = client.calculate_receipt({"member": member_ref, "receipt": receipt}).answer
        scans.append({"sku": line["sku"], "payable": answer.totals.payable, "discount": answer.totals.discount,
                      "max_points": answer.totals.max_points})
        say(f"scan {line['sku']:<20} total {money(answer.totals.payable):>10}  "
            f"(discount {money(answer.totals.discount)}, up to {answer.totals.max_points} points)")
        for hint in answer.hints:
            say(f"  hint: {hint.message}")
    max_points = scans[-1]["max_points"] if scans else 0
    receipt["redeem_points"] = max_points if redeem is None else redeem
    confirmed = client.confirm_purchase({"member": member_ref, "receipt": receipt})
    say(f"confirmed purchase {confirmed.purchase_id}{' (replayed)' if confirmed.replayed else ''}")
    refund = None
    if return_line is not None and 0 <= return_line < len(receipt["lines"]):
        refund = client.refund_purchase({
            "refund_id": f"{store}/{terminal}/{number}/return-1",
            "purchase": {"store": store, "terminal": terminal, "number": number},
            "lines": [{"line": return_line, "quantity": min(return_quantity,
                                                           receipt["lines"][return_line]["quantity"])}],
            "reason": "customer changed their mind"})
        say(f"returned line {return_line}: {money(refund.refunded_amount)} back")
    return {"member": member, "scans": scans, "receipt": receipt, "purchase": confirmed, "refund": refund}


def slip(result: dict) -> str:
    answer = result["purchase"].answer
    receipt = result["receipt"]
    width = 56
    out = [f"{'RECEIPT ' + receipt['number']:^{width}}",
           f"store {receipt['store']}  terminal {receipt['terminal']}  {receipt['at']}", "-" * width]
    for src, line in zip(receipt["lines"], answer.lines):
        out.append(f"{line.sku:<28}{qty(src['quantity']):>6} x {money(src['price']):>9}{money(line.amount):>10}")
        for d in line.discounts:
            out.append(f"    discount {d.promotion:<30}{'-' + money(d.amount):>15}")
        if line.redeemed:
            out.append(f"    paid with points{'-' + money(line.redeemed):>37}")
    t = answer.totals
    out += ["-" * width,
            f"{'amount':<40}{money(t.amount):>16}",
            f"{'discounts':<40}{'-' + money(t.discount):>16}",
            f"{'written off: ' + str(t.redeemed_points) + ' points':<40}{'-' + money(t.redeemed_amount):>16}",
            f"{'TO PAY':<40}{money(t.payable - t.redeemed_amount):>16}",
            f"{'points earned (pending)':<40}{t.accrued_points:>16}"]
    for message in answer.messages:
        out.append(f"  * {message}")
    m = answer.member
    if not m.anonymous:
        out.append(f"card {m.card} ({m.tier}): {m.active_after} points active, {m.pending_after} pending")
        if m.next_tier:
            out.append(f"  {money(m.to_next_tier)} more to {m.next_tier}")
    refund = result["refund"]
    if refund is not None:
        out += ["-" * width, f"{'RETURN ' + refund.refund_id:^{width}}",
                f"{'money back':<40}{money(refund.refunded_amount):>16}",
                f"{'points given back':<40}{refund.returned_points:>16}",
                f"{'points taken back':<40}{refund.taken_back_points:>16}",
                f"balance after: {refund.active_points} active, {refund.pending_points} pending"]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="loyalty-pos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of a running loyalty server")
    parser.add_argument("--card", default="7000001", help="card to identify ('' for an anonymous receipt)")
    parser.add_argument("--basket", help="a JSON file with a list of lines (sku, categories, quantity, price)")
    parser.add_argument("--store", default="msk-01")
    parser.add_argument("--terminal", default="pos-1")
    parser.add_argument("--number", help="receipt number [default: from the clock, unique]")
    parser.add_argument("--at", help="local time of the receipt, ISO 8601 [default: now]")
    parser.add_argument("--redeem", type=int, help="points to write off [default: as many as allowed]")
    parser.add_argument("--return-line", type=int, default=0, help="line index to return after closing (-1: none)")
    parser.add_argument("--return-quantity", type=int, default=1000, help="thousandths to return [1000]")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the slip")
    for option, env, text in (("--api-key", "LOYALTY_API_KEY", "the terminal's API key"),
                              ("--token", "LOYALTY_TOKEN", "an OIDC access token"),
                              ("--tls-ca", "LOYALTY_TLS_CA", "use TLS, trusting this CA (PEM file)"),
                              ("--tls-cert", "LOYALTY_TLS_CERT", "client certificate for mutual TLS (PEM file)"),
                              ("--tls-key", "LOYALTY_TLS_KEY", "its private key (PEM file)")):
        parser.add_argument(option, default=os.environ.get(env) or None, help=f"{text} [env {env}]")
    args = parser.parse_args(argv)
    connection = {name: getattr(args, name) for name in ("api_key", "token", "tls_ca", "tls_cert", "tls_key")
                  if getattr(args, name)}

    basket = DEFAULT_BASKET
    if args.basket:
        try:
            with open(args.basket, encoding="utf-8") as f:
                basket = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"error: {args.basket}: {exc}", file=sys.stderr)
            return 2
    number = args.number or time.strftime("%Y%m%d-%H%M%S-") + f"{time.time_ns() % 1_000_000:06d}"
    at = args.at or dt.datetime.now().astimezone().replace(microsecond=0).isoformat()
    progress = None if args.json else (lambda line: print(line, file=sys.stderr))
    try:
        with LoyaltyClient(args.server, timeout=args.timeout, **connection) as client:
            result = run_checkout(client, card=args.card, basket=basket, store=args.store, terminal=args.terminal,
                                  number=number, at=at, redeem=args.redeem,
                                  return_line=None if args.return_line < 0 else args.return_line,
                                  return_quantity=args.return_quantity, log=progress)
    except LoyaltyError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2 if exc.code.name == "INVALID_ARGUMENT" else 1
    except ValueError as exc:       # a TLS file that cannot be read, a key and a token together
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "member": to_dict(result["member"]) if result["member"] is not None else None,
            "scans": result["scans"], "receipt": result["receipt"],
            "purchase": to_dict(result["purchase"]),
            "refund": to_dict(result["refund"]) if result["refund"] is not None else None,
        }, ensure_ascii=False))
    else:
        print(slip(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
