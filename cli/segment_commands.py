"""``loyalty segments ...`` and ``loyalty demo seed``: thin commands over ``loyalty.server.segments``, working
straight on ``--database-url`` (default: the database in the data dir, which must exist and be at head;
``demo seed`` creates it).

Each command parses, calls one ``SegmentService`` method and prints through ``loyalty.cli.output``: a table or
a few lines for people, ``--json`` for scripts; long work (recalculation, export, seeding) shows a progress
bar on stderr. Errors are one line (``error: <path>: <reason>``) and exit 2 for bad input, 1 otherwise.
"""
from __future__ import annotations

import os
import pathlib
import sys

import click

from loyalty.cli.common import (
    check_server,
    call, database_url_option, demo_summary, json_option, quiet_option, resolve_url, seed_demo,
)
from loyalty.cli.output import emit_json, emit_table, error_exit, progress

__all__ = ["register"]


def _open(database_url):
    from loyalty.server.segments.service import SegmentService
    return SegmentService.open(resolve_url(database_url))


def _load_conditions(text: str | None):
    if text is None:
        return None
    import yaml
    if text.startswith("@"):
        try:
            text = pathlib.Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            error_exit(f"{text[1:]}: {exc.strerror or exc}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        error_exit(f"conditions: not valid YAML / JSON ({str(exc).splitlines()[0]})")


def _export_through(server: str, sid: str, columns, out, report) -> int:
    """Stream a segment's CSV from a server into ``out`` chunk by chunk; the number of members."""
    from loyalty.cli.security_commands import connect

    n = 0
    with connect(server, timeout=3600.0, retries=2) as client:
        for chunk in client.export_members_stream(id=sid, columns=columns):
            out.write(chunk.csv.decode("utf-8"))
            n += chunk.count
            report(n)
    return n


def _show_run(run: dict, as_json: bool):
    if as_json:
        emit_json(run)
    else:
        click.echo(f"{run['segment_id']}: {run['member_count']} members (+{run['added']} -{run['removed']}) "
                   f"in {run['duration_ms']} ms")


def register(group: click.Group) -> None:
    @group.group(name="segments")
    def segments_group():
        """Segments and audiences: define, calculate, preview, export, change by hand, tag."""

    @segments_group.command(name="list")
    @database_url_option
    @json_option
    def list_cmd(database_url, as_json):
        """Every segment and audience with its type and member count."""
        rows = call(lambda: _open(database_url).list())
        if as_json:
            emit_json(rows)
            return
        emit_table([{"id": r["id"], "kind": r["kind"], "type": r.get("type", ""), "members": r.get("member_count", ""),
                     "schedule": r.get("schedule") or "", "calculated_at": r.get("calculated_at") or ""}
                    for r in rows], ["id", "kind", "type", "members", "schedule", "calculated_at"])

    def _define(mode, database_url, sid, stype, conditions, schedule, title, as_json):
        from loyalty.server.segments import conditions as cond
        spec = {"id": sid}
        if stype:
            spec["type"] = stype
        if conditions is not None:
            spec["conditions"] = _load_conditions(conditions)
            call(cond.validate, spec["conditions"], "conditions")     # bad input first, before any database
        if schedule:
            spec["schedule"] = schedule
        if title is not None:
            spec["title"] = title
        svc = _open(database_url)
        seg = call(svc.define_segment, spec, path="", mode=mode, origin="cli")
        if as_json:
            emit_json(seg)
        else:
            click.echo(f"{seg['id']}: {seg['type']} segment {'created' if mode == 'create' else 'updated'}")

    for mode in ("create", "update"):
        def make(mode=mode):
            @segments_group.command(name=mode, help=f"{mode.capitalize()} a segment.")
            @click.argument("sid", metavar="ID")
            @click.option("--type", "stype", type=click.Choice(["static", "updatable", "dynamic"]),
                          required=mode == "create")
            @click.option("--conditions", metavar="YAML|JSON|@FILE", help="The condition tree.")
            @click.option("--schedule", metavar="CRON", help='Updatable only, e.g. "0 3 * * *".')
            @click.option("--title")
            @database_url_option
            @json_option
            def cmd(sid, stype, conditions, schedule, title, database_url, as_json):
                _define(mode, database_url, sid, stype, conditions, schedule, title, as_json)
        make()

    @segments_group.command(name="apply")
    @click.argument("program_file", type=click.Path(dir_okay=False))
    @click.option("--no-recalc", is_flag=True, help="Define only; do not calculate.")
    @database_url_option
    @json_option
    def apply_cmd(program_file, no_recalc, database_url, as_json):
        """Define the segments: and audiences: of a program file (and calculate them)."""
        from loyalty.core import ProgramError, load_program
        try:
            program = load_program(program_file)
        except ProgramError as exc:
            error_exit(f"{exc.path}: {exc.reason}" if exc.path else exc.reason)
        except OSError as exc:
            error_exit(f"{program_file}: {exc.strerror or exc}")
        out = call(lambda: _open(database_url).apply_program(program.source, recalculate=not no_recalc))
        if as_json:
            emit_json(out)
        else:
            click.echo(f"{len(out['segments'])} segments, {len(out['audiences'])} audiences defined; "
                       f"{len(out['runs'])} calculated")

    @segments_group.command(name="audience")
    @click.argument("aid", metavar="ID")
    @click.option("--include", multiple=True, required=True, metavar="SEGMENT")
    @click.option("--exclude", multiple=True, metavar="SEGMENT")
    @click.option("--title", default="")
    @database_url_option
    @json_option
    def audience_cmd(aid, include, exclude, title, database_url, as_json):
        """Define an audience: in ALL --include segments and NONE of the --exclude ones."""
        out = call(lambda: _open(database_url).define_audience(
            {"id": aid, "title": title, "include": list(include), "exclude": list(exclude)}, path="", origin="cli"))
        emit_json(out) if as_json else click.echo(f"{aid}: audience defined")

    @segments_group.command(name="recalc")
    @click.argument("sid", metavar="ID", required=False)
    @click.option("--due", is_flag=True, help="Every updatable segment whose schedule is due.")
    @database_url_option
    @json_option
    @quiet_option
    def recalc_cmd(sid, due, database_url, as_json, quiet):
        """Recalculate an updatable segment (or snapshot a dynamic one)."""
        if not sid and not due:
            error_exit("ID: required (or --due)")
        svc = _open(database_url)
        with progress(3, f"calculating {sid or 'due segments'}", quiet=quiet or as_json) as bar:
            report = lambda phase, done, total: bar.update(done)  # noqa: E731
            runs = call(svc.run_due, progress=report) if due else [call(svc.recalculate, sid, source="cli",
                                                                          progress=report)]
        if as_json:
            emit_json(runs if due else runs[0])
        else:
            for run in runs:
                _show_run(run, False)

    @segments_group.command(name="count")
    @click.argument("sid", metavar="ID")
    @database_url_option
    @json_option
    def count_cmd(sid, database_url, as_json):
        """The live count of a segment, audience or external tag."""
        n = call(lambda: _open(database_url).count(sid))
        emit_json({"id": sid, "count": n}) if as_json else click.echo(n)

    _columns = click.option("--columns", metavar="A,B,...", help="Columns: member_id, card, phone, first_name, "
                            "last_name, gender, birth_date, email, city, source, registered_at, tier, "
                            "active_points, pending_points, purchases_sum.")

    @segments_group.command(name="preview")
    @click.argument("sid", metavar="ID")
    @_columns
    @click.option("--limit", default=20, show_default=True)
    @database_url_option
    @json_option
    def preview_cmd(sid, columns, limit, database_url, as_json):
        """The first members with the chosen columns."""
        cols = columns.split(",") if columns else None
        rows = call(lambda: _open(database_url).preview(sid, cols, limit))
        if as_json:
            emit_json(rows)
        else:
            from loyalty.server.segments.service import DEFAULT_COLUMNS
            emit_table(rows, cols or list(DEFAULT_COLUMNS), title=sid)

    @segments_group.command(name="export")
    @click.argument("sid", metavar="ID")
    @_columns
    @click.option("--output", "-o", type=click.Path(dir_okay=False), help="File [default: stdout].")
    @click.option("--server", metavar="HOST:PORT", callback=check_server,
                  help="Export through a running server (ExportMembersStream), written as it arrives "
                       "[default: read the database directly].")
    @database_url_option
    @quiet_option
    def export_cmd(sid, columns, output, server, database_url, quiet):
        """Every member as CSV."""
        cols = columns.split(",") if columns else None
        stream = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
        try:
            with progress(None, f"exporting {sid}", quiet=quiet or not output) as bar:
                if server:
                    n = call(_export_through, server, sid, cols, stream, bar.update)
                else:
                    n = call(_open(database_url).export_csv, sid, stream, cols,
                             progress=lambda phase, done, total: bar.update(done))
        finally:
            if output:
                stream.close()
        if output:
            click.echo(f"{n} members written to {output}", err=True)

    @segments_group.command(name="history")
    @click.argument("sid", metavar="ID")
    @click.option("--limit", default=50, show_default=True)
    @database_url_option
    @json_option
    def history_cmd(sid, limit, database_url, as_json):
        """Recalculation runs: when, source, count, added, removed, duration."""
        runs = call(lambda: _open(database_url).history(sid, limit))
        if as_json:
            emit_json(runs)
        else:
            emit_table(runs, ["started_at", "source", "status", "member_count", "added", "removed", "duration_ms"],
                       title=sid)

    @segments_group.command(name="changes")
    @click.argument("sid", metavar="ID")
    @click.option("--limit", default=100, show_default=True)
    @database_url_option
    @json_option
    def changes_cmd(sid, limit, database_url, as_json):
        """The manual-change log of a static segment."""
        rows = call(lambda: _open(database_url).changes(sid, limit))
        emit_json(rows) if as_json else emit_table(rows, ["at", "member_id", "action", "source", "actor"], title=sid)

    for action in ("add", "remove"):
        def make(action=action):
            @segments_group.command(name=action, help=f"{action.capitalize()} members of a static segment "
                                                             f"(logged).")
            @click.argument("sid", metavar="ID")
            @click.argument("refs", nargs=-1, required=True, metavar="CARD|+PHONE|id:N...")
            @click.option("--actor", default=lambda: os.environ.get("USER", ""))
            @database_url_option
            @json_option
            def cmd(sid, refs, actor, database_url, as_json):
                svc = _open(database_url)
                fn = svc.add_members if action == "add" else svc.remove_members
                out = call(fn, sid, list(refs), source="cli", actor=actor)
                if as_json:
                    emit_json(out)
                else:
                    click.echo(f"{sid}: {out['changed']} {'added' if action == 'add' else 'removed'}, "
                               f"{out['unchanged']} unchanged, {out['unknown']} unknown; now {out['member_count']}")
        make()

    @segments_group.command(name="import")
    @click.argument("sid", metavar="ID")
    @click.argument("csv_file", type=click.Path(dir_okay=False))
    @click.option("--remove", is_flag=True, help="Remove the listed members instead of adding them.")
    @click.option("--actor", default=lambda: os.environ.get("USER", ""))
    @database_url_option
    @json_option
    def import_cmd(sid, csv_file, remove, actor, database_url, as_json):
        """Add (or --remove) the members of a CSV with a member_id, card or phone column."""
        try:
            text = pathlib.Path(csv_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            error_exit(f"{csv_file}: {getattr(exc, 'strerror', None) or exc}")
        out = call(lambda: _open(database_url).import_csv(sid, text, source="csv", actor=actor, remove=remove))
        if as_json:
            emit_json(out)
        else:
            click.echo(f"{sid}: {out['changed']} changed, {out['unchanged']} unchanged, {out['unknown']} unknown; "
                       f"now {out['member_count']}")

    @segments_group.command(name="tag")
    @click.argument("sid", metavar="ID")
    @click.argument("tag")
    @click.option("--external/--no-external", default=True, show_default=True,
                  help="Pass the tag to the loyalty side as an audience promotions can name.")
    @click.option("--replace", is_flag=True, help="Take the tag off members who are not in the segment.")
    @database_url_option
    @json_option
    def tag_cmd(sid, tag, external, replace, database_url, as_json):
        """Set a tag on the members of a segment or audience."""
        out = call(lambda: _open(database_url).set_tag(sid, tag, external=external, replace=replace))
        if as_json:
            emit_json(out)
        else:
            click.echo(f"{tag}: {out['tagged']} tagged, {out['untagged']} untagged, {out['member_count']} carry it"
                       + (" (external audience)" if external else ""))

    @group.group(name="demo")
    def demo_group():
        """Demo data."""

    @demo_group.command(name="seed")
    @click.option("--members", "members_n", type=click.IntRange(min=1), default=None,
                  help="Generate a population of this many members instead of the five demo members.")
    @click.option("--purchases", "purchases_n", type=click.IntRange(min=0), default=100_000, show_default=True,
                  help="With --members: purchases to generate.")
    @click.option("--seed", default=1, show_default=True, help="With --members: same seed, same population.")
    @database_url_option
    @json_option
    @quiet_option
    def seed_cmd(members_n, purchases_n, seed, database_url, as_json, quiet):
        """Create the database if needed and seed it.

        Without --members: publish the demo program (unless it is live) and create the five demo members
        (cards 7000001-7000005), as `loyalty serve --demo` does; what `loyalty-pos` uses. With --members:
        generate a believable population (members, cards, subscriptions, purchases, points, message events)
        with set-based inserts, for segments and benchmarks.
        """
        url = resolve_url(database_url, migrate=True)
        if members_n is None:
            seeded = seed_demo(url)
            emit_json(seeded) if as_json else click.echo(demo_summary(seeded))
            return
        from loyalty.server.segments.demo_seed import seed_population
        with progress(7, "seeding", quiet=quiet or as_json) as bar:
            out = call(seed_population, url, members_n=members_n, purchases_n=purchases_n, seed=seed,
                       progress=lambda step, done, total: bar.update(done))
        if as_json:
            emit_json(out)
        else:
            click.echo(f"{out['members']} members (ids {out['first_member_id']}-{out['last_member_id']}) and "
                       f"{out['purchases']} purchases in {out['total_seconds']} s")
