"""``loyalty worker``, ``loyalty batch ...`` and ``loyalty scenarios ...``: thin commands over
``loyalty.server.scenarios``, working straight on ``--database-url`` (default: the database in the data dir,
which must exist and be at head; ``worker`` migrates it first unless told not to). Each parses, calls the library and prints through ``loyalty.cli.output``; errors are one line
(``error: <path>: <reason>``), exit 2 for bad input and 1 otherwise.
"""
from __future__ import annotations

import pathlib
import signal

import click

from loyalty.cli.common import ServiceCommand, call, database_url_option, json_option, quiet_option, resolve_url
from loyalty.cli.output import emit_json, emit_table, error_exit, progress

__all__ = ["register"]



def _service(database_url):
    from loyalty.server.scenarios.service import ScenarioService
    return ScenarioService.open(resolve_url(database_url))


def _read(path: str) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        error_exit(f"{path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        error_exit(f"{path}: not UTF-8 text")


def _batch_line(b: dict) -> str:
    return (f"batch {b['id']}: {b['kind']} {b['points']} points, {b['state']}, {b['processed']}/{b['total']} "
            f"members, {b['written']} written, {b['points_moved']} points moved")


def register(group: click.Group) -> None:
    # ---- worker --------------------------------------------------------------------------------------------

    @group.command(name="worker", cls=ServiceCommand)
    @database_url_option
    @click.option("--email", default=None, envvar="LOYALTY_CHANNEL_EMAIL",
                  help="Email adapter: log, log:/path, smtp://host:port?from=addr, http(s)://gateway [default: log]")
    @click.option("--sms", default=None, envvar="LOYALTY_CHANNEL_SMS", help="SMS adapter (as --email).")
    @click.option("--push", default=None, envvar="LOYALTY_CHANNEL_PUSH", help="Push adapter (as --email).")
    @click.option("--poll", default=0.5, show_default=True, help="Seconds to sleep when idle.")
    @click.option("--lease", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
                  help="Seconds a claimed delivery is held; a live worker renews it while sending, a dead one's "
                       "is taken over when it runs out.")
    @click.option("--batch-chunk", default=10_000, show_default=True, type=click.IntRange(min=1), help="Members per batch transaction.")
    @click.option("--once", is_flag=True, help="Work until idle, then exit.")
    @click.option("--no-upgrade", is_flag=True, help="Do not bring the schema to head first (refuse one "
                                                      "that is not).")
    @json_option
    def worker_cmd(database_url, email, sms, push, poll, lease, batch_chunk, once, no_upgrade, as_json):
        """Run scenarios, deliver messages and webhooks, process batches. Start as many as you like.

        With --once: work until idle, then print what was done (--json: as one object) and exit."""
        import logging
        from loyalty.server.scenarios.outbox import Channels
        from loyalty.server.scenarios.worker import Worker
        url = resolve_url(database_url, migrate=not no_upgrade)
        logging.basicConfig(level=logging.WARNING if once else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        channels = call(Channels, email=email, sms=sms, push=push)
        worker = Worker(url, channels=channels, lease_s=lease, batch_chunk=batch_chunk, poll_s=poll)
        if once:
            ticks = call(worker.run_until_idle, 100_000)
            done = {"ticks": ticks, **worker.totals}
            emit_json(done) if as_json else click.echo(
                f"worker: idle after {ticks} tick(s); runs created {done['runs_created']}, steps "
                f"{done['steps']}, deliveries {done['deliveries']}, batch chunks {done['batch_chunks']}")
        else:
            signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
            signal.signal(signal.SIGINT, lambda *_: worker.stop_event.set())
            worker.run()
        worker.close()

    # ---- batch ---------------------------------------------------------------------------------------------

    @group.group(name="batch")
    def batch_group():
        """Award or deduct points for a whole audience: idempotent by --id, resumable, with progress."""

    def _batch_options(fn):
        for opt in reversed([
            click.option("--id", "batch_id", required=True, help="The batch id: its idempotency key."),
            click.option("--points", required=True, type=int),
            click.option("--reason", required=True, help="Why (written on every ledger entry; required, as for "
                                                          "every manual points operation)."),
            click.option("--segment", default=None, help="A segment or audience id."),
            click.option("--members", default=None, help="Comma-separated member ids (id:N) or card numbers."),
            click.option("--members-file", default=None, type=click.Path(),
                         help="A file with one member id (id:N) or card number per line."),
            click.option("--all", "all_members", is_flag=True, help="Every member."),
            click.option("--chunk", default=10_000, show_default=True, type=click.IntRange(min=1),
                         help="Members per transaction."),
            click.option("--no-wait", is_flag=True, help="Only create the batch; workers process it."),
            database_url_option, json_option, quiet_option,
        ]):
            fn = opt(fn)
        return fn

    def _batch(kind, batch_id, points, reason, segment, members, members_file, all_members, chunk, no_wait,
               database_url, as_json, quiet, expiry_days=None):
        refs = None
        if members:
            refs = [m.strip() for m in members.split(",") if m.strip()]
        elif members_file:
            refs = [line.strip() for line in _read(members_file).splitlines() if line.strip()]
        svc = _service(database_url)
        b = call(svc.start_batch, batch_id, kind, points, reason=reason, expiry_days=expiry_days, segment=segment,
                  members=refs, all_members=all_members)
        if not no_wait and b["state"] == "running":
            with progress(b["total"], f"batch {batch_id}", quiet=quiet or as_json) as bar:
                b = call(svc.run_batch, batch_id, chunk=chunk, on_progress=lambda p: bar.update(p["processed"]))
        svc.close()
        if as_json:
            emit_json(b)
        else:
            click.echo(_batch_line(b))

    @batch_group.command(name="award")
    @_batch_options
    @click.option("--expiry-days", type=int, default=None, help="Default: the program's expiry_days.")
    def award_cmd(batch_id, points, reason, segment, members, members_file, all_members, chunk, no_wait,
                  database_url, as_json, quiet, expiry_days):
        """Award POINTS to every member of the audience (active at once, expiring after --expiry-days)."""
        _batch("award", batch_id, points, reason, segment, members, members_file, all_members, chunk, no_wait,
               database_url, as_json, quiet, expiry_days)

    @batch_group.command(name="deduct")
    @_batch_options
    def deduct_cmd(batch_id, points, reason, segment, members, members_file, all_members, chunk, no_wait,
                   database_url, as_json, quiet):
        """Deduct up to POINTS from every member of the audience (never below zero)."""
        _batch("deduct", batch_id, points, reason, segment, members, members_file, all_members, chunk, no_wait,
               database_url, as_json, quiet)

    @batch_group.command(name="status")
    @click.argument("batch_id")
    @database_url_option
    @json_option
    def status_cmd(batch_id, database_url, as_json):
        """The progress of a batch."""
        b = call(_service(database_url).batch_progress, batch_id)
        emit_json(b) if as_json else click.echo(_batch_line(b))

    # ---- scenarios ------------------------------------------------------------------------------------------

    @group.group(name="scenarios")
    def scenarios_group():
        """Scenario definitions, statistics, funnels, dead letters, promo code pools."""

    @scenarios_group.command(name="define")
    @click.argument("file", type=click.Path())
    @database_url_option
    @json_option
    def define_cmd(file, database_url, as_json):
        """Create or update the scenario in FILE (YAML of one scenario)."""
        d = call(_service(database_url).define, _read(file), origin="cli", path="scenario")
        emit_json(d) if as_json else click.echo(f"{d['id']}: version {d['version']}, {d['triggers']} triggers, "
                                                f"{d['steps']} steps, {'enabled' if d['enabled'] else 'disabled'}")

    @scenarios_group.command(name="apply")
    @click.argument("program", type=click.Path())
    @database_url_option
    @json_option
    def apply_cmd(program, database_url, as_json):
        """Apply the top-level `scenarios:` of a PROGRAM file."""
        from loyalty.core import LoyaltyError, load_program
        try:
            prog = load_program(program)
        except LoyaltyError as exc:
            error_exit(f"{exc.path}: {exc.reason}" if exc.path else exc.reason)
        out = call(_service(database_url).apply_program, prog.source)
        if as_json:
            emit_json(out)
        else:
            for d in out["scenarios"]:
                click.echo(f"{d['id']}: version {d['version']}")
            click.echo(f"{out['disabled']} scenario(s) no longer in the program disabled")

    @scenarios_group.command(name="list")
    @database_url_option
    @json_option
    def list_cmd(database_url, as_json):
        """Every scenario: version, enabled, where it was defined, triggers and steps."""
        rows = call(_service(database_url).list)
        if as_json:
            emit_json([{k: v for k, v in r.items() if k != "definition"} for r in rows])
        else:
            emit_table(rows, ["id", "title", "version", "enabled", "origin", "triggers", "steps"])

    for name, flag in (("enable", True), ("disable", False)):
        @scenarios_group.command(name=name, help=f"{name.capitalize()} a scenario.")
        @click.argument("scenario_id")
        @database_url_option
        @json_option
        def toggle(scenario_id, database_url, as_json, _flag=flag):
            d = call(_service(database_url).set_enabled, scenario_id, _flag)
            if as_json:
                emit_json({k: v for k, v in d.items() if k != "definition"})
            else:
                click.echo(f"{d['id']}: {'enabled' if d['enabled'] else 'disabled'}")

    @scenarios_group.command(name="stats")
    @click.argument("scenario_id")
    @database_url_option
    @json_option
    def stats_cmd(scenario_id, database_url, as_json):
        """Per step: entered, yes, no, completed, skipped (a message not sent), failed, waiting."""
        s = call(_service(database_url).stats, scenario_id)
        if as_json:
            emit_json(s)
            return
        emit_table(s["steps"], ["step", "type", "entered", "yes", "no", "completed", "skipped", "failed",
                                "waiting"],
                   title=f"{scenario_id} v{s['version']}: runs {s['runs']}")

    @scenarios_group.command(name="funnel")
    @click.argument("scenario_id")
    @click.option("--goal", default=None, help="An event kind, e.g. purchase_confirmed.")
    @click.option("--within", default=None, help="e.g. 30d")
    @database_url_option
    @json_option
    def funnel_cmd(scenario_id, goal, within, database_url, as_json):
        """Runs triggered, runs that reached each step, and (--goal) runs whose member then did the goal."""
        f = call(_service(database_url).funnel, scenario_id, goal=goal, within=within)
        emit_json(f) if as_json else emit_table(f["stages"], ["stage", "count", "share"], title=scenario_id)

    @scenarios_group.command(name="dead-letters")
    @click.option("--limit", default=100, show_default=True)
    @database_url_option
    @json_option
    def dead_cmd(limit, database_url, as_json):
        """Messages and runs that failed for good, newest first (`loyalty scenarios retry` requeues one)."""
        rows = call(_service(database_url).dead_letters, limit)
        emit_json(rows) if as_json else emit_table(
            rows, ["kind", "id", "scenario_id", "step", "member_id", "channel", "attempts", "error"])

    @scenarios_group.command(name="retry")
    @click.argument("kind", type=click.Choice(["message", "run"]))
    @click.argument("item_id", type=int)
    @database_url_option
    @json_option
    def retry_cmd(kind, item_id, database_url, as_json):
        """Put a dead letter back to work."""
        call(_service(database_url).retry_dead_letter, kind, item_id)
        if as_json:
            emit_json({"kind": kind, "id": item_id, "due": True})
        else:
            click.echo(f"{kind} {item_id} is due again")

    @scenarios_group.command(name="codes")
    @click.argument("pool")
    @click.argument("file", type=click.Path())
    @database_url_option
    @json_option
    def codes_cmd(pool, file, database_url, as_json):
        """Add the promo codes in FILE (one per line) to POOL."""
        codes = [line.strip() for line in _read(file).splitlines() if line.strip()]
        out = call(_service(database_url).add_promo_codes, pool, codes)
        emit_json(out) if as_json else click.echo(f"{pool}: {out['added']} added, {out['available']} available")
