"""``loyalty audit list``, ``loyalty limits list``, ``loyalty member erase`` and ``loyalty member export``:
over a running server (``--server``) or on the database (``--database-url``: the CLI opens the service itself,
its changes audited with the actor ``local``)."""
from __future__ import annotations

import json

import click

from loyalty.cli.output import emit_json, emit_table, message_dict
from loyalty.cli.common import database_url_option, json_option
from loyalty.cli.server_commands import _Backend, _print, _server


def _all_audit(backend, since: str, actor: str) -> list:
    """Every page of ``ListAudit``."""
    entries, token = [], ""
    while True:
        page = backend.call("list_audit", {"since": since, "actor": actor, "page_size": 1000, "page_token": token})
        entries += page.entries
        token = page.next_page_token
        if not token:
            return entries


_since = click.option("--since", default="", metavar="DATE", help="From this ISO date or datetime (UTC without "
                                                                 "offset).")


def _either_backend(fn):
    """``--server`` (a running server) or ``--database-url`` (the database itself), and ``--json``."""
    return _server(database_url_option(json_option(fn)))


def register(group: click.Group) -> None:
    @group.group(name="audit")
    def audit_group():
        """The audit log: who changed what, and the refused admin calls."""

    @audit_group.command(name="list")
    @_since
    @click.option("--actor", default="", help="Only this actor (a key's name, a token's subject, local).")
    @_either_backend
    def audit_list(since, actor, server, database_url, as_json):
        """The audit log, oldest first."""
        with _Backend(server, database_url) as backend:
            entries = _all_audit(backend, since, actor)
        rows = [message_dict(e) for e in entries]
        if as_json:
            emit_json(rows)
            return
        emit_table(rows, ["id", "at", "actor", "actor_kind", "rpc", "target", "outcome", "digest"],
                   title=f"audit log ({len(rows)} entries)")

    @group.group(name="limits")
    def limits_group():
        """Operation limits (the program file's operation_limits)."""

    @limits_group.command(name="list")
    @_since
    @click.option("--limit", "count", type=click.IntRange(1, 1000), default=100, show_default=True)
    @_either_backend
    def limits_list(since, count, server, database_url, as_json):
        """Confirms that went past a soft limit, newest first (hard limits refuse and leave nothing)."""
        with _Backend(server, database_url) as backend:
            listing = backend.call("list_limit_breaches", {"since": since, "limit": count})
        _print(listing, as_json, lambda r: emit_table(
            [{"at": b.at, "limit": b.limit, "threshold": b.threshold, "value": b.value, "card": b.card,
              "receipt": f"{b.store}/{b.terminal}/{b.number}", "receipt_date": b.receipt_date} for b in r.breaches],
            ["at", "limit", "threshold", "value", "card", "receipt", "receipt_date"], title="soft limit breaches"))

    member_group = group.commands["member"]

    @member_group.command(name="erase")
    @click.argument("card")
    @click.option("--reason", required=True, help="The request this answers (kept with the erasure).")
    @_either_backend
    def member_erase(card, reason, server, database_url, as_json):
        """Erase a member's personal data; the ledger and purchases stay, anonymised."""
        with _Backend(server, database_url) as backend:
            done = backend.call("erase_member", {"card": card, "reason": reason})
        _print(done, as_json, lambda r: click.echo(
            f"member {r.member_id}: erased {r.erased_at}, {r.cards} card(s) "
            f"{'(erased before; nothing more done)' if r.replayed else 'made unfindable'}"))

    @member_group.command(name="export")
    @click.argument("card")
    @_server
    @database_url_option
    def member_export(card, server, database_url):
        """Everything held about one member, as one JSON document."""
        with _Backend(server, database_url) as backend:
            exported = backend.call("export_member", {"card": card})
        click.echo(json.dumps(json.loads(exported.json), ensure_ascii=False, indent=2))
