"""Executing runs: claim due runs, walk their steps, commit each run's effects together with its advance.

A run is a row of ``scenario_runs`` pointing at its current step. ``run_due`` claims up to ``limit`` active
runs whose ``wake_at`` has come (PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so several workers on several
machines take disjoint runs and never wait for each other; SQLite: the transaction is ``BEGIN IMMEDIATE``,
one writer at a time), and walks each run, inside a SAVEPOINT, from step to step until it waits, ends or
fails. Every effect of a step (ledger entry and lot, outbox row, promo code, tag, profile change, stats row)
and the run's new position are written in that same transaction: a worker killed at any point either
committed the step and its effects or neither, and the row lock is released by the dead connection, so
another worker simply takes the run again. The effect keys (``scenario:<run>:<step>:<visit>``) make even a
replay of a committed step harmless; they are belt and braces, not the mechanism.

A ``wait`` is a later ``wake_at`` (the run stays on the wait step with ``context.waiting``): timers are rows,
so they survive restarts. A step that raises is retried with exponential backoff (``wake_at``) and after
``MAX_STEP_ATTEMPTS`` the run becomes ``failed``: a dead letter that can be retried from the Admin API.
"""
from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import exists, func, insert, or_, select, update

from loyalty.server import ledger
from loyalty.server.dialects import dialect_of
from loyalty.server.errors import InvalidArgument
from loyalty.server.models import balances, events, members, program_versions, purchases
from loyalty.server.segments.models import message_events

from .common import backoff, claim, insert_ignore, load_member, member_values
from .definitions import next_until
from .models import promo_codes, scenario_events, scenario_outbox, scenario_runs, scenario_step_log, scenarios
from .vocabulary import render

__all__ = ["Runner", "StepError", "MAX_STEP_ATTEMPTS", "log_rows"]

log = logging.getLogger(__name__)

MAX_STEP_ATTEMPTS = 5
STEP_BACKOFF_S = 30.0
STEP_BACKOFF_CAP_S = 3600.0
MAX_STEPS_PER_CLAIM = 100


class StepError(Exception):
    """A step cannot be done now (an empty promo pool, a segment that is not static...): retried later."""


def log_rows(conn, rows: list[dict]) -> None:
    if rows:
        conn.execute(insert(scenario_step_log), rows)


class _Walk:
    """The state of one run while its steps execute (in memory until the transaction writes it)."""

    def __init__(self, run, definition: dict, now: dt.datetime):
        self.run = run
        self.definition = definition
        self.steps = definition["steps"]
        self.index = {s["id"]: i for i, s in enumerate(self.steps)}
        self.step = run.step
        self.visit = run.visit
        self.context = dict(run.context or {})
        self.now = now
        self.member: dict | None = None
        self.log: list[dict] = []
        self.executed = 0

    def record(self, step: str, outcome: str) -> None:
        self.log.append({"run_id": self.run.id, "scenario_id": self.run.scenario_id, "step": step,
                         "outcome": outcome, "at": self.now})

    def following(self, i: int) -> str:
        return self.steps[i + 1]["id"] if i + 1 < len(self.steps) else "end"


