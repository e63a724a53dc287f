"""The scenario service: what the CLI, the Admin gRPC API and Python call. Definitions (program file or API),
statistics and funnels, dead letters, promo code pools, batch points actions and the message events providers
report back (``message_events.py``). Execution itself is the
worker's (``worker.py``); this module only reads and writes definitions and reports.
"""
from __future__ import annotations

import logging

import yaml
from sqlalchemy import func, literal, select, update

from loyalty.server.db import Database
from loyalty.server.dialects import dialect_of
from loyalty.server.errors import InvalidArgument, NotFound
from loyalty.server.models import events, program_versions
from loyalty.server.security import audit

from . import batch as batches_mod
from . import message_events as message_events_mod
from .common import insert_ignore, utcnow
from .definitions import parse_scenario, parse_scenarios
from .models import (
    promo_codes, scenario_cursors, scenario_events, scenario_outbox, scenario_runs, scenario_step_log, scenarios,
)
from .vocabulary import parse_duration

__all__ = ["ScenarioService"]

log = logging.getLogger(__name__)


def _load_yaml(text: str, path: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InvalidArgument(path, f"not valid YAML{where}") from None


def _older(column, before: int | None) -> tuple:
    """The condition of a newest-first page after the item ``before`` (none on the first page)."""
    return () if before is None else (column < before,)


class ScenarioService:
    """Sync and thread-safe; one per process (or per CLI command)."""

    def __init__(self, database: Database, *, clock=None):
        self.db = database
        self.clock = clock or utcnow

    @classmethod
    def open(cls, database_url: str, *, clock=None) -> "ScenarioService":
        return cls(Database(database_url), clock=clock)

    def close(self) -> None:
        self.db.dispose()

    # ---- definitions --------------------------------------------------------------------------------------

    def define(self, spec, *, mode: str = "upsert", origin: str = "api", path: str = "scenario") -> dict:
        """Create (``mode="create"``), update (``"update"``) or either (``"upsert"``) one scenario from its
        mapping or YAML text. A changed definition gets the next version; runs in flight go on with it. A create
        is idempotent by the scenario id: the same definition again (a retry, even a concurrent one) answers the
        scenario as it is; another definition under that id is ``AlreadyExists``."""
        if isinstance(spec, str):
            spec = _load_yaml(spec, path)
        definition = parse_scenario(spec, path)
        now = self.clock()

        def tx(conn):
            return self._upsert(conn, definition, mode, origin, now)
        return self.db.run_write(tx)

    def _upsert(self, conn, definition: dict, mode: str, origin: str, now) -> dict:
        sid = definition["id"]
        if mode != "update":
            # ON CONFLICT DO NOTHING: a concurrent create of the same id waits for this one and then finds the
            # row below, instead of failing on the primary key
            values = {"id": sid, "title": definition["title"], "version": 1, "definition": definition,
                      "enabled": definition["enabled"], "origin": origin, "created_at": now, "updated_at": now}
            if conn.execute(insert_ignore(conn, scenarios).values(**values).returning(scenarios.c.id)).scalar():
                audit.record(conn, "CreateScenario", f"scenario:{sid}", now)
                return self._view(values)
        row = conn.execute(select(scenarios).where(scenarios.c.id == sid)).first()
        if row is None:
            raise NotFound(f"scenario {sid} was not found")
        unchanged = row.definition == definition and row.enabled == definition["enabled"]
        if mode == "create" and not unchanged:
            from loyalty.server.errors import AlreadyExists
            raise AlreadyExists(f"scenario {sid} already exists")
        if unchanged:                   # a repeated create or update: the scenario as it is, no new version
            return self._view(dict(row._mapping))
        values = {"title": definition["title"], "definition": definition, "enabled": definition["enabled"],
                  "version": row.version + 1, "origin": origin, "updated_at": now}
        conn.execute(update(scenarios).where(scenarios.c.id == sid).values(**values))
        audit.record(conn, "UpdateScenario", f"scenario:{sid} version:{values['version']}", now)
        return self._view({**dict(row._mapping), **values})

    def apply_program(self, source: dict | None, *, version: int | None = None) -> dict:
        """Apply the program file's ``scenarios:`` (``Program.source``): each is created or updated with origin
        ``program``; scenarios that came from an earlier program and are gone are disabled."""
        listed = parse_scenarios((source or {}).get("scenarios"))
        now = self.clock()

        def tx(conn):
            out = [self._upsert(conn, d, "upsert", "program", now) for d in listed]
            ids = [d["id"] for d in listed]
            gone = conn.execute(update(scenarios).where(
                scenarios.c.origin == "program", scenarios.c.enabled.is_(True),
                scenarios.c.id.not_in(ids) if ids else literal(True)).values(enabled=False, updated_at=now)).rowcount
            if version is not None:
                conn.execute(insert_ignore(conn, scenario_cursors).values(name="program", position=0, value="",
                                                                          updated_at=now))
                conn.execute(update(scenario_cursors).where(scenario_cursors.c.name == "program")
                             .values(position=version, updated_at=now))
            return {"scenarios": out, "disabled": gone}
        return self.db.run_write(tx)

    def sync_program(self) -> bool:
        """Apply the scenarios of the current published program if it is newer than the last one applied."""
        with self.db.read() as conn:
            current = conn.execute(select(func.max(program_versions.c.version))).scalar()
            applied = conn.execute(select(scenario_cursors.c.position)
                                   .where(scenario_cursors.c.name == "program")).scalar()
            if current is None or current == applied:
                return False
            text = conn.execute(select(program_versions.c.yaml).where(program_versions.c.version == current)).scalar()
        source = _load_yaml(text, "program") or {}
        try:
            self.apply_program(source if isinstance(source, dict) else {}, version=current)
        except InvalidArgument as exc:
            log.error("program version %s: its scenarios are invalid (%s); keeping the ones applied before",
                      current, exc.message)
            self.db.run_write(lambda conn: self._mark_program(conn, current))
        return True

    def _mark_program(self, conn, version: int) -> None:
        now = self.clock()
        conn.execute(insert_ignore(conn, scenario_cursors).values(name="program", position=0, value="", updated_at=now))
        conn.execute(update(scenario_cursors).where(scenario_cursors.c.name == "program")
                     .values(position=version, updated_at=now))

    def set_enabled(self, sid: str, enabled: bool) -> dict:
        now = self.clock()

        def tx(conn):
            row = conn.execute(select(scenarios).where(scenarios.c.id == sid)).first()
            if row is None:
                raise NotFound(f"scenario {sid} was not found")
            definition = {**row.definition, "enabled": enabled}
            values = {"enabled": enabled, "definition": definition, "updated_at": now}
            conn.execute(update(scenarios).where(scenarios.c.id == sid).values(**values))
            audit.record(conn, "EnableScenario" if enabled else "DisableScenario", f"scenario:{sid}", now)
            return self._view({**dict(row._mapping), **values})
        return self.db.run_write(tx)

    def get(self, sid: str) -> dict:
        with self.db.read() as conn:
            row = conn.execute(select(scenarios).where(scenarios.c.id == sid)).first()
        if row is None:
            raise NotFound(f"scenario {sid} was not found")
        return self._view(dict(row._mapping))

    def list(self) -> list[dict]:
        with self.db.read() as conn:
            return [self._view(dict(r._mapping)) for r in conn.execute(select(scenarios).order_by(scenarios.c.id))]

    @staticmethod
    def _view(row: dict) -> dict:
        d = row["definition"]
        return {"id": row["id"], "title": row["title"], "version": row["version"], "enabled": row["enabled"],
                "origin": row["origin"], "triggers": len(d["triggers"]), "steps": len(d["steps"]),
                "definition": d, "created_at": row.get("created_at"), "updated_at": row.get("updated_at")}

    # ---- reports ------------------------------------------------------------------------------------------

    def stats(self, sid: str) -> dict:
        """Per step: entered, yes, no, completed, failed (from the step log), skipped and waiting (runs there
        now); per trigger: how many runs it started; runs by state.

        A ``send`` step whose message was not sent (no address, not subscribed, card not active: its outbox
        row is ``skipped``) moved the run on, so the step log says completed; it is counted as skipped
        instead, and completed counts only the messages actually queued."""
        sc = self.get(sid)
        log_ = scenario_step_log.c
        with self.db.read() as conn:
            counts = conn.execute(select(log_.step, log_.outcome, func.count()).where(log_.scenario_id == sid)
                                  .group_by(log_.step, log_.outcome)).all()
            here = dict(conn.execute(select(scenario_runs.c.step, func.count()).where(
                scenario_runs.c.scenario_id == sid, scenario_runs.c.state == "active")
                .group_by(scenario_runs.c.step)).all())
            skipped = dict(conn.execute(select(scenario_outbox.c.step, func.count()).where(
                scenario_outbox.c.scenario_id == sid, scenario_outbox.c.state == "skipped")
                .group_by(scenario_outbox.c.step)).all())
            states = dict(conn.execute(select(scenario_runs.c.state, func.count())
                                       .where(scenario_runs.c.scenario_id == sid)
                                       .group_by(scenario_runs.c.state)).all())
        by = {}
        for step, outcome, n in counts:
            by.setdefault(step, {})[outcome] = n
        steps = []
        for s in sc["definition"]["steps"]:
            c = by.get(s["id"], {})
            not_sent = skipped.get(s["id"], 0)
            steps.append({"step": s["id"], "type": s["type"], "entered": c.get("entered", 0), "yes": c.get("yes", 0),
                          "no": c.get("no", 0), "completed": c.get("completed", 0) - not_sent, "skipped": not_sent,
                          "failed": c.get("failed", 0), "waiting": here.get(s["id"], 0)})
        triggers = [{"trigger": f"triggers[{i}]", "type": t["type"],
                     "triggered": by.get(f"triggers[{i}]", {}).get("triggered", 0)}
                    for i, t in enumerate(sc["definition"]["triggers"])]
        return {"scenario_id": sid, "version": sc["version"], "triggers": triggers, "steps": steps,
                "runs": {k: states.get(k, 0) for k in ("active", "done", "failed")}}

    def funnel(self, sid: str, *, goal: str | None = None, within: str | int | None = None) -> dict:
        """Runs triggered, then runs that reached each step (in definition order), then runs whose member had
        the goal event (``goal`` or the definition's) within ``within`` of entering."""
        sc = self.get(sid)
        d = sc["definition"]
        goal = goal or (d.get("goal") or {}).get("event")
        seconds = (parse_duration(within, "within") if within is not None
                   else (d.get("goal") or {}).get("within", 30 * 86400))
        r, log_ = scenario_runs.c, scenario_step_log.c
        with self.db.read() as conn:
            total = conn.execute(select(func.count()).where(r.scenario_id == sid)).scalar_one()
            reached = dict(conn.execute(select(log_.step, func.count(func.distinct(log_.run_id))).where(
                log_.scenario_id == sid, log_.outcome == "entered").group_by(log_.step)).all())
            stages = [{"stage": "triggered", "count": total}]
            stages += [{"stage": s["id"], "count": reached.get(s["id"], 0)} for s in d["steps"]]
            if goal:
                table = scenario_events if goal in ("birthday", "segment_entered") else events
                upper = dialect_of(conn).plus_seconds(r.entered_at, seconds)
                hit = select(func.count()).where(r.scenario_id == sid, select(table.c.id).where(
                    table.c.member_id == r.member_id, table.c.kind == goal, table.c.created_at >= r.entered_at,
                    table.c.created_at <= upper).exists())
                stages.append({"stage": f"goal:{goal}", "count": conn.execute(hit).scalar_one()})
        for s in stages:
            s["share"] = round(s["count"] / total, 4) if total else 0.0
        return {"scenario_id": sid, "goal": goal or "", "within_seconds": seconds, "stages": stages}

    # ---- dead letters -------------------------------------------------------------------------------------

    def dead_letters(self, limit: int = 100, after: tuple[str, int] | None = None) -> list[dict]:
        """Messages / webhook calls that failed for good and runs whose step failed ``MAX_STEP_ATTEMPTS`` times,
        newest first (the messages, then the runs); ``limit`` 1 to 10 000. ``after`` (kind, id): the next page
        starts after that item."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidArgument("limit", f"must be 1 to 10000, got {limit!r}")
        ob, r = scenario_outbox.c, scenario_runs.c
        after_kind, after_id = after or ("", None)
        with self.db.read() as conn:
            msgs = [] if after_kind == "run" else conn.execute(
                select(ob.id, ob.key, ob.scenario_id, ob.step, ob.member_id, ob.channel, ob.attempts, ob.last_error,
                       ob.next_attempt_at).where(ob.state == "dead", *_older(ob.id, after_id if after_kind == "message" else None))
                .order_by(ob.id.desc()).limit(limit)).all()
            runs = conn.execute(select(r.id, r.scenario_id, r.step, r.member_id, r.attempts, r.error, r.finished_at)
                                .where(r.state == "failed", *_older(r.id, after_id if after_kind == "run" else None))
                                .order_by(r.id.desc()).limit(limit)).all()
        out = [{"kind": "message", "id": m.id, "key": m.key, "scenario_id": m.scenario_id, "step": m.step,
                "member_id": m.member_id, "channel": m.channel, "attempts": m.attempts, "error": m.last_error,
                "at": m.next_attempt_at} for m in msgs]
        out += [{"kind": "run", "id": x.id, "key": f"run:{x.id}", "scenario_id": x.scenario_id, "step": x.step,
                 "member_id": x.member_id, "channel": "", "attempts": x.attempts, "error": x.error, "at": x.finished_at}
                for x in runs]
        return out[:limit]

    def retry_dead_letter(self, kind: str, item_id: int) -> dict:
        """Put a dead message back in the outbox, or a failed run back on its step, due now."""
        now = self.clock()

        def tx(conn):
            if kind == "message":
                n = conn.execute(update(scenario_outbox).where(scenario_outbox.c.id == item_id,
                                                               scenario_outbox.c.state == "dead")
                                 .values(state="pending", attempts=0, next_attempt_at=now)).rowcount
            elif kind == "run":
                n = conn.execute(update(scenario_runs).where(scenario_runs.c.id == item_id,
                                                             scenario_runs.c.state == "failed")
                                 .values(state="active", attempts=0, wake_at=now, finished_at=None,
                                         updated_at=now)).rowcount
            else:
                raise InvalidArgument("kind", f"expected message or run, got {kind!r}")
            if not n:
                raise NotFound(f"no dead {kind} {item_id}")
            audit.record(conn, "RetryDeadLetter", f"{kind}:{item_id}", now)
            return {"kind": kind, "id": item_id, "retried": True}
        return self.db.run_write(tx)

    # ---- promo codes --------------------------------------------------------------------------------------

    def add_promo_codes(self, pool: str, codes) -> dict:
        """Add codes to a pool (codes already there are ignored); returns added and what is left unissued."""
        from .vocabulary import _name
        _name(pool, "pool")
        clean = []
        for i, c in enumerate(codes):
            if not isinstance(c, str) or not c.strip() or len(c.strip()) > 100:
                raise InvalidArgument(f"codes[{i}]", "a code of 1 to 100 characters")
            clean.append(c.strip())

        def tx(conn):
            pc = promo_codes.c
            before = conn.execute(select(func.count()).where(pc.pool == pool)).scalar_one()
            for k in range(0, len(clean), 5000):
                conn.execute(insert_ignore(conn, promo_codes), [
                    {"pool": pool, "code": c, "member_id": None, "issue_key": None, "issued_at": None}
                    for c in clean[k:k + 5000]])
            after = conn.execute(select(func.count()).where(pc.pool == pool)).scalar_one()
            left = conn.execute(select(func.count()).where(pc.pool == pool, pc.issued_at.is_(None))).scalar_one()
            return {"pool": pool, "added": after - before, "available": left}
        return self.db.run_write(tx)

    # ---- batches ------------------------------------------------------------------------------------------

    def start_batch(self, batch_id: str, kind: str, points: int, *, reason: str = "", expiry_days: int | None = None,
                    segment: str | None = None, members: list | None = None, all_members: bool = False) -> dict:
        # every target given is passed on: more than one is refused (InvalidArgument), never silently chosen
        target = {k: v for k, v in (("segment", segment), ("members", members), ("all", all_members)) if v}
        return batches_mod.create(self.db, self.clock(), batch_id, kind, points, reason=reason,
                                  expiry_days=expiry_days, target=target)

    def batch_progress(self, batch_id: str) -> dict:
        return batches_mod.progress(self.db, batch_id)

    def run_batch(self, batch_id: str, *, chunk: int = batches_mod.CHUNK, on_progress=None) -> dict:
        return batches_mod.run(self.db, self.clock, batch_id, chunk=chunk, on_progress=on_progress)


    # ---- message events from providers --------------------------------------------------------------------

    def record_message_events(self, events: list) -> dict:
        """Record a batch of provider events (mappings of ``message_events.EVENT_KEYS``): validated whole
        first (``InvalidArgument`` naming ``events[i].<field>``, nothing written), then written in one
        transaction; see ``message_events`` for duplicates, rejections and subscription effects."""
        batch = message_events_mod.validate_batch(events)
        now = self.clock()
        return self.db.run_write(message_events_mod.record, batch, now, idempotent=True)   # keyed by event ids
