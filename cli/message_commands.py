"""``loyalty messages record FILE``: message events from e-mail / SMS / push providers (delivered, opened,
clicked, bounced, unsubscribed, confirmed by double opt-in), one JSON object per line, sent in batches to a
running server's ``RecordMessageEvents`` (``--server``) or written straight to ``--database-url``.

The whole file is checked before anything is sent: a bad line exits 2 with ``FILE:LINE: <field>: <reason>``
and nothing is written. Events are idempotent by their ``id``, so running the same file again (after a
failure half-way, say) records only what is missing. Events the server cannot place (an unknown card, an
unknown delivery) are listed by line on stderr and make the exit 1; the rest is recorded.
"""
from __future__ import annotations

import json
import re
import sys

import click

from loyalty.cli.common import DEFAULT_SERVER, call, check_server, database_url_option, json_option, resolve_url
from loyalty.cli.output import emit_json, error_exit, message_dict
from loyalty.cli.security_commands import client_options

__all__ = ["register"]
_INDEX_RE = re.compile(r"^events\[(\d+)\]\.?(.*)$")


def _read_lines(file: str) -> list[tuple[int, str]]:
    try:
        if file == "-":
            text = sys.stdin.read()
        else:
            with open(file, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        error_exit(f"{file}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        error_exit(f"{file}: not UTF-8 text")
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse(file: str, lines: list[tuple[int, str]]) -> list[dict]:
    """Every line as an event, checked as the server will check it; the first bad one ends the command."""
    from loyalty.server.errors import InvalidArgument
    from loyalty.server.scenarios.message_events import validate_event

    name = "stdin" if file == "-" else file
    events = []
    for n, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            error_exit(f"{name}:{n}: invalid JSON at column {exc.colno}: {exc.msg}")
        try:
            validate_event(obj, "event")
        except InvalidArgument as exc:
            field = exc.path.removeprefix("event").lstrip(".") or "event"
            error_exit(f"{name}:{n}: {field}: {exc.reason}")
        events.append(obj)
    return events


def _sender(server: str | None, database_url: str | None):
    """``(send(batch) -> dict, close())``: over gRPC, or on the database when only --database-url is given."""
    if database_url and not server:
        from loyalty.server.scenarios.service import ScenarioService
        service = call(ScenarioService.open, resolve_url(database_url))
        return service.record_message_events, service.close

    from loyalty.cli.security_commands import connect
    client = connect(server or DEFAULT_SERVER, timeout=30.0, retries=4)

    def send(batch):
        return message_dict(client.record_message_events({"events": batch}))
    return send, client.close


def register(group: click.Group) -> None:
    @group.group(name="messages")
    def messages_group():
        """Message events reported back by e-mail / SMS / push providers."""

    @messages_group.command(name="record")
    @click.argument("file", metavar="FILE.jsonl|-")
    @click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 1000),
                  help="Events per RecordMessageEvents call.")
    @click.option("--server", envvar="LOYALTY_SERVER", metavar="HOST:PORT", callback=check_server,
                  help=f"A running loyalty server [default: {DEFAULT_SERVER}, unless --database-url is given; "
                       f"env LOYALTY_SERVER]")
    @client_options
    @database_url_option
    @json_option
    def record_cmd(file, batch_size, server, database_url, as_json):
        """Record the events in FILE (JSON lines; - reads stdin). Each line is one event:

        \b
        {"id": "evt-1", "card": "7000001", "channel": "email", "kind": "confirmed",
         "at": "2026-03-02T12:30:00+03:00"}

        id is the provider's event id (the idempotency key); the member is given by card, phone or member_id,
        or by message_id (our delivery's key or Message-ID); kind is one of sent, delivered, opened, clicked,
        bounced, unsubscribed, confirmed. unsubscribed / confirmed switch the member's subscription to the
        channel off / on."""
        lines = _read_lines(file)
        events = _parse(file, lines)
        send, close = _sender(server, database_url)
        totals = {"events": len(events), "recorded": 0, "duplicates": 0, "subscriptions_changed": 0,
                  "rejected": []}
        try:
            for start in range(0, len(events), batch_size):
                out = call(send, events[start:start + batch_size])
                for key in ("recorded", "duplicates", "subscriptions_changed"):
                    totals[key] += int(out.get(key, 0))
                for r in out["rejected"]:
                    m = _INDEX_RE.match(r["field"])
                    totals["rejected"].append({"line": lines[start + r["index"]][0], "id": r["id"],
                                               "field": m.group(2) if m else r["field"], "reason": r["reason"]})
        finally:
            close()
        if as_json:
            emit_json(totals)
        else:
            for r in totals["rejected"]:
                click.echo(f"rejected: line {r['line']} (id {r['id']}): {r['field']}: {r['reason']}", err=True)
            click.echo(f"{totals['events']} events: {totals['recorded']} recorded, {totals['duplicates']} "
                       f"duplicates, {len(totals['rejected'])} rejected; {totals['subscriptions_changed']} "
                       f"subscriptions changed")
        if totals["rejected"]:
            sys.exit(1)