class Runner:
    """Walks due runs. ``clock`` returns an aware datetime; ``segments`` (optional) is a ``SegmentService``
    whose bitmap writer is reused when a step adds to a static segment or an external tag."""

    def __init__(self, database, clock, *, segments=None):
        self.db = database
        self.clock = clock
        self._segments = segments

    # ---- claiming ---------------------------------------------------------------------------------------

    def run_due(self, now: dt.datetime | None = None, limit: int = 20) -> int:
        """Claim and walk up to ``limit`` due runs in one transaction; returns the number of steps done."""
        now = now or self.clock()

        def tx(conn):
            rows = conn.execute(claim(conn, select(scenario_runs)
                                      .where(scenario_runs.c.state == "active", scenario_runs.c.wake_at <= now)
                                      .order_by(scenario_runs.c.wake_at, scenario_runs.c.id).limit(limit))).all()
            if not rows:
                return 0
            ids = {r.scenario_id for r in rows}
            defs = {r.id: r.definition for r in conn.execute(
                select(scenarios.c.id, scenarios.c.definition).where(scenarios.c.id.in_(ids)))}
            done = 0
            for run in rows:
                done += self._walk_one(conn, run, defs.get(run.scenario_id), now)
            return done
        return self.db.run_write(tx)

    def _walk_one(self, conn, run, definition: dict | None, now: dt.datetime) -> int:
        if definition is None:
            self._finish(conn, run.id, "failed", now, error=f"scenario {run.scenario_id!r} no longer exists")
            return 0
        walk = _Walk(run, definition, now)
        try:
            with conn.begin_nested():
                self._walk(conn, walk)
            return walk.executed
        except Exception as exc:  # noqa: BLE001 - any failure of a step: retry the run later, never crash
            reason = str(exc) if isinstance(exc, StepError) else f"{type(exc).__name__}: {exc}"
            log.warning("scenario %s run %s step %s failed (attempt %s): %s", run.scenario_id, run.id, run.step,
                        run.attempts + 1, reason)
            attempts = run.attempts + 1
            if attempts >= MAX_STEP_ATTEMPTS:
                self._finish(conn, run.id, "failed", now, error=reason[:2000], attempts=attempts)
                log_rows(conn, [{"run_id": run.id, "scenario_id": run.scenario_id, "step": run.step,
                                 "outcome": "failed", "at": now}])
            else:
                conn.execute(update(scenario_runs).where(scenario_runs.c.id == run.id).values(
                    attempts=attempts, error=reason[:2000], updated_at=now,
                    wake_at=now + backoff(attempts, STEP_BACKOFF_S, STEP_BACKOFF_CAP_S)))
            return 0

    @staticmethod
    def _finish(conn, run_id: int, state: str, now, *, error: str = "", attempts: int | None = None) -> None:
        values = {"state": state, "finished_at": now, "updated_at": now, "error": error}
        if attempts is not None:
            values["attempts"] = attempts
        conn.execute(update(scenario_runs).where(scenario_runs.c.id == run_id).values(**values))

    # ---- walking ------------------------------------------------------------------------------------------

    def _walk(self, conn, w: _Walk) -> None:
        wake_at = None
        while True:
            if w.step == "end":
                break
            i = w.index.get(w.step)
            if i is None:
                raise StepError(f"step {w.step!r} is no longer in scenario {w.run.scenario_id!r}")
            if w.executed >= MAX_STEPS_PER_CLAIM:
                wake_at = w.now          # a very long chain: let other runs go first, continue next claim
                break
            step = w.steps[i]
            if step["type"] == "wait":
                if not w.context.get("waiting"):
                    w.context["waiting"] = True
                    wake_at = (w.now + dt.timedelta(seconds=step["seconds"]) if "seconds" in step
                               else next_until(step, w.now))
                    break
                w.context.pop("waiting", None)
                outcome, nxt = "completed", step.get("next", w.following(i))
            else:
                outcome, nxt = self._do(conn, w, step, i)
            w.executed += 1
            w.record(step["id"], outcome)
            w.step = nxt
            if nxt != "end":
                w.visit += 1
                w.record(nxt, "entered")
        values = {"step": w.step, "visit": w.visit, "context": w.context, "attempts": 0, "error": "",
                  "updated_at": w.now}
        if w.step == "end":
            values.update(state="done", finished_at=w.now)
        else:
            values["wake_at"] = wake_at or w.now
        conn.execute(update(scenario_runs).where(scenario_runs.c.id == w.run.id).values(**values))
        log_rows(conn, w.log)

    def _member(self, conn, w: _Walk) -> dict:
        if w.member is None:
            w.member = load_member(conn, w.run.member_id)
            if w.member is None:
                raise StepError(f"member {w.run.member_id} does not exist")
        return w.member

    def _do(self, conn, w: _Walk, step: dict, i: int) -> tuple[str, str]:
        kind = step["type"]
        following = step.get("next", w.following(i))
        key = f"scenario:{w.run.id}:{step['id']}:{w.visit}"
        if kind == "condition":
            yes = self._condition(conn, w, step["if"])
            return ("yes", step.get("yes", w.following(i))) if yes else ("no", step.get("no", w.following(i)))
        if kind == "goto":
            return "completed", step["target"]
        if kind == "award_points":
            self._award(conn, w, step, key)
        elif kind == "deduct_points":
            self._deduct(conn, w, step, key)
        elif kind == "update_profile":
            self._update_profile(conn, w, step)
        elif kind == "issue_promo_code":
            self._issue_code(conn, w, step, key)
        elif kind == "send":
            self._send(conn, w, step, key)
        elif kind == "webhook":
            self._webhook(conn, w, step, key)
        elif kind == "add_tag":
            self._add_tag(conn, w, step)
        elif kind == "add_to_segment":
            self._add_to_segment(conn, w, step)
        else:  # pragma: no cover - definitions are validated
            raise StepError(f"unknown step type {kind!r}")
        return "completed", following

    # ---- conditions -----------------------------------------------------------------------------------------

    @staticmethod
    def _window(w: _Walk, leaf: dict, at):
        """``at`` (a column) inside the condition's window: it counts from the event that started the run
        (``entered_at``, the event's own time, not when a worker picked it up), for ``within`` seconds when
        given, else up to now. "Bought within a day of registering" is a purchase in [registration,
        registration + 1 day]: one made before the registration, or after that day, does not count."""
        start = w.run.entered_at
        if "within" in leaf:
            return (at >= start) & (at <= start + dt.timedelta(seconds=leaf["within"]))
        return at >= start

    def _condition(self, conn, w: _Walk, node: dict) -> bool:
        (kind, arg), = node.items()
        if kind == "all":
            return all(self._condition(conn, w, c) for c in arg)
        if kind == "any":
            return any(self._condition(conn, w, c) for c in arg)
        if kind == "not":
            return not self._condition(conn, w, arg)
        member_id = w.run.member_id
        if kind == "member":
            return _compare(_field(self._member(conn, w), arg["field"]), arg["op"], arg["value"])
        if kind == "message":
            me = message_events.c
            return conn.execute(select(exists().where(
                me.member_id == member_id, me.channel == arg["channel"], me.kind == arg["kind"],
                self._window(w, arg, me.at)))).scalar()
        if kind == "event" and arg["kind"] == "purchase_confirmed":
            # purchases happen when their receipts say (SPEC 6): counted by receipt time, cancelled ones not
            # The window opens at the run's event by the receipt's time, or by the confirmation for a receipt
            # printed a little before it (a card registered at the till while its first receipt was open)
            p = purchases.c
            start = w.run.entered_at
            where = [p.member_id == member_id, p.status != "cancelled",
                     or_(p.receipt_time >= start, p.created_at >= start)]
            if "within" in arg:
                where.append(p.receipt_time <= start + dt.timedelta(seconds=arg["within"]))
            started = (w.run.context or {}).get("event") or {}
            if started.get("kind") == "purchase_confirmed" and str(started.get("purchase_id", "")).isdigit():
                where.append(p.id != int(started["purchase_id"]))      # not the run's own purchase
            return conn.execute(select(exists().where(*where))).scalar()
        if kind == "event":
            table = scenario_events if arg["kind"] in ("birthday", "segment_entered") else events
            where = [table.c.member_id == member_id, table.c.kind == arg["kind"],
                     self._window(w, arg, table.c.created_at)]
            started = (w.run.context or {}).get("event") or {}
            if started.get("kind") == arg["kind"] and started.get("id") is not None:
                # the window opens at the run's own event; that event is not one that happened in it ("bought
                # again within a week" of the purchase that started the run)
                where.append(table.c.id != started["id"])
            return conn.execute(select(exists().where(*where))).scalar()
        if kind == "visited":
            log_ = scenario_step_log.c
            done = conn.execute(select(func.count()).where(
                log_.run_id == w.run.id, log_.step == arg["step"], log_.outcome == "completed")).scalar_one()
            done += sum(1 for r in w.log if r["step"] == arg["step"] and r["outcome"] == "completed")
            return done >= arg["times"]
        if kind == "tag":
            return self._segments_service().has_tag(conn, member_id, arg)
        if kind == "segment":
            return self._segments_service().contains(conn, arg, member_id)
        raise StepError(f"unknown condition {kind!r}")  # pragma: no cover

    # ---- effects ----------------------------------------------------------------------------------------------

    def _lock_balance(self, conn, member_id: int) -> tuple[int, int]:
        stmt = select(balances.c.active, balances.c.pending).where(balances.c.member_id == member_id)
        row = conn.execute(dialect_of(conn).lock(stmt)).first()
        if row is None:
            raise StepError(f"member {member_id} has no balance")
        return row.active, row.pending

    def _expiry_days(self, conn, step: dict) -> int | None:
        if "expiry_days" in step:
            return step["expiry_days"]
        text = conn.execute(select(program_versions.c.yaml).order_by(program_versions.c.version.desc())
                            .limit(1)).scalar()
        if text is None:
            return None
        try:
            from loyalty.core import load_program_text
            return load_program_text(text).expiry_days
        except Exception:  # noqa: BLE001 - a published program was validated; no expiry if it cannot load
            return None

    def _already(self, conn, key: str) -> bool:
        from loyalty.server.models import ledger as entries
        return conn.execute(select(exists().where(entries.c.key == key))).scalar()

    def _award(self, conn, w: _Walk, step: dict, key: str) -> None:
        member_id, points, now = w.run.member_id, step["points"], w.now
        active, _ = self._lock_balance(conn, member_id)
        if self._already(conn, key):
            return
        days = self._expiry_days(conn, step)
        entry = ledger.add_entry(conn, key=key, member_id=member_id, kind="adjustment", active_delta=points, now=now,
                                 operation_id=key[:100], reason=step["reason"] or f"scenario {w.run.scenario_id}")
        ledger.new_lot(conn, member_id=member_id, points=points, entry_id=entry, state="active", activates_at=now,
                       expires_at=now + dt.timedelta(days=days) if days else None)
        ledger.move_balance(conn, member_id, active=points, now=now)
        if active < 0:
            ledger.settle_debt(conn, member_id, active + points)
        w.member = None

    def _deduct(self, conn, w: _Walk, step: dict, key: str) -> None:
        """Takes up to ``points`` (never below zero: a member with fewer points gives what they have)."""
        member_id, now = w.run.member_id, w.now
        active, _ = self._lock_balance(conn, member_id)
        take = min(step["points"], max(active, 0))
        if take <= 0 or self._already(conn, key):
            return
        ledger.consume_active(conn, member_id, take)
        ledger.add_entry(conn, key=key, member_id=member_id, kind="adjustment", active_delta=-take, now=now,
                         operation_id=key[:100], reason=step["reason"] or f"scenario {w.run.scenario_id}")
        ledger.move_balance(conn, member_id, active=-take, now=now)
        w.member = None

    def _update_profile(self, conn, w: _Walk, step: dict) -> None:
        member_id = w.run.member_id
        custom = conn.execute(dialect_of(conn).lock(select(members.c.custom).where(members.c.id == member_id))).scalar()
        field = step["field"]
        if field.startswith("custom."):
            name = field[7:]
            custom = dict(custom or {})
            if "increment" in step:
                current = custom.get(name, 0)
                if isinstance(current, bool) or not isinstance(current, int):
                    try:
                        current = int(str(current))
                    except ValueError:
                        raise StepError(f"custom field {name!r} holds {current!r}, not a number") from None
                custom[name] = current + step["increment"]
            else:
                custom[name] = step["set"]
            conn.execute(update(members).where(members.c.id == member_id).values(custom=custom))
        else:
            conn.execute(update(members).where(members.c.id == member_id).values({field: step["set"]}))
        w.member = None

    def _issue_code(self, conn, w: _Walk, step: dict, key: str) -> None:
        pc = promo_codes.c
        code = conn.execute(select(pc.code).where(pc.issue_key == key)).scalar()
        if code is None:
            row = conn.execute(claim(conn, select(pc.id, pc.code).where(pc.pool == step["pool"],
                                                                          pc.issued_at.is_(None))
                                     .order_by(pc.id).limit(1))).first()
            if row is None:
                raise StepError(f"promo code pool {step['pool']!r} is empty")
            conn.execute(update(promo_codes).where(pc.id == row.id).values(
                member_id=w.run.member_id, issue_key=key, issued_at=w.now))
            code = row.code
        w.context["promo_code"] = code

    def _send(self, conn, w: _Walk, step: dict, key: str) -> None:
        member = self._member(conn, w)
        channel = step["channel"]
        recipient = {"email": member["email"] or "", "sms": member["phone"] or "",
                     "push": str(member["member_id"])}[channel]
        skip = ""
        if not recipient:
            skip = f"the member has no {'e-mail address' if channel == 'email' else 'phone'}"
        elif not step["transactional"]:
            if member["card_status"] != "active":
                skip = f"card status is {member['card_status']}: no marketing messages"
            elif not member["subscriptions"].get(channel):
                skip = f"not subscribed to {channel}"
        values = member_values(member, w.context, w.run.scenario_id)
        conn.execute(insert_ignore(conn, scenario_outbox).values(
            key=key, run_id=w.run.id, scenario_id=w.run.scenario_id, step=step["id"], member_id=member["member_id"],
            channel=channel, transactional=step["transactional"], recipient=recipient,
            subject=render(step["subject"], values), body=render(step["body"], values), payload={},
            state="skipped" if skip else "pending", attempts=0, next_attempt_at=w.now, last_error=skip,
            created_at=w.now, sent_at=None))

    def _webhook(self, conn, w: _Walk, step: dict, key: str) -> None:
        member = self._member(conn, w)
        values = member_values(member, w.context, w.run.scenario_id)
        body = step["body"]
        if body is None:
            body = {"scenario": w.run.scenario_id, "run_id": w.run.id, "step": step["id"],
                    "member": {k: v for k, v in values.items() if k in (
                        "member_id", "card", "phone", "email", "first_name", "last_name", "city", "tier",
                        "active_points")}}
        else:
            body = _render_body(body, values)
        conn.execute(insert_ignore(conn, scenario_outbox).values(
            key=key, run_id=w.run.id, scenario_id=w.run.scenario_id, step=step["id"], member_id=member["member_id"],
            channel="webhook", transactional=True, recipient=render(step["url"], values), subject="", body="",
            payload={"method": step["method"], "headers": step["headers"], "json": body}, state="pending",
            attempts=0, next_attempt_at=w.now, last_error="", created_at=w.now, sent_at=None))

    def _segments_service(self):
        if self._segments is None:
            from loyalty.server.segments.service import SegmentService
            self._segments = SegmentService(self.db, clock=self.clock)
        return self._segments

    def _add_tag(self, conn, w: _Walk, step: dict) -> None:
        self._segments_service().tag_member(conn, step["tag"], w.run.member_id, now=w.now)

    def _add_to_segment(self, conn, w: _Walk, step: dict) -> None:
        try:
            self._segments_service().add_to_static(conn, step["segment"], w.run.member_id, source="scenario",
                                                   actor=w.run.scenario_id, now=w.now)
        except InvalidArgument as exc:
            raise StepError(f"{exc.reason} (a scenario's add_to_segment step)") from None


def _render_body(body, values):
    if isinstance(body, str):
        return render(body, values)
    if isinstance(body, dict):
        return {k: _render_body(v, values) for k, v in body.items()}
    if isinstance(body, list):
        return [_render_body(v, values) for v in body]
    return body


def _field(member: dict, field: str):
    if field.startswith("custom."):
        return member["custom"].get(field[7:])
    if field.startswith("subscribed."):
        return bool(member["subscriptions"].get(field[11:]))
    return member.get(field)


def _compare(value, op: str, expected) -> bool:
    if op == "exists":
        return (value not in (None, "")) == expected
    if op == "eq":
        return value == expected
    if op == "ne":
        return value != expected
    if op == "in":
        return value in expected
    if op == "not_in":
        return value not in expected
    if value is None:
        return False
    try:
        return {"gt": value > expected, "gte": value >= expected, "lt": value < expected,
                "lte": value <= expected}[op]
    except TypeError:
        return False

