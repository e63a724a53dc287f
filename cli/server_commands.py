"""``loyalty serve`` and the operator commands around it: ``db``, ``jobs``, ``ledger``, ``program``, ``member``.

Thin on purpose: each command parses its options, calls one library function or one RPC (the same
``loyalty.v1`` request the admin API takes), and prints through ``loyalty.cli.output``, a table or a few
lines for people and ``--json`` (only JSON on stdout) for scripts. Errors are one line and a non-zero exit:
2 for bad input, 1 for everything else (``ledger check`` exits 1 when it finds a discrepancy).

``program`` commands work over gRPC (``--server``) or straight on a database (``--database-url``), so a
program can be published before any server runs; ``member`` commands go through a running server.
"""
from __future__ import annotations

import datetime as dt
import os
import pathlib
import signal
import sys
import time

import click

from loyalty.cli.common import (
    DEFAULT_SERVER, ServiceCommand, call, data_dir_named, database_url_option, demo_summary, display_url, fail,
    json_option, resolve_url, seed_demo, server_option,
)
from loyalty.cli.output import emit_json, emit_table, error_exit, message_dict, moment, rfc3339

from loyalty.cli.security_commands import (
    client_options, connect, describe_security, security_config, serve_security_options,
)

__all__ = ["register"]


def _server(fn):
    """``--server`` and the options saying who calls it and over what (``--api-key``, ``--tls-ca``...)."""
    return server_option(client_options(fn))

class _Backend:
    """The same request to a server over gRPC or to a ProcessingService opened on the database."""

    def __init__(self, server: str | None, database_url: str | None):
        self.server = server
        self.database_url = database_url
        self._client = self._service = None

    def __enter__(self):
        if not self.server and (self.database_url or data_dir_named()):
            from loyalty.server.processing import ProcessingService
            self._service = call(ProcessingService.open, resolve_url(self.database_url))
        else:
            self._client = connect(self.server or DEFAULT_SERVER, timeout=10.0, retries=2)
        return self

    def call(self, name: str, request):
        try:
            if self._service is not None:
                from loyalty.clients import build_request
                from loyalty.server.security import audit
                rpc = name.title().replace("_", "")
                fn = getattr(self._service, name)
                if rpc in audit.AUDITED_RPCS:   # as the server audits it (actor: local)
                    fn = audit.audited(self._service.db, rpc, fn)
                return fn(build_request(name, request))
            return self._client.call(name, request)
        except Exception as exc:  # noqa: BLE001 - one line, whatever it is
            fail(exc)

    def __exit__(self, *exc):
        if self._service is not None:
            self._service.close()
        if self._client is not None:
            self._client.close()


def _print(message, as_json: bool, human) -> None:
    if as_json:
        emit_json(message)
    else:
        human(message)


# ---- serve ----------------------------------------------------------------------------------------------------

def serve_command(host, port, database_url, redis_url, workers, demo, metrics_port, grace, threads, log_level,
                  log_format, access_log, otel, **security):
    from loyalty.server import tracing
    from loyalty.server.errors import ServiceError
    from loyalty.server.grpc_server import ServeConfig
    from loyalty.server.serving import check_serving, serve

    if workers < 1:
        error_exit("--workers: must be at least 1")
    _require_free_port(host, port)
    if tracing.wanted(otel) and (why := tracing.missing()):
        error_exit(f"--otel: {why}")
    from loyalty.server.db import default_url
    config = ServeConfig(database_url=database_url or default_url(), host=host, port=port, redis_url=redis_url,
                         workers=workers, metrics_port=metrics_port, grace=grace, io_threads=threads,
                         log_format=log_format, access_log=access_log, otel=otel,
                         **security_config(host, security))
    call(check_serving, config)     # before anything is written: a refused start changes nothing
    url = config.database_url = resolve_url(database_url, migrate=True)
    # the demo by default only on a new embedded database: a restart must not re-seed what was changed since
    if demo or (demo is None and not database_url and not call(_published, url)):
        click.echo(demo_summary(seed_demo(url)))
    click.echo(f"database: {display_url(url)}")
    if not call(_published, url):
        click.echo("no program is published: POS calls fail until one is; publish the demo with "
                   f"`loyalty demo seed --database-url {display_url(url)}` or yours with "
                   "`loyalty program publish FILE`")
    click.echo(describe_security(config))
    try:
        rc = serve(config, announce=click.echo, log_level=log_level)
    except OSError as exc:
        error_exit(f"{exc} (is another server there?)", code=1)
    except ServiceError as exc:
        fail(exc)
    sys.exit(rc)


