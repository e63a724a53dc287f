"""``loyalty serve`` and the operator commands around it: ``db``, ``jobs``, ``ledger``, ``program``, ``member``.

Thin on purpose: each command parses its options, calls one library function or one RPC (the same
``loyalty.v1`` request the admin API takes), and prints through ``loyalty.cli.output``, a table or a few
lines for people and ``--json`` (only JSON on stdout) for scripts. Errors are one line and a non-zero exit:
2 for bad input, 1 for everything else (``ledger check`` exits 1 when it finds a discrepancy).

``program`` commands work over gRPC (``--server``) or straight on a database (``--database-url``), so a
program can be published before any server runs; ``member`` commands go through a running server.
"""
from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

import click

from loyalty.cli.common import fail
from loyalty.cli.output import emit_json, emit_table, error_exit

__all__ = ["register"]

DEFAULT_SERVER = "127.0.0.1:50051"

_database_url = click.option("--database-url", envvar="LOYALTY_DATABASE_URL", metavar="URL",
                             help="sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB "
                                  "[default: SQLite in the data dir; env LOYALTY_DATABASE_URL]")
_data_dir = click.option("--data-dir", envvar="LOYALTY_DATA_DIR", metavar="DIR", type=click.Path(file_okay=False),
                         help="Where the embedded SQLite database lives [default: ./.loyalty; env LOYALTY_DATA_DIR]")
_json = click.option("--json", "as_json", is_flag=True, help="Print JSON only (for scripts).")
_server = click.option("--server", envvar="LOYALTY_SERVER", metavar="HOST:PORT",
                       help=f"A running loyalty server [default: {DEFAULT_SERVER}; env LOYALTY_SERVER]")


def _resolve_url(database_url: str | None, data_dir: str | None = None) -> str:
    if database_url:
        return database_url
    if data_dir:
        os.environ["LOYALTY_DATA_DIR"] = data_dir
    from loyalty.server.db import default_url
    return default_url()


_fail = fail


class _Backend:
    """The same request to a server over gRPC or to a ProcessingService opened on the database."""

    def __init__(self, server: str | None, database_url: str | None):
        self.server = server
        self.database_url = database_url
        self._client = self._service = None

    def __enter__(self):
        if self.database_url and not self.server:
            from loyalty.server.processing import ProcessingService
            self._service = ProcessingService.open(self.database_url)
        else:
            from loyalty.clients import LoyaltyClient
            self._client = LoyaltyClient(self.server or DEFAULT_SERVER, timeout=10.0, retries=2)
        return self

    def call(self, name: str, request):
        try:
            if self._service is not None:
                from loyalty.clients import build_request
                return getattr(self._service, name)(build_request(name, request))
            return self._client.call(name, request)
        except Exception as exc:  # noqa: BLE001 - one line, whatever it is
            _fail(exc)

    def __exit__(self, *exc):
        if self._service is not None:
            self._service.close()
        if self._client is not None:
            self._client.close()


def _print(message, as_json: bool, human) -> None:
    from loyalty.clients import to_dict
    if as_json:
        emit_json(to_dict(message))
    else:
        human(message)


# ---- serve ----------------------------------------------------------------------------------------------------

def serve_command(host, port, data_dir, database_url, redis_url, workers, demo, metrics_port, grace, threads,
                  log_level):
    from loyalty.server import db
    from loyalty.server.errors import ServiceError
    from loyalty.server.grpc_server import ServeConfig, serve

    embedded = not database_url
    url = _resolve_url(database_url, data_dir)
    if demo is None:
        demo = embedded
    if workers < 1:
        error_exit("--workers: must be at least 1")
    try:
        db.upgrade(url)
        if demo:
            from loyalty.server.demo import seed_demo
            from loyalty.server.processing import ProcessingService
            service = ProcessingService.open(url)
            try:
                seeded = seed_demo(service)
            finally:
                service.close()
            created = seeded.get("members_created") or []
            click.echo(f"demo: program {'published' if seeded.get('program_version') else 'current'}, "
                       f"{len(created)} member(s) created (cards 7000001-7000005)")
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    click.echo(f"database: {_display_url(url)}")
    config = ServeConfig(database_url=url, host=host, port=port, redis_url=redis_url, workers=workers,
                         metrics_port=metrics_port, grace=grace, io_threads=threads)
    try:
        rc = serve(config, announce=click.echo, log_level=log_level)
    except OSError as exc:
        error_exit(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server there?)", code=1)
    except ServiceError as exc:
        _fail(exc)
    sys.exit(rc)


