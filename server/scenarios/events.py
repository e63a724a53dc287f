"""Events into runs: the consumer of the domain ``events`` outbox and of the module's own ``scenario_events``,
and the two producers the storage layer does not have (``birthday``, a daily job; ``segment_entered``, from
the segment module's membership bitmaps).

Consumption is a durable cursor per table (``scenario_cursors``): one worker at a time holds the cursor row
(``FOR UPDATE SKIP LOCKED``; the others go on with runs and deliveries), reads the next events with
``id > position AND processed_at IS NULL``, creates the runs their triggers ask for, marks the events
processed, and commits all of it together. The position only moves past events processed at least
``GRACE`` ago: PostgreSQL hands out ids before commit, so an event with a smaller id can become visible
after a larger one; it is still found by ``processed_at IS NULL`` as long as it is above the position.

Re-entry: ``never`` gives a run the entry key ``member:<id>`` (once per member, ever; the unique
``(scenario_id, entry_key)`` enforces it), ``always`` the key of the event (once per event), ``after_exit``
the key of the event but only when the member has no active run of the scenario.

A run's ``entered_at`` is the time of its event, not of its intake: a condition's window and the funnel's
goal count from what the member did, however late a worker picked the event up.
"""
from __future__ import annotations

import datetime as dt
import logging

from pyroaring import BitMap
from sqlalchemy import JSON, String, cast, func, literal, select, update

from loyalty.server.dialects import dialect_of
from loyalty.server.models import events, members
from loyalty.server.segments.service import stored_membership

from .common import claim, insert_ignore
from .engine import log_rows
from .models import scenario_cursors, scenario_events, scenario_runs, scenario_segment_watch, scenarios
from .triggers import match_trigger

__all__ = ["intake", "emit_birthdays", "watch_segments", "emit_event", "GRACE"]

log = logging.getLogger(__name__)

GRACE = dt.timedelta(seconds=60)
_SOURCES = {"events": events, "scenario_events": scenario_events}


def _happened(ev) -> dt.datetime:
    """When an event happened: a purchase when its receipt says (``payload["at"]``, SPEC 6: a receipt confirmed
    late counts on its own date), anything else when it was recorded."""
    at = (ev.payload or {}).get("at") if ev.kind == "purchase_confirmed" else None
    if at:
        try:
            return dt.datetime.fromisoformat(at)
        except ValueError:
            pass
    return ev.created_at


def _enabled(conn) -> list:
    return conn.execute(select(scenarios.c.id, scenarios.c.definition, scenarios.c.created_at)
                        .where(scenarios.c.enabled.is_(True)).order_by(scenarios.c.id)).all()


def _lock_cursor(conn, name: str, now: dt.datetime):
    stmt = claim(conn, select(scenario_cursors.c.position, scenario_cursors.c.value)
                 .where(scenario_cursors.c.name == name))
    row = conn.execute(stmt).first()
    if row is None:
        conn.execute(insert_ignore(conn, scenario_cursors).values(name=name, position=0, value="", updated_at=now))
        row = conn.execute(stmt).first()
    return row


def intake(database, now: dt.datetime, *, limit: int = 500) -> int:
    """Turn up to ``limit`` new events of each source into runs; returns the number of runs created (0 when
    another worker holds the cursor)."""
    created = 0
    for name, table in _SOURCES.items():
        created += database.run_write(_intake_tx, name, table, now, limit)
    return created