def _require_free_port(host: str, port: int) -> None:
    """One line, before anything else is done, when ``host:port`` is taken (gRPC would only say so after
    the database was migrated and seeded, in a line of its own). A host the resolver does not know is left
    to gRPC to judge."""
    import socket
    if port == 0:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        return
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        error_exit(f"cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc} "
                   f"(is another server there?)", code=1)


def _published(url: str) -> bool:
    """Whether any program version is stored."""
    from sqlalchemy import create_engine, func, select
    from sqlalchemy.pool import NullPool

    from loyalty.server.models import program_versions
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(program_versions)).scalar() > 0
    finally:
        engine.dispose()


# ---- db, jobs, ledger -----------------------------------------------------------------------------------------

def _with_runtime(database_url, work):
    """Open the service on the database, run ``work(service.runtime)``, close it; any failure is one line."""
    from loyalty.server.processing import ProcessingService
    url = resolve_url(database_url)
    try:
        service = ProcessingService.open(url)
        try:
            return work(service.runtime)
        finally:
            service.close()
    except Exception as exc:  # noqa: BLE001
        fail(exc)


def register(group: click.Group) -> None:
    @group.command(name="serve", cls=ServiceCommand)
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535),
                  help="Port to listen on (0: any free port, printed).")
    @database_url_option
    @click.option("--redis-url", envvar="LOYALTY_REDIS_URL", metavar="URL",
                  help="Redis for announcing program publications to every process (optional).")
    @click.option("--workers", default=1, show_default=True, type=int,
                  help="Processes sharing the port (SO_REUSEPORT).")
    @click.option("--demo/--no-demo", default=None,
                  help="Seed the demo program (when none is published) and members [default: on with a new "
                       "embedded database].")
    @click.option("--metrics-port", type=int, default=None,
                  help="Serve Prometheus metrics at http://HOST:PORT/metrics (with --workers: the parent serves "
                       "every worker's, summed); without it a summary is logged every minute.")
    @click.option("--grace", type=float, default=10.0, show_default=True,
                  help="Seconds calls in flight get to finish on shutdown.")
    @click.option("--threads", type=int, default=16, show_default=True,
                  help="Threads per process for storage-bound calls.")
    @click.option("--log-level", default="INFO", show_default=True,
                  type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
    @serve_security_options
    @click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"]),
                  help="Log lines as text or as JSON objects (one per line).")
    @click.option("--access-log/--no-access-log", default=True, show_default=True,
                  help="A log line for every call (request id, method, code, duration, peer, key); "
                       "failed calls are logged either way.")
    @click.option("--otel", is_flag=True,
                  help="OpenTelemetry traces over OTLP (also on when OTEL_EXPORTER_OTLP_ENDPOINT is set; "
                       "needs the [otel] extra).")
    def serve(**options):
        """Run the gRPC server (Processing and Admin, health, reflection) in the foreground.

        With no options: an embedded SQLite database in the data dir, migrated, with the demo program and
        demo members (cards 7000001-7000005), listening on 127.0.0.1:50051. SIGTERM / Ctrl-C stop it
        gracefully, finishing the calls in flight. Every option can also be set by the environment variable
        shown beside it (LOYALTY_<OPTION>).
        """
        serve_command(**options)

    # -- db
    @group.group(name="db")
    def db_group():
        """The database schema."""

    @db_group.command(name="upgrade")
    @database_url_option
    @json_option
    def db_upgrade(database_url, as_json):
        """Create the database if needed and apply every migration (alembic upgrade head)."""
        url = resolve_url(database_url, migrate=True)
        if as_json:
            emit_json({"database": display_url(url), "schema": "head"})
        else:
            click.echo(f"{display_url(url)}: schema at head")

    # -- jobs
    @group.group(name="jobs")
    def jobs_group():
        """Periodic work: activate due points, expire old ones, recalculate tiers."""

    @jobs_group.command(name="run", cls=ServiceCommand)
    @click.option("--once", is_flag=True, help="Run one pass and exit.")
    @click.option("--interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True, help="Seconds between passes.")
    @database_url_option
    @click.option("--redis-url", envvar="LOYALTY_REDIS_URL", metavar="URL",
                  help="Redis to tell the servers at once that tiers, points or segments changed (optional: "
                       "they also poll).")
    @json_option
    def jobs_run(once, interval, database_url, redis_url, as_json):
        """Run the periodic jobs, once or every --interval seconds until interrupted."""
        from loyalty.server import jobs
        from loyalty.server.processing import ProcessingService
        service = call(ProcessingService.open, resolve_url(database_url), redis_url=redis_url)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while True:
                try:
                    counts = jobs.run_once(service.runtime)
                except Exception as exc:  # noqa: BLE001
                    if once:
                        fail(exc)
                    click.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
                    counts = None
                if counts is not None:
                    if as_json:
                        emit_json(counts)
                    else:
                        click.echo(rfc3339(dt.datetime.now(dt.timezone.utc)) + " " +
                                   ", ".join(f"{k}: {v}" for k, v in counts.items()))
                if once:
                    break
                deadline = time.monotonic() + interval
                while not stop and time.monotonic() < deadline:
                    time.sleep(min(0.5, interval))
                if stop:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            service.close()

    # -- ledger
    @group.group(name="ledger")
    def ledger_group():
        """Prove the points ledger and report what is owed."""

    @ledger_group.command(name="check")
    @database_url_option
    @json_option
    def ledger_check(database_url, as_json):
        """Sum the ledger and compare with the balances; exit 1 on any discrepancy."""
        from loyalty.server import ledger
        problems = _with_runtime(database_url, lambda runtime: ledger.check(runtime.db))
        if as_json:
            emit_json({"ok": not problems, "discrepancies": problems})
        elif problems:
            for line in problems:
                click.echo(line)
            click.echo(f"{len(problems)} discrepancies", err=True)
        else:
            click.echo("ledger and balances agree")
        sys.exit(1 if problems else 0)

    @ledger_group.command(name="liability")
    @database_url_option
    @json_option
    def ledger_liability(database_url, as_json):
        """Outstanding points: active, pending, expiring soon."""
        from loyalty.server import ledger
        report = _with_runtime(database_url, ledger.liability)
        if as_json:
            emit_json(report)
        else:
            emit_table([{"item": k, "value": v} for k, v in report.items()], ["item", "value"],
                       title="points liability")

    # -- program
    @group.group(name="program")
    def program_group():
        """Publish and read program versions (over --server, or on --database-url directly)."""

    @program_group.command(name="publish")
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option("--comment", default="", help="Why this version (kept with it).")
    @_server
    @database_url_option
    @json_option
    def program_publish(file, comment, server, database_url, as_json):
        """Validate FILE and publish it as the next version; every server process switches to it. A FILE that
        means the same program as the live version publishes nothing and says so (--json: "unchanged": true
        and the live version's record)."""
        try:
            text = pathlib.Path(file).read_text(encoding="utf-8")
        except FileNotFoundError:
            error_exit(f"{file}: file not found")
        except (OSError, UnicodeDecodeError) as exc:
            error_exit(f"{file}: cannot read ({exc})")
        with _Backend(server, database_url) as backend:
            version = backend.call("publish_program", {"yaml": text, "comment": comment})
        if as_json:
            record = message_dict(version)
            del record["yaml"]
            emit_json(record)
        elif version.unchanged:
            click.echo(f"{file} is identical to the live version {version.version} of {version.program}: "
                       f"nothing published")
        else:
            click.echo(f"published {version.program} version {version.version} (sha256 {version.checksum[:12]})")

    @program_group.command(name="show")
    @click.option("--version", "version", type=int, default=0, help="A version number [default: the current one].")
    @_server
    @database_url_option
    @json_option
    def program_show(version, server, database_url, as_json):
        """Print a version's YAML."""
        with _Backend(server, database_url) as backend:
            v = backend.call("get_program", {"version": version})
        _print(v, as_json, lambda v: click.echo(v.yaml, nl=not v.yaml.endswith("\n")))

    @program_group.command(name="versions")
    @_server
    @database_url_option
    @json_option
    def program_versions(server, database_url, as_json):
        """Every published version, newest first."""
        with _Backend(server, database_url) as backend:
            listing = backend.call("list_program_versions", {})
        _print(listing, as_json, lambda r: emit_table(
            [{"version": v.version, "program": v.program, "published_at": v.published_at,
              "current": "yes" if v.current else "", "comment": v.comment} for v in r.versions],
            ["version", "program", "published_at", "current", "comment"]))

    # -- member
    @group.group(name="member")
    def member_group():
        """Members over a running server: look up, enroll, update the profile, adjust points, change card
        status."""

    def _member_ref(card, phone):
        if not card and not phone:
            error_exit("member: give a CARD or --phone")
        return {"card": card or "", "phone": phone or ""}

    @member_group.command(name="get")
    @click.argument("card", required=False)
    @click.option("--phone", help="Find by phone instead of card.")
    @_server
    @json_option
    def member_get(card, phone, server, as_json):
        """Status, tier, balances, next expiry and progress of a member."""
        with _Backend(server or DEFAULT_SERVER, None) as backend:
            member = backend.call("get_member", {"member": _member_ref(card, phone)})
        _print(member, as_json, _show_member)

    @member_group.command(name="enroll")
    @click.option("--card", required=True)
    @click.option("--phone", default="")
    @_profile_options(clearable=False)
    @click.option("--source", default="manual", show_default=True,
                  type=click.Choice(["manual", "api", "form", "import", "pos"]))
    @click.option("--registered-at", default="", metavar="DATE",
                  help="When the member registered, YYYY-MM-DD or an ISO 8601 time (an import keeps the "
                       "original) [default: now].")
    @click.option("--request-id", default="", help="Idempotency key [default: a new random one].")
    @_server
    @json_option
    def member_enroll(card, phone, source, registered_at, request_id, server, as_json, **profile):
        """Register a member with a new card, with the profile and subscriptions segments use."""
        fields, custom, _clear, subs = _profile_request(profile)
        request = {"card": card, "phone": phone, "source": source, "request_id": request_id,
                   "registered_at": registered_at, "profile": {**fields, "custom": custom},
                   "subscriptions": subs}
        with _Backend(server or DEFAULT_SERVER, None) as backend:
            member = backend.call("enroll_member", request)
        _print(member, as_json, _show_member)

    @member_group.command(name="update")
    @click.argument("card")
    @click.option("--phone", default=None, help="A new phone (another member's: refused).")
    @_profile_options(clearable=True)
    @click.option("--request-id", default="", help="Idempotency key [default: a new random one].")
    @_server
    @json_option
    def member_update(card, phone, request_id, server, as_json, **profile):
        """Change the profile and subscriptions of the member of CARD; what is not given stays as it is."""
        fields, custom, clear_custom, subs = _profile_request(profile)
        if phone is not None:
            fields["phone"] = phone
        for name in profile["clear"]:
            if fields.get(name.replace("-", "_")):
                error_exit(f"--clear {name}: the same command also sets it")
            fields[name.replace("-", "_")] = ""
        request = {"member": {"card": card}, **fields, "custom": custom, "clear_custom": clear_custom,
                   "subscriptions": subs, "request_id": request_id}
        with _Backend(server or DEFAULT_SERVER, None) as backend:
            member = backend.call("update_member", request)
        _print(member, as_json, _show_member)

    @member_group.command(name="adjust")
    @click.argument("card")
    @click.option("--kind", type=click.Choice(["credit", "debit", "top_up"]), required=True)
    @click.option("--points", type=int, required=True)
    @click.option("--reason", required=True, help="Kept in the audit trail.")
    @click.option("--operation-id", default="", help="Idempotency key [default: a new random one, printed].")
    @click.option("--expiry-days", type=int, default=None, help="Credits: days until they expire.")
    @_server
    @json_option
    def member_adjust(card, kind, points, reason, operation_id, expiry_days, server, as_json):
        """Credit, debit or top up a member's points, with a reason."""
        request = {"member": {"card": card}, "kind": kind, "points": points, "reason": reason,
                   "operation_id": operation_id}
        if expiry_days is not None:
            request["expiry_days"] = expiry_days
        with _Backend(server or DEFAULT_SERVER, None) as backend:
            result = backend.call("adjust_points", request)
        _print(result, as_json, lambda r: click.echo(
            f"{kind} {points} points on {card}{' (replayed)' if r.replayed else ''}: active {r.active_points}, "
            f"pending {r.pending_points} (operation {r.operation_id})"))

    @member_group.command(name="status")
    @click.argument("card")
    @click.argument("status", type=click.Choice(["active", "restricted", "suspended", "blocked"]))
    @click.option("--reason", default="", help="Kept in the audit trail.")
    @_server
    @json_option
    def member_status(card, status, reason, server, as_json):
        """Change a card's status (leaving active switches subscriptions off; returning restores them)."""
        with _Backend(server or DEFAULT_SERVER, None) as backend:
            member = backend.call("set_card_status", {"card": card, "status": status, "reason": reason})
        _print(member, as_json, _show_member)


_GENDERS = {"f": "female", "female": "female", "m": "male", "male": "male"}
_CLEARABLE = ("phone", "first-name", "last-name", "gender", "birth-date", "email", "city")


def _profile_options(clearable: bool):
    """The profile, custom field and subscription options of ``member enroll`` / ``member update``; with
    ``clearable`` a profile option left out means "unchanged" and ``--clear FIELD`` empties a field."""
    default = None if clearable else ""
    options = [
        click.option("--first-name", default=default),
        click.option("--last-name", default=default),
        # (no default even on enrol: a Choice would refuse an empty one, and a left-out gender is no gender)
        click.option("--gender", default=None, type=click.Choice(["F", "M", "female", "male"], case_sensitive=False)),
        click.option("--birth-date", default=default, metavar="YYYY-MM-DD"),
        click.option("--email", default=default),
        click.option("--city", default=default),
        click.option("--field", "custom", multiple=True, metavar="NAME=VALUE",
                     help="A custom profile field (segments: custom: {NAME: VALUE}); repeatable."),
        click.option("--subscribe", multiple=True, metavar="CHANNEL",
                     help="Switch a channel on (email, sms, push); repeatable."),
        click.option("--unsubscribe", multiple=True, metavar="CHANNEL",
                     help="Switch a channel off; repeatable."),
    ]
    if clearable:
        options += [
            click.option("--clear", multiple=True, type=click.Choice(_CLEARABLE),
                         help="Empty a profile field; repeatable."),
            click.option("--clear-field", multiple=True, metavar="NAME", help="Remove a custom field; repeatable."),
        ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _profile_request(options: dict) -> tuple[dict, dict, list, dict]:
    """``(profile fields given, custom fields, custom fields to remove, subscriptions)`` of the options of
    ``_profile_options``; a bad option is one line and exit 2."""
    fields = {name: options[name] for name in ("first_name", "last_name", "gender", "birth_date", "email", "city")
              if options.get(name) is not None}
    if fields.get("gender"):
        fields["gender"] = _GENDERS[fields["gender"].lower()]
    custom = {}
    for item in options.get("custom") or ():
        name, eq, value = item.partition("=")
        if not eq or not name:
            error_exit(f"--field: expected NAME=VALUE, got {item!r}")
        custom[name] = value
    subs = {channel: True for channel in options.get("subscribe") or ()}
    for channel in options.get("unsubscribe") or ():
        if channel in subs:
            error_exit(f"--unsubscribe: {channel} is also in --subscribe")
        subs[channel] = False
    return fields, custom, list(options.get("clear_field") or ()), subs


def _money(v: int) -> str:
    sign = "-" if v < 0 else ""
    v = abs(v)
    return f"{sign}{v // 100}.{v % 100:02d}"


def _show_member(m) -> None:
    name = " ".join(x for x in (m.profile.first_name, m.profile.last_name) if x)
    rows = [("card", m.card), ("phone", m.phone), ("name", name), ("status", m.status), ("tier", m.tier),
            ("active points", m.active_points), ("pending points", m.pending_points)]
    if m.next_expiry_at:
        rows.append(("next expiry", f"{m.next_expiry_points} on {moment(m.next_expiry_at)}"))
    rows.append(("purchases sum", _money(m.purchases_sum)))
    if m.next_tier:
        rows.append(("next tier", f"{m.next_tier} in {_money(m.to_next_tier)}" if m.HasField("to_next_tier")
                     else m.next_tier))
    p = m.profile
    for label, value in (("gender", p.gender), ("birth date", p.birth_date), ("email", p.email),
                         ("city", p.city)):
        if value:
            rows.append((label, value))
    if p.custom:
        rows.append(("custom", ", ".join(f"{k}={v}" for k, v in sorted(p.custom.items()))))
    subs = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in sorted(m.subscriptions.items()))
    if subs:
        rows.append(("subscriptions", subs))
    rows += [("source", m.source), ("registered", moment(m.registered_at))]
    emit_table([{"field": k, "value": v} for k, v in rows], ["field", "value"], title=f"member {m.member_id}")