def _display_url(url: str) -> str:
    """The URL without its password, for printing."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


# ---- db, jobs, ledger -----------------------------------------------------------------------------------------

def _open_service(database_url, data_dir=None, redis_url=None):
    from loyalty.server.processing import ProcessingService
    return ProcessingService.open(_resolve_url(database_url, data_dir), redis_url=redis_url)


def _with_runtime(database_url, data_dir, work):
    """Open the service on the database, run ``work(service.runtime)``, close it; any failure is one line."""
    try:
        service = _open_service(database_url, data_dir)
        try:
            return work(service.runtime)
        finally:
            service.close()
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


def register(group: click.Group) -> None:
    @group.command(name="serve")
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
    @click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535),
                  help="Port to listen on (0: any free port, printed).")
    @_data_dir
    @_database_url
    @click.option("--redis-url", envvar="LOYALTY_REDIS_URL", metavar="URL",
                  help="Redis for announcing program publications to every process (optional).")
    @click.option("--workers", default=1, show_default=True, type=int,
                  help="Processes sharing the port (SO_REUSEPORT).")
    @click.option("--demo/--no-demo", default=None,
                  help="Seed the demo program and members [default: on with the embedded database].")
    @click.option("--metrics-port", type=int, default=None,
                  help="Serve Prometheus metrics at http://HOST:PORT/metrics (worker i: PORT+i); "
                       "without it a summary is logged every minute.")
    @click.option("--grace", type=float, default=10.0, show_default=True,
                  help="Seconds calls in flight get to finish on shutdown.")
    @click.option("--threads", type=int, default=16, show_default=True,
                  help="Threads per process for storage-bound calls.")
    @click.option("--log-level", default="INFO", show_default=True,
                  type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
    def serve(**options):
        """Run the gRPC server (Processing and Admin, health, reflection) in the foreground.

        With no options: an embedded SQLite database in the data dir, migrated, with the demo program and
        demo members (cards 7000001-7000005), listening on 127.0.0.1:50051. SIGTERM / Ctrl-C stop it
        gracefully, finishing the calls in flight.
        """
        serve_command(**options)

    # -- db
    @group.group(name="db")
    def db_group():
        """The database schema."""

    @db_group.command(name="upgrade")
    @_database_url
    @_data_dir
    def db_upgrade(database_url, data_dir):
        """Apply every migration (alembic upgrade head)."""
        from loyalty.server import db
        url = _resolve_url(database_url, data_dir)
        try:
            db.upgrade(url)
        except Exception as exc:  # noqa: BLE001
            _fail(exc)
        click.echo(f"{_display_url(url)}: schema at head")

    # -- jobs
    @group.group(name="jobs")
    def jobs_group():
        """Periodic work: activate due points, expire old ones, recalculate tiers."""

    @jobs_group.command(name="run")
    @click.option("--once", is_flag=True, help="Run one pass and exit.")
    @click.option("--interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True, help="Seconds between passes.")
    @_database_url
    @_data_dir
    @click.option("--redis-url", envvar="LOYALTY_REDIS_URL", metavar="URL",
                  help="Redis to tell the servers at once that tiers, points or segments changed (optional: "
                       "they also poll).")
    @_json
    def jobs_run(once, interval, database_url, data_dir, redis_url, as_json):
        """Run the periodic jobs, once or every --interval seconds until interrupted."""
        from loyalty.server import jobs
        try:
            service = _open_service(database_url, data_dir, redis_url)
        except Exception as exc:  # noqa: BLE001
            _fail(exc)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while True:
                try:
                    counts = jobs.run_once(service.runtime)
                except Exception as exc:  # noqa: BLE001
                    if once:
                        _fail(exc)
                    click.echo(f"error: {getattr(exc, 'message', exc)}", err=True)
                    counts = None
                if counts is not None:
                    if as_json:
                        emit_json(counts)
                    else:
                        click.echo(time.strftime("%Y-%m-%d %H:%M:%S ") +
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
    @_database_url
    @_data_dir
    @_json
    def ledger_check(database_url, data_dir, as_json):
        """Sum the ledger and compare with the balances; exit 1 on any discrepancy."""
        from loyalty.server import ledger
        problems = _with_runtime(database_url, data_dir, lambda runtime: ledger.check(runtime.db))
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
    @_database_url
    @_data_dir
    @_json
    def ledger_liability(database_url, data_dir, as_json):
        """Outstanding points: active, pending, expiring soon."""
        from loyalty.server import ledger
        report = _with_runtime(database_url, data_dir, ledger.liability)
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
    @_database_url
    @_json
    def program_publish(file, comment, server, database_url, as_json):
        """Validate FILE and publish it as the next version; every server process switches to it."""
        try:
            text = pathlib.Path(file).read_text(encoding="utf-8")
        except FileNotFoundError:
            error_exit(f"{file}: file not found")
        except (OSError, UnicodeDecodeError) as exc:
            error_exit(f"{file}: cannot read ({exc})")
        with _Backend(server, database_url) as backend:
            version = backend.call("publish_program", {"yaml": text, "comment": comment})
        _print(version, as_json, lambda v: click.echo(
            f"published {v.program} version {v.version} (sha256 {v.checksum[:12]})"))

    @program_group.command(name="show")
    @click.option("--version", "version", type=int, default=0, help="A version number [default: the current one].")
    @_server
    @_database_url
    @_json
    def program_show(version, server, database_url, as_json):
        """Print a version's YAML."""
        with _Backend(server, database_url) as backend:
            v = backend.call("get_program", {"version": version})
        _print(v, as_json, lambda v: click.echo(v.yaml, nl=not v.yaml.endswith("\n")))

    @program_group.command(name="versions")
    @_server
    @_database_url
    @_json
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
    @_json
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
    @_json
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
    @_json
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
    @_json
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
    @_json
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
        rows.append(("next expiry", f"{m.next_expiry_points} on {m.next_expiry_at}"))
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
    rows += [("source", m.source), ("registered", m.registered_at)]
    emit_table([{"field": k, "value": v} for k, v in rows], ["field", "value"], title=f"member {m.member_id}")