def _intake_tx(conn, name: str, table, now: dt.datetime, limit: int) -> int:
    cursor = _lock_cursor(conn, name, now)
    if cursor is None:
        return 0                      # another worker is consuming this table right now
    position = cursor.position
    rows = conn.execute(select(table.c.id, table.c.kind, table.c.key, table.c.member_id, table.c.payload,
                               table.c.created_at)
                        .where(table.c.id > position, table.c.processed_at.is_(None))
                        .order_by(table.c.id).limit(limit)).all()
    created = 0
    if rows:
        active_cache: dict[tuple[str, int], bool] = {}
        enabled = _enabled(conn)
        known = set(conn.execute(select(members.c.id).where(
            members.c.id.in_({r.member_id for r in rows if r.member_id is not None}))).scalars()) if enabled else set()
        for ev in rows:
            if ev.member_id is None or ev.member_id not in known:
                continue
            for sc in enabled:
                if ev.created_at < sc.created_at:
                    continue          # a scenario reacts to what happens after it was created
                created += _enter(conn, sc, ev, name, now, active_cache)
        conn.execute(update(table).where(table.c.id.in_([r.id for r in rows])).values(processed_at=now))
    # Move the cursor over everything processed at least GRACE ago (see the module docstring).
    cut = now - GRACE
    blocker = conn.execute(select(func.min(table.c.id)).where(
        table.c.id > position, (table.c.processed_at.is_(None)) | (table.c.processed_at > cut))).scalar()
    if blocker is None:
        new_position = conn.execute(select(func.max(table.c.id)).where(table.c.id > position)).scalar() or position
    else:
        new_position = blocker - 1
    if new_position != position or rows:
        conn.execute(update(scenario_cursors).where(scenario_cursors.c.name == name).values(
            position=max(new_position, position), updated_at=now))
    return created


def _enter(conn, sc, ev, source: str, now: dt.datetime, active_cache: dict) -> int:
    definition = sc.definition
    payload = ev.payload or {}
    trigger = next((i for i, t in enumerate(definition["triggers"]) if match_trigger(t, ev.kind, payload)), None)
    if trigger is None:
        return 0
    policy = definition["reentry"]
    member_id = ev.member_id
    if policy == "never":
        entry_key = f"member:{member_id}"
    else:
        entry_key = f"{source}:{ev.id}"
        if policy == "after_exit":
            cache_key = (sc.id, member_id)
            if cache_key not in active_cache:
                active_cache[cache_key] = conn.execute(select(scenario_runs.c.id).where(
                    scenario_runs.c.scenario_id == sc.id, scenario_runs.c.member_id == member_id,
                    scenario_runs.c.state == "active").limit(1)).first() is not None
            if active_cache[cache_key]:
                return 0
            active_cache[cache_key] = True
    first = definition["steps"][0]["id"]
    run_id = conn.execute(insert_ignore(conn, scenario_runs).values(
        scenario_id=sc.id, member_id=member_id, entry_key=entry_key, trigger=f"triggers[{trigger}]",
        state="active", step=first, visit=1, wake_at=now, attempts=0,
        context={"event": {**payload, "kind": ev.kind, "id": ev.id}}, entered_at=_happened(ev), updated_at=now,
        finished_at=None, error="").returning(scenario_runs.c.id)).scalar()
    if run_id is None:
        return 0                      # re-entry refused by the unique entry key
    log_rows(conn, [{"run_id": run_id, "scenario_id": sc.id, "step": f"triggers[{trigger}]", "outcome": "triggered",
                     "at": now},
                    {"run_id": run_id, "scenario_id": sc.id, "step": first, "outcome": "entered", "at": now}])
    return 1


def emit_event(conn, kind: str, key: str, member_id: int, payload: dict, now: dt.datetime) -> None:
    """Add one of the module's own events (idempotent by ``key``)."""
    conn.execute(insert_ignore(conn, scenario_events).values(kind=kind, key=key, member_id=member_id,
                                                             payload=payload, created_at=now, processed_at=None))


# ---- birthdays --------------------------------------------------------------------------------------------

def _offsets(conn, kind: str, option: str) -> set:
    out = set()
    for sc in _enabled(conn):
        for t in sc.definition["triggers"]:
            if t["type"] == kind:
                out.add(t[option])
    return out


