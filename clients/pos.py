"""``loyalty-pos``: a terminal simulator that walks a Frontol-like checkout against a running server.

    identify the card (GetMember) -> scan the lines one by one, recalculating after each (CalculateReceipt)
    -> ask for the write-off (up to max_points) -> close the receipt (ConfirmPurchase)
    -> return part of it (RefundPurchase) -> print the slip

It is what a POS integrator reads to see the calls in order, and what a demo runs against ``loyalty serve``
(the default card 7000001 is a demo member). ``--json`` prints one JSON object instead of the slip. Its
command line is the same framework as ``loyalty`` (click) and follows the same rules: ``--server`` /
``LOYALTY_SERVER``, one-line errors, ``--json`` numbers as numbers, a closed pipe ends quietly.
"""
from __future__ import annotations

import datetime as dt
import json
import time

import click

from loyalty.cli.common import DEFAULT_SERVER, ToolCommand, call, json_option, server_option
from loyalty.cli.output import emit_json, error_exit, message_dict
from loyalty.cli.security_commands import client_options, connect
from loyalty.clients.client import LoyaltyClient

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


def _basket(path: str | None) -> list[dict]:
    if not path:
        return DEFAULT_BASKET
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        error_exit(f"{path}: {exc.strerror or exc}")
    except ValueError as exc:
        error_exit(f"{path}: not a JSON list of lines ({exc})")


def _result_dict(result: dict) -> dict:
    """Everything the checkout saw, as JSON data (int64 amounts as numbers)."""
    optional = {k: None if result[k] is None else message_dict(result[k]) for k in ("member", "refund")}
    return {"member": optional["member"], "scans": result["scans"], "receipt": result["receipt"],
            "purchase": message_dict(result["purchase"]), "refund": optional["refund"]}


@click.command(name="loyalty-pos", cls=ToolCommand,
               context_settings={"help_option_names": ["-h", "--help"]},
               epilog="\b\nExample:\n  loyalty-pos --card 7000001\n"
                      "  LOYALTY_SERVER=10.0.0.5:50051 loyalty-pos --card '' --redeem 0 --return-line -1 --json")
@click.version_option(package_name="loyalty-server", prog_name="loyalty-pos", message="%(prog)s %(version)s")
@server_option
@client_options
@click.option("--card", default="7000001", show_default=True, help="Card to identify ('' for an anonymous receipt).")
@click.option("--basket", metavar="FILE.json", help="A JSON list of lines (sku, categories, quantity, price) "
                                                     "[default: SPEC 4's goods and a loaf].")
@click.option("--store", default="msk-01", show_default=True)
@click.option("--terminal", default="pos-1", show_default=True)
@click.option("--number", help="Receipt number [default: from the clock, unique].")
@click.option("--at", help="Local time of the receipt, ISO 8601 [default: now].")
@click.option("--redeem", type=click.IntRange(min=0), help="Points to write off [default: as many as allowed].")
@click.option("--return-line", type=int, default=0, show_default=True,
              help="Line index to return after closing (-1: none).")
@click.option("--return-quantity", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Thousandths to return.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds per call.")
@json_option
def main(server, card, basket, store, terminal, number, at, redeem, return_line, return_quantity, timeout,
         as_json):
    """A till against a running server: identify, scan, calculate, confirm, partial return, print the slip.

    The calls in order, as a POS integrator makes them; progress on stderr, the slip (or --json) on stdout.
    """
    lines = _basket(basket)
    number = number or time.strftime("%Y%m%d-%H%M%S-") + f"{time.time_ns() % 1_000_000:06d}"
    at = at or dt.datetime.now().astimezone().replace(microsecond=0).isoformat()
    log = None if as_json else (lambda line: click.echo(line, err=True))
    with connect(server or DEFAULT_SERVER, timeout=timeout) as client:
        result = call(run_checkout, client, card=card, basket=lines, store=store, terminal=terminal, number=number,
                      at=at, redeem=redeem, return_line=None if return_line < 0 else return_line,
                      return_quantity=return_quantity, log=log)
    if as_json:
        emit_json(_result_dict(result))
    else:
        click.echo(slip(result))


if __name__ == "__main__":
    main()