def emit_birthdays(database, now: dt.datetime, *, catch_up_days: int = 7) -> int:
    """Once per day: a ``birthday`` event for every member whose birthday is ``days_before`` days ahead, for
    each ``days_before`` a birthday trigger asks for. Days missed while no worker ran are caught up (at most
    ``catch_up_days``). Set-based: one ``INSERT ... SELECT`` per day and offset. Returns events added."""
    today = now.astimezone(dt.timezone.utc).date()

    def tx(conn):
        cursor = _lock_cursor(conn, "birthday", now)
        if cursor is None:
            return 0
        last = dt.date.fromisoformat(cursor.value) if cursor.value else today - dt.timedelta(days=1)
        if last >= today:
            return 0
        offsets = _offsets(conn, "birthday", "days_before")
        added = 0
        day = max(last + dt.timedelta(days=1), today - dt.timedelta(days=catch_up_days - 1))
        while day <= today:
            for k in sorted(offsets):
                target = day + dt.timedelta(days=k)
                added += _birthdays_on(conn, target, k, now)
            day += dt.timedelta(days=1)
        conn.execute(update(scenario_cursors).where(scenario_cursors.c.name == "birthday")
                     .values(value=today.isoformat(), updated_at=now))
        return added
    return database.run_write(tx)


def _birthdays_on(conn, target: dt.date, days_before: int, now: dt.datetime) -> int:
    days = [target.strftime("%m-%d")]
    if target.month == 2 and target.day == 28 and not _leap(target.year):
        days.append("02-29")          # born on 29 February: celebrated on the 28th in other years
    md = dialect_of(conn).month_day(members.c.birth_date)
    key_prefix = f"birthday:{target.year}:{days_before}:"
    key = literal(key_prefix) + cast(members.c.id, String())
    payload = {"date": target.isoformat(), "days_before": days_before}
    query = select(literal("birthday"), key, members.c.id, literal(payload, JSON), literal(now, members.c.registered_at.type)
                   ).where(members.c.birth_date.is_not(None), md.in_(days))
    before = conn.execute(select(func.count()).select_from(scenario_events)).scalar_one()
    conn.execute(insert_ignore(conn, scenario_events).from_select(
        ["kind", "key", "member_id", "payload", "created_at"], query))
    return conn.execute(select(func.count()).select_from(scenario_events)).scalar_one() - before


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


# ---- segment entered --------------------------------------------------------------------------------------

def watch_segments(database, now: dt.datetime) -> int:
    """For every segment a ``segment_entered`` trigger names: compare its membership bitmap (kept by the
    segment module, versioned: ``segments.service.stored_membership``) with the one seen last time and emit
    ``segment_entered`` for each member added. The first look only records the membership: members already
    inside did not just enter. Returns events added."""
    def tx(conn):
        wanted = _offsets(conn, "segment_entered", "segment")
        added = 0
        for sid in sorted(wanted):
            version, bitmap = stored_membership(conn, sid)
            seen = conn.execute(claim(conn, select(scenario_segment_watch.c.version, scenario_segment_watch.c.bitmap)
                                      .where(scenario_segment_watch.c.segment_id == sid))).first()
            if seen is None:
                conn.execute(insert_ignore(conn, scenario_segment_watch).values(
                    segment_id=sid, version=version, bitmap=bitmap.serialize(), updated_at=now))
                continue
            if seen.version == version:
                continue
            entered = bitmap - (BitMap.deserialize(seen.bitmap) if seen.bitmap else BitMap())
            rows = [{"kind": "segment_entered", "key": f"segment_entered:{sid}:{version}:{m}", "member_id": m,
                     "payload": {"segment": sid, "version": version}, "created_at": now, "processed_at": None}
                    for m in entered]
            for k in range(0, len(rows), 5000):
                conn.execute(insert_ignore(conn, scenario_events), rows[k:k + 5000])
            added += len(rows)
            conn.execute(update(scenario_segment_watch).where(scenario_segment_watch.c.segment_id == sid).values(
                version=version, bitmap=bitmap.serialize(), updated_at=now))
        return added
    return database.run_write(tx)

