"""The segment service: definitions (program file, Admin API, CLI), set-based calculation in the database,
static membership with its manual-change log, tags passed to the loyalty side, counts, previews and exports.

Every operation over many members is set-based SQL: a recalculation runs the tree's ONE query into a
temporary table, then ``DELETE ... WHERE NOT EXISTS`` and ``INSERT ... SELECT ... WHERE NOT EXISTS`` give the
removed and added members (their row counts are the run's figures); a CSV import or a tag goes through the
same temporary-table path. After any membership change the segment's roaring bitmap is rewritten and
``membership_version`` bumped in the same transaction (and announced on Redis), which is what every
process's ``AudienceIndex`` watches.

Types: ``static`` is a fixed list (manual add / remove, CSV import; a recalculation never touches it);
``updatable`` is recalculated from its conditions on its cron ``schedule`` (``run_due``) or on request;
``dynamic`` is evaluated on demand (count, preview, export, a snapshot on request, or for one member at
calculation time through ``AudienceIndex``).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import time
import uuid
from typing import Any, Callable, Iterable, Iterator

from pyroaring import BitMap
from sqlalchemy import (
    BigInteger, Column, MetaData, Table, delete, exists, func, insert, literal, select, update,
)

from loyalty.core import ProgramError, load_program_text
from loyalty.server.db import Database
from loyalty.server.dialects import dialect_of, insert_ignore
from loyalty.server.errors import FailedPrecondition, InvalidArgument, NotFound
from loyalty.server.models import balances, cards, members, program_versions
from loyalty.server.security import audit
from loyalty.server.timeutil import utcnow

from . import conditions as cond
from .models import (
    SEGMENT_TYPES, audience_bitmaps, audiences, member_tags, membership_version, segment_changes, segment_members,
    segment_runs, segments,
)

__all__ = ["SegmentService", "PREVIEW_COLUMNS", "CHANNEL", "Progress", "bump_membership_version",
           "stored_membership"]

log = logging.getLogger(__name__)

CHANNEL = "loyalty:membership"
SEGMENT_KEYS = ("id", "title", "type", "conditions", "schedule")
AUDIENCE_KEYS = ("id", "title", "include", "exclude")
CHANGE_SOURCES = ("api", "cli", "csv", "scenario")
RUN_SOURCES = ("schedule", "api", "cli", "program")
_CHUNK = 5000

# column name -> SQL expression, for preview and export ("configurable columns")
PREVIEW_COLUMNS: dict[str, Any] = {
    "member_id": members.c.id, "phone": members.c.phone, "first_name": members.c.first_name,
    "last_name": members.c.last_name, "gender": members.c.gender, "birth_date": members.c.birth_date,
    "email": members.c.email, "city": members.c.city, "source": members.c.source,
    "registered_at": members.c.registered_at,
    "card": select(cards.c.number).where(cards.c.member_id == members.c.id).order_by(
        (cards.c.status == "active").desc(), cards.c.id.desc()).limit(1).scalar_subquery(),
    "tier": select(balances.c.tier).where(balances.c.member_id == members.c.id).scalar_subquery(),
    "active_points": select(balances.c.active).where(balances.c.member_id == members.c.id).scalar_subquery(),
    "pending_points": select(balances.c.pending).where(balances.c.member_id == members.c.id).scalar_subquery(),
    "purchases_sum": select(balances.c.purchases_sum).where(balances.c.member_id == members.c.id)
    .scalar_subquery(),
}
DEFAULT_COLUMNS = ("member_id", "card", "first_name", "last_name", "gender", "city", "tier", "active_points")

Progress = Callable[[str, int, int], None]      # (phase, done, total)


def bump_membership_version(conn, now: dt.datetime) -> int:
    """One more ``membership_version`` in the caller's transaction; returns it. Every process's
    ``AudienceIndex`` then reloads what changed, and member contexts cached at an older version are not used
    again. Bumped by every membership write here, and by the writes that change what other processes' cached
    contexts hold (a card status, the periodic job's tiers and lots); announce it after the commit
    (``AudienceIndex.announce``) where Redis is configured."""
    conn.execute(update(membership_version).where(membership_version.c.id == 1).values(
        version=membership_version.c.version + 1, updated_at=now))
    return conn.execute(select(membership_version.c.version).where(membership_version.c.id == 1)).scalar_one()


def _check_limit(limit) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
        raise InvalidArgument("limit", f"from 1 to 10000, got {limit!r}")


def _id(value, path: str) -> str:
    if not isinstance(value, str) or not cond._NAME_RE.match(value):
        raise InvalidArgument(path, f"an id of 1-100 letters, digits, _ . - is required, got {value!r}")
    return value


def _temp_ids(conn) -> Table:
    t = Table(f"tmp_seg_{uuid.uuid4().hex[:10]}", MetaData(), Column("member_id", BigInteger),
              prefixes=["TEMPORARY"])
    t.create(conn)
    return t


class SegmentService:
    """Sync and thread-safe; one per process (or per CLI command)."""

    def __init__(self, database: Database, *, clock=None, redis_url: str | None = None):
        self.db = database
        self.clock = clock or utcnow
        self._redis = None
        self._groups_cache: tuple[int | None, dict] = (None, {})
        if redis_url:
            try:
                import redis
                self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
            except ImportError:  # pragma: no cover
                log.warning("redis is not installed; processes find new memberships by polling")

    @classmethod
    def open(cls, database_url: str, *, clock=None, redis_url: str | None = None) -> "SegmentService":
        return cls(Database(database_url), clock=clock, redis_url=redis_url)

    def close(self) -> None:
        self.db.dispose()

    # ---- definitions --------------------------------------------------------------------------------------

    def define_segment(self, spec: dict, *, path: str = "segment", origin: str = "api",
                       mode: str = "upsert", _batch: dict | None = None) -> dict:
        """Create (``mode="create"``), update (``"update"``) or either (``"upsert"``) a segment from its
        definition ``{id, title, type, conditions, schedule}``. Validates everything with field paths."""
        pre = f"{path}." if path else ""
        if not isinstance(spec, dict):
            raise InvalidArgument(path, "expected a mapping with id, type and conditions")
        for k in spec:
            if k not in SEGMENT_KEYS:
                raise InvalidArgument(f"{pre}{k}", f"unknown key; expected one of {', '.join(SEGMENT_KEYS)}")
        sid = _id(spec.get("id"), f"{pre}id")
        with self.db.read() as conn:
            existing = conn.execute(select(segments).where(segments.c.id == sid)).first()
            if mode == "create" and existing is not None:
                raise InvalidArgument(f"{pre}id", f"segment {sid!r} already exists")
            if mode == "update" and existing is None:
                raise NotFound(f"no segment {sid!r}")
            if existing is None and conn.execute(select(audiences.c.id).where(audiences.c.id == sid)).first():
                raise InvalidArgument(f"{pre}id", f"{sid!r} is already an audience id")
            stype = spec.get("type", existing.type if existing is not None else None)
            if stype not in SEGMENT_TYPES:
                raise InvalidArgument(f"{pre}type", f"expected one of {', '.join(SEGMENT_TYPES)}, got {stype!r}")
            if existing is not None and existing.type != stype and "static" in (stype, existing.type):
                raise InvalidArgument(f"{pre}type", f"cannot turn a {existing.type} segment into {stype}; "
                                                      f"create a new one")
            raw = spec["conditions"] if "conditions" in spec else (existing.conditions if existing else None)
            groups = self._groups(conn)
            batch = _batch or {}

            def known(ref):
                return ref in batch or conn.execute(select(segments.c.id).where(segments.c.id == ref)).first() \
                    is not None
            tree = None
            if raw is not None:
                tree = cond.validate(raw, f"{pre}conditions", known_segments=known, groups=groups)
            elif stype != "static":
                raise InvalidArgument(f"{pre}conditions", f"required for a {stype} segment")
            if sid in cond.segment_refs(tree or {}):
                raise InvalidArgument(f"{pre}conditions", "a segment cannot contain itself")
            schedule = spec.get("schedule", existing.schedule if existing else None)
            if schedule is not None:
                if stype != "updatable":
                    raise InvalidArgument(f"{pre}schedule", "only an updatable segment has a schedule")
                from croniter import croniter
                if not isinstance(schedule, str) or not croniter.is_valid(schedule):
                    raise InvalidArgument(f"{pre}schedule", f"not a cron expression: {schedule!r} "
                                                              f"(e.g. \"0 3 * * *\" for 03:00 every day)")
            if tree is not None:
                lookup = self._lookup(conn, {**batch, sid: (stype, tree)})
                cond.compile_query(tree, cond.CompileContext(self._as_of(), groups, lookup))  # cycles
        title = spec.get("title", existing.title if existing else "")
        if not isinstance(title, str) or len(title) > 200:
            raise InvalidArgument(f"{pre}title", "a string of at most 200 characters")
        now = self.clock()
        row = {"title": title, "type": stype, "conditions": tree, "schedule": schedule, "origin": origin,
               "updated_at": now, "next_run_at": self._next_run(schedule, now)}

        def write(conn):
            if existing is None:
                conn.execute(insert(segments).values(id=sid, created_at=now, member_count=0, **row))
            else:
                conn.execute(update(segments).where(segments.c.id == sid).values(**row))
            audit.record(conn, "UpdateSegment" if existing else "CreateSegment", f"segment:{sid}", now)
            self._bump(conn)      # the set of dynamic segments is part of what AudienceIndex serves
        self.db.run_write(write)
        self._announce()
        return self.get(sid)

    def define_audience(self, spec: dict, *, path: str = "audience", origin: str = "api", _batch=None) -> dict:
        """An audience: ``include`` (all of) and ``exclude`` (none of) lists of segment ids."""
        pre = f"{path}." if path else ""
        if not isinstance(spec, dict):
            raise InvalidArgument(path, "expected a mapping with id, include and exclude")
        for k in spec:
            if k not in AUDIENCE_KEYS:
                raise InvalidArgument(f"{pre}{k}", f"unknown key; expected one of {', '.join(AUDIENCE_KEYS)}")
        aid = _id(spec.get("id"), f"{pre}id")
        lists = {}
        with self.db.read() as conn:
            if conn.execute(select(segments.c.id).where(segments.c.id == aid)).first():
                raise InvalidArgument(f"{pre}id", f"{aid!r} is already a segment id")
            for key in ("include", "exclude"):
                value = spec.get(key, [])
                if not isinstance(value, list):
                    raise InvalidArgument(f"{pre}{key}", "expected a list of segment ids")
                for i, ref in enumerate(value):
                    _id(ref, f"{pre}{key}[{i}]")
                    if ref not in (_batch or {}) and not conn.execute(
                            select(segments.c.id).where(segments.c.id == ref)).first():
                        raise InvalidArgument(f"{pre}{key}[{i}]", f"no segment {ref!r}")
                lists[key] = list(value)
            if not lists["include"]:
                raise InvalidArgument(f"{pre}include", "an audience includes at least one segment")
            existing = conn.execute(select(audiences.c.id).where(audiences.c.id == aid)).first()
        now = self.clock()
        values = {"title": spec.get("title", ""), "include": lists["include"], "exclude": lists["exclude"],
                  "origin": origin, "updated_at": now}

        def write(conn):
            if existing is None:
                conn.execute(insert(audiences).values(id=aid, created_at=now, **values))
            else:
                conn.execute(update(audiences).where(audiences.c.id == aid).values(**values))
            audit.record(conn, "DefineAudience", f"audience:{aid}", now)
            self._bump(conn)      # audience definitions are part of what AudienceIndex serves
        self.db.run_write(write)
        self._announce()
        return {"id": aid, **values, "kind": "audience"}

    def apply_program(self, source: dict | None, *, recalculate: bool = True) -> dict:
        """The program file's top-level ``segments:`` and ``audiences:`` lists (``Program.source``): each
        segment is created or updated (paths ``segments[2].conditions.all[1]...``); new or changed
        updatable and dynamic segments are calculated when ``recalculate``."""
        source = source or {}
        segs = source.get("segments") or []
        auds = source.get("audiences") or []
        if not isinstance(segs, list):
            raise InvalidArgument("segments", "expected a list of segments")
        if not isinstance(auds, list):
            raise InvalidArgument("audiences", "expected a list of audiences")
        batch: dict = {}
        for i, spec in enumerate(segs):       # ids first, so segments may refer to later ones
            if isinstance(spec, dict) and isinstance(spec.get("id"), str):
                if spec["id"] in batch:
                    raise InvalidArgument(f"segments[{i}].id", f"duplicate id {spec['id']!r}")
                batch[spec["id"]] = (spec.get("type"), None)
        # define in dependency order: a segment after the segments of the file it names
        out, done, pending = [], set(), list(range(len(segs)))
        while pending:
            ready = [i for i in pending if not (self._refs(segs[i]) & (set(batch) - done - {segs[i].get("id")}))]
            for i in ready or pending[:1]:    # a cycle: define_segment reports it with its path
                out.append(self.define_segment(segs[i], path=f"segments[{i}]", origin="program", _batch=batch))
                done.add(segs[i]["id"])
                pending.remove(i)
        auds_out = [self.define_audience(spec, path=f"audiences[{i}]", origin="program", _batch=batch)
                    for i, spec in enumerate(auds)]
        runs = []
        if recalculate:
            for seg in out:
                if seg["type"] != "static":
                    runs.append(self.recalculate(seg["id"], source="program"))
        return {"segments": [s["id"] for s in out], "audiences": [a["id"] for a in auds_out], "runs": runs}

    @staticmethod
    def _refs(spec) -> set[str]:
        if isinstance(spec, dict) and isinstance(spec.get("conditions"), dict):
            try:
                return cond.segment_refs(spec["conditions"])
            except Exception:  # noqa: BLE001 - validation reports a malformed tree with its path
                return set()
        return set()

    def delete(self, target: str) -> None:
        def write(conn):
            if conn.execute(delete(segments).where(segments.c.id == target)).rowcount:
                conn.execute(delete(segment_members).where(segment_members.c.segment_id == target))
            elif not conn.execute(delete(audiences).where(audiences.c.id == target)).rowcount:
                raise NotFound(f"no segment or audience {target!r}")
            conn.execute(delete(audience_bitmaps).where(audience_bitmaps.c.audience_id == target))
            audit.record(conn, "DeleteSegment", f"segment:{target}", self.clock())
            self._bump(conn)
        self.db.run_write(write)
        self._announce()

    def get(self, target: str) -> dict:
        with self.db.read() as conn:
            row = conn.execute(select(segments).where(segments.c.id == target)).first()
            if row is not None:
                return {**dict(row._mapping), "kind": "segment"}
            row = conn.execute(select(audiences).where(audiences.c.id == target)).first()
            if row is not None:
                return {**dict(row._mapping), "kind": "audience"}
        raise NotFound(f"no segment or audience {target!r}")

    def list(self) -> list[dict]:
        with self.db.read() as conn:
            segs = [{**dict(r._mapping), "kind": "segment"}
                    for r in conn.execute(select(segments).order_by(segments.c.id))]
            auds = [{**dict(r._mapping), "kind": "audience"}
                    for r in conn.execute(select(audiences).order_by(audiences.c.id))]
        return segs + auds

    # ---- calculation ----------------------------------------------------------------------------------------

    def recalculate(self, sid: str, *, source: str = "api", progress: Progress | None = None) -> dict:
        """Calculate an updatable segment (stored membership: added / removed counted set-based) or take a
        snapshot of a dynamic one (for the core, e.g. at campaign launch). A static segment is a fixed list:
        ``FailedPrecondition``. Returns the run (id, started_at, source, count, added, removed, duration_ms)."""
        seg = self.get(sid)
        if seg["kind"] != "segment":
            raise FailedPrecondition(f"{sid!r} is an audience; recalculate its segments")
        if seg["type"] == "static":
            raise FailedPrecondition(f"segment {sid!r} is static: a fixed list, changed only by add / remove / "
                                     f"import, never recalculated")
        if source not in RUN_SOURCES:
            raise InvalidArgument("source", f"expected one of {', '.join(RUN_SOURCES)}")
        report = progress or (lambda phase, done, total: None)
        started = self.clock()
        t0 = time.perf_counter()
        run_id = self.db.run_write(lambda conn: conn.execute(insert(segment_runs).values(
            segment_id=sid, source=source, status="running", phase="evaluating", started_at=started,
            finished_at=None, duration_ms=0, member_count=0, added=0, removed=0, error="")
            .returning(segment_runs.c.id)).scalar_one())

        def tx(conn):
            dialect_of(conn).tune(conn, work_mem="256MB")
            ctx = self._context(conn)
            query = cond.compile_query(seg["conditions"], ctx)
            report("evaluating", 0, 3)
            tmp = _temp_ids(conn)
            try:
                # Row counts of INSERT ... SELECT are not reliable across drivers: count instead.
                conn.execute(insert(tmp).from_select(["member_id"], query))
                dialect_of(conn).analyze(conn, tmp.name)
                report("writing", 1, 3)
                ids = BitMap(conn.execute(select(tmp.c.member_id)).scalars())
                if seg["type"] == "updatable":
                    sm = segment_members
                    before = conn.execute(select(func.count()).where(sm.c.segment_id == sid)).scalar_one()
                    removed = conn.execute(delete(sm).where(
                        sm.c.segment_id == sid,
                        ~exists().where(tmp.c.member_id == sm.c.member_id))).rowcount
                    conn.execute(insert(sm).from_select(
                        ["segment_id", "member_id"],
                        select(literal(sid), tmp.c.member_id).where(~exists().where(
                            sm.c.segment_id == sid, sm.c.member_id == tmp.c.member_id))))
                    added = len(ids) - (before - removed)     # now = kept + added, kept = before - removed
                else:   # dynamic: the difference from the previous snapshot, with bitmap arithmetic
                    prev = self._stored_bitmap(conn, sid)
                    added, removed = len(ids - prev), len(prev - ids)
            finally:
                tmp.drop(conn)
            report("publishing", 2, 3)
            now = self.clock()
            self._store_bitmap(conn, sid, "segment", ids)
            duration = int((time.perf_counter() - t0) * 1000)
            conn.execute(update(segments).where(segments.c.id == sid).values(
                member_count=len(ids), calculated_at=now, next_run_at=self._next_run(seg["schedule"], now)))
            conn.execute(update(segment_runs).where(segment_runs.c.id == run_id).values(
                status="done", phase="", finished_at=now, duration_ms=duration, member_count=len(ids),
                added=added, removed=removed))
            if source != "schedule":        # the periodic job's runs are nobody's change
                audit.record(conn, "RecalculateSegment", f"segment:{sid} run:{run_id}", now)
            return {"id": run_id, "segment_id": sid, "source": source, "status": "done", "started_at": started,
                    "finished_at": now, "duration_ms": duration, "member_count": len(ids), "added": added,
                    "removed": removed}
        try:
            result = self.db.run_write(tx)
        except Exception as exc:
            reason = exc.message if hasattr(exc, "message") else type(exc).__name__
            self.db.run_write(lambda conn: conn.execute(update(segment_runs).where(segment_runs.c.id == run_id)
                                                        .values(status="failed", finished_at=self.clock(),
                                                                error=reason[:1000])))
            raise
        report("done", 3, 3)
        self._announce()
        return result

    def run_due(self, now: dt.datetime | None = None, *, progress: Progress | None = None) -> list[dict]:
        """Recalculate every updatable segment whose cron schedule is due (``next_run_at <= now``)."""
        now = now or self.clock()
        with self.db.read() as conn:
            due = conn.execute(select(segments.c.id).where(
                segments.c.type == "updatable", segments.c.next_run_at.is_not(None),
                segments.c.next_run_at <= now).order_by(segments.c.next_run_at)).scalars().all()
        return [self.recalculate(sid, source="schedule", progress=progress) for sid in due]

    def count(self, target: str) -> int:
        """The live count: stored segments read their membership, dynamic segments and audiences are
        evaluated now (one query)."""
        with self.db.read() as conn:
            where, src = self._predicate(conn, target)
            return conn.execute(select(func.count()).select_from(src).where(where)).scalar_one()

    def preview(self, target: str, columns: Iterable[str] | None = None, limit: int = 20) -> list[dict]:
        """The first ``limit`` members (by id) with the chosen columns (``PREVIEW_COLUMNS``)."""
        cols = self._columns(columns)
        if not 1 <= limit <= 10000:
            raise InvalidArgument("limit", "from 1 to 10000")
        with self.db.read() as conn:
            where, src = self._predicate(conn, target)
            rows = conn.execute(select(*[PREVIEW_COLUMNS[c].label(c) for c in cols]).select_from(src)
                                .where(where).order_by(members.c.id).limit(limit)).all()
        return [dict(zip(cols, r)) for r in rows]

    def export_csv(self, target: str, out, columns: Iterable[str] | None = None, *,
                   progress: Progress | None = None) -> int:
        """Write the members as CSV (header row, then one row per member by id) to the text stream ``out``,
        streaming from the database; returns the number of members written."""
        n = 0
        for text, rows in self.export_chunks(target, columns, progress=progress):
            out.write(text)
            n += rows
        return n

    def export_chunks(self, target: str, columns: Iterable[str] | None = None, *,
                      progress: Progress | None = None) -> Iterator[tuple[str, int]]:
        """The members' CSV as it is read from the database: ``(text, members in it)`` per chunk of whole
        rows, the header row in the first (alone when there are no members). The target and columns are
        checked before the first chunk, so a bad request fails before anything is sent."""
        cols = self._columns(columns)
        with self.db.read() as conn:
            where, src = self._predicate(conn, target)
            total = conn.execute(select(func.count()).select_from(src).where(where)).scalar_one() \
                if progress else 0
            result = conn.execution_options(stream_results=True, yield_per=_CHUNK).execute(
                select(*[PREVIEW_COLUMNS[c].label(c) for c in cols]).select_from(src).where(where)
                .order_by(members.c.id))
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(cols)
            n = 0
            for part in result.partitions(_CHUNK):
                writer.writerows(["" if v is None else (v.isoformat() if hasattr(v, "isoformat") else v)
                                  for v in row] for row in part)
                n += len(part)
                if progress:
                    progress("exporting", n, total)
                yield buffer.getvalue(), len(part)
                buffer.seek(0)
                buffer.truncate()
            if n == 0:
                yield buffer.getvalue(), 0

    def history(self, sid: str, limit: int = 50, before: int | None = None) -> list[dict]:
        """Recalculation runs, newest first (a ``running`` one carries its phase: the progress); with
        ``before``, those older than that run id (the next page)."""
        return self._log(segment_runs, sid, limit, before)

    def changes(self, sid: str, limit: int = 100, before: int | None = None) -> list[dict]:
        """The manual-change log of a static segment, newest first; with ``before``, the entries older than
        that id (the next page)."""
        return self._log(segment_changes, sid, limit, before)

    def _log(self, table, sid: str, limit: int, before: int | None) -> list[dict]:
        _check_limit(limit)
        self.get(sid)
        query = select(table).where(table.c.segment_id == sid)
        if before is not None:
            query = query.where(table.c.id < before)
        with self.db.read() as conn:
            return [dict(r._mapping) for r in conn.execute(query.order_by(table.c.id.desc()).limit(limit))]

    def members_of(self, target: str) -> BitMap:
        """The member ids of a segment or audience now, as a bitmap (one query)."""
        with self.db.read() as conn:
            where, src = self._predicate(conn, target)
            return BitMap(conn.execute(select(members.c.id).select_from(src).where(where)).scalars())

    # ---- static membership ----------------------------------------------------------------------------------

    def add_members(self, sid: str, refs: Iterable[str], *, source: str = "api", actor: str = "") -> dict:
        """Add members (``card``, ``+phone`` or ``id:N``) to a static segment; logged per member."""
        return self._change(sid, list(refs), "add", source, actor, path="members")

    def remove_members(self, sid: str, refs: Iterable[str], *, source: str = "api", actor: str = "") -> dict:
        return self._change(sid, list(refs), "remove", source, actor, path="members")

    def import_csv(self, sid: str, text: str, *, source: str = "csv", actor: str = "",
                   remove: bool = False) -> dict:
        """A CSV with a header naming one of ``member_id``, ``card``, ``phone``: those members are added (or,
        with ``remove``, removed); unknown references are counted and listed (first 20)."""
        reader = csv.reader(io.StringIO(text))
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise InvalidArgument("csv", "empty file: expected a header with member_id, card or phone") from None
        col = next((c for c in ("member_id", "card", "phone") if c in header), None)
        if col is None:
            raise InvalidArgument("csv", f"the header {header!r} has none of member_id, card, phone")
        i = header.index(col)
        refs = []
        for line_no, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if i >= len(row):
                raise InvalidArgument(f"csv.line[{line_no}]", f"no {col} column")
            value = row[i].strip()
            refs.append(f"id:{value}" if col == "member_id" else
                        (value if col == "card" else ("+" + value.lstrip("+"))))
        return self._change(sid, refs, "remove" if remove else "add", source, actor, path="csv")

    def _change(self, sid, refs, action, source, actor, *, path) -> dict:
        seg = self.get(sid)
        if seg["kind"] != "segment" or seg["type"] != "static":
            raise FailedPrecondition(f"{sid!r} is not a static segment: only static segments are changed by "
                                     f"hand (an updatable one would lose the change at its next recalculation)")
        if source not in CHANGE_SOURCES:
            raise InvalidArgument("source", f"expected one of {', '.join(CHANGE_SOURCES)}")
        now = self.clock()

        def tx(conn):
            ids, unknown = self._resolve(conn, refs, path)
            tmp = _temp_ids(conn)
            try:
                for k in range(0, len(ids), _CHUNK):
                    conn.execute(insert(tmp), [{"member_id": m} for m in ids[k:k + _CHUNK]])
                sm = segment_members
                present = exists().where(sm.c.segment_id == sid, sm.c.member_id == tmp.c.member_id)
                chosen = select(tmp.c.member_id).distinct().where(present if action == "remove" else ~present)
                picked = chosen.subquery()
                log_cols = select(literal(sid), picked.c.member_id, literal(action), literal(source),
                                  literal(actor[:100]), literal(now, segment_changes.c.at.type)
                                  ).order_by(picked.c.member_id)
                changed = conn.execute(select(func.count()).select_from(chosen.subquery())).scalar_one()
                conn.execute(insert(segment_changes).from_select(
                    ["segment_id", "member_id", "action", "source", "actor", "at"], log_cols))
                if action == "add":
                    conn.execute(insert(sm).from_select(
                        ["segment_id", "member_id"],
                        select(literal(sid), tmp.c.member_id).distinct().where(~present)))
                else:
                    conn.execute(delete(sm).where(sm.c.segment_id == sid, sm.c.member_id.in_(
                        select(tmp.c.member_id))))
            finally:
                tmp.drop(conn)
            bitmap = BitMap(conn.execute(select(sm.c.member_id).where(sm.c.segment_id == sid)).scalars())
            self._store_bitmap(conn, sid, "segment", bitmap)
            conn.execute(update(segments).where(segments.c.id == sid).values(member_count=len(bitmap),
                                                                              calculated_at=now))
            audit.record(conn, "RemoveMembers" if action == "remove" else "AddMembers", f"segment:{sid}", now)
            return {"changed": changed, "unchanged": len(set(ids)) - changed, "unknown": len(unknown),
                    "unknown_refs": unknown[:20], "member_count": len(bitmap)}
        result = self.db.run_write(tx)
        self._announce()
        return result

    def _resolve(self, conn, refs: list[str], path: str) -> tuple[list[int], list[str]]:
        """Member ids for references ``id:N``, ``+phone`` or a card number (set-based, in chunks)."""
        by_id, by_phone, by_card = {}, {}, {}
        for i, ref in enumerate(refs):
            if not isinstance(ref, str) or not ref.strip():
                raise InvalidArgument(f"{path}[{i}]", "an empty member reference")
            ref = ref.strip()
            if ref.startswith("id:"):
                try:
                    by_id[int(ref[3:])] = ref
                except ValueError:
                    raise InvalidArgument(f"{path}[{i}]", f"not a member id: {ref!r}") from None
            elif ref.startswith("+"):
                by_phone[ref] = ref
            else:
                by_card[ref] = ref
        found: dict[str, int] = {}
        for keys, stmt in ((list(by_id), lambda ch: select(members.c.id, members.c.id).where(members.c.id.in_(ch))),
                           (list(by_phone), lambda ch: select(members.c.phone, members.c.id)
                            .where(members.c.phone.in_(ch))),
                           (list(by_card), lambda ch: select(cards.c.number, cards.c.member_id)
                            .where(cards.c.number.in_(ch)))):
            for k in range(0, len(keys), 1000):
                for key, mid in conn.execute(stmt(keys[k:k + 1000])):
                    found[by_id.get(key) if isinstance(key, int) else key] = mid
        ids = [found[r.strip()] for r in refs if r.strip() in found]
        unknown = [r for r in refs if r.strip() not in found]
        return ids, unknown

    # ---- tags -------------------------------------------------------------------------------------------------

    def set_tag(self, target: str, tag: str, *, external: bool = True, replace: bool = False) -> dict:
        """Label every member of ``target`` (a segment or audience, evaluated now) with ``tag``; with
        ``replace`` the tag is first taken off everybody else. With ``external`` the tag is passed to the
        loyalty side as an external audience: promotions may name it in ``audience.include / exclude``."""
        tag = _id(tag, "tag")
        now = self.clock()
        with self.db.read() as conn:
            if conn.execute(select(segments.c.id).where(segments.c.id == tag)).first() or conn.execute(
                    select(audiences.c.id).where(audiences.c.id == tag)).first():
                raise InvalidArgument("tag", f"{tag!r} is already a segment or audience id; choose another tag")

        def tx(conn):
            where, src = self._predicate(conn, target)
            tmp = _temp_ids(conn)
            try:
                conn.execute(insert(tmp).from_select(["member_id"], select(members.c.id).select_from(src)
                                                     .where(where)))
                mt = member_tags
                removed = 0
                if replace:
                    removed = conn.execute(delete(mt).where(mt.c.tag == tag, ~exists().where(
                        tmp.c.member_id == mt.c.member_id))).rowcount
                fresh = select(tmp.c.member_id, literal(tag), literal(now, mt.c.created_at.type)).distinct().where(
                    ~exists().where(mt.c.tag == tag, mt.c.member_id == tmp.c.member_id))
                added = conn.execute(select(func.count()).select_from(fresh.subquery())).scalar_one()
                conn.execute(insert(mt).from_select(["member_id", "tag", "created_at"], fresh))
            finally:
                tmp.drop(conn)
            bitmap = BitMap(conn.execute(select(member_tags.c.member_id).where(member_tags.c.tag == tag)).scalars())
            if external:
                self._store_bitmap(conn, tag, "tag", bitmap)
            audit.record(conn, "SetTag", f"tag:{tag} of:{target}", now)
            return {"tag": tag, "tagged": added, "untagged": removed, "member_count": len(bitmap),
                    "external": external}
        result = self.db.run_write(tx)
        self._announce()
        return result

    # ---- one member -------------------------------------------------------------------------------------------

    def dynamic_segments_of(self, conn, member_id: int, ids: Iterable[str] | None = None) -> set[str]:
        """The dynamic segments one member is in, evaluated now in one query narrowed to that member."""
        rows = conn.execute(select(segments.c.id, segments.c.conditions).where(segments.c.type == "dynamic",
                                                                                  segments.c.conditions.is_not(None)))
        defs = {r.id: r.conditions for r in rows if ids is None or r.id in ids}
        if not defs:
            return set()
        ctx = self._context(conn, only_member=member_id)
        from sqlalchemy import case
        cols = []
        compiler = cond._Compiler(ctx)
        for sid, tree in defs.items():
            cols.append(case((compiler.node(tree), 1), else_=0).label(f"s{len(cols)}"))
        row = conn.execute(select(*cols).select_from(compiler.from_clause()).where(members.c.id == member_id)).first()
        if row is None:
            return set()
        return {sid for sid, hit in zip(defs, row) if hit}

    # ---- internals ----------------------------------------------------------------------------------------

    def _as_of(self) -> dt.date:
        return self.clock().astimezone(dt.timezone.utc).date()

    def _groups(self, conn) -> dict[str, frozenset[str]]:
        """The published program's product groups, name -> skus (cached per version)."""
        version = conn.execute(select(func.max(program_versions.c.version))).scalar()
        if version is None:
            return {}
        if self._groups_cache[0] == version:
            return self._groups_cache[1]
        text = conn.execute(select(program_versions.c.yaml).where(program_versions.c.version == version)).scalar()
        try:
            program = load_program_text(text)
            groups = {g.name: frozenset(g.skus) for g in program.product_groups}
        except ProgramError:  # pragma: no cover - published programs were validated
            groups = {}
        self._groups_cache = (version, groups)
        return groups

    @staticmethod
    def _lookup(conn, extra: dict | None = None):
        """id -> (type, conditions) of other segments; ``extra`` (definitions being written) wins."""
        extra = extra or {}

        def lookup(sid):
            if sid in extra:
                stype, tree = extra[sid]
                return (stype if stype in SEGMENT_TYPES else "static", tree)
            row = conn.execute(select(segments.c.type, segments.c.conditions).where(segments.c.id == sid)).first()
            return (row.type, row.conditions) if row is not None else None
        return lookup

    def _context(self, conn, only_member: int | None = None) -> cond.CompileContext:
        return cond.CompileContext(self._as_of(), self._groups(conn), self._lookup(conn), only_member)

    # ---- what other modules do in their own transactions (the scenario engine, batch actions) ------------------

    def predicate(self, conn, target: str):
        """``(where, from)`` over ``members`` selecting a segment's, an audience's or an external tag's members
        (``select(members.c.id).select_from(src).where(where)``)."""
        return self._predicate(conn, target)

    def add_to_static(self, conn, sid: str, member_id: int, *, source: str, actor: str, now) -> bool:
        """Add one member to the static segment ``sid`` in the caller's transaction (its change log, count and
        bitmap with it); False when the member was in it already. ``InvalidArgument`` when ``sid`` is no
        static segment. Insert-or-ignore: a concurrent import adding the same member does not fail it."""
        stype = conn.execute(select(segments.c.type).where(segments.c.id == sid)).scalar()
        if stype != "static":
            raise InvalidArgument("segment", f"segment {sid!r} {'does not exist' if stype is None else 'is not static'}"
                                             f": members are added to static segments only")
        sm = segment_members.c
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT DO NOTHING through SQLAlchemy
        added = conn.execute(insert_ignore(conn, segment_members).values(segment_id=sid, member_id=member_id)
                             .returning(sm.member_id)).first()
        if added is None:
            return False
        conn.execute(insert(segment_changes).values(segment_id=sid, member_id=member_id, action="add", source=source,
                                                    actor=actor[:100], at=now))
        count = conn.execute(select(func.count()).where(sm.segment_id == sid)).scalar_one()
        conn.execute(update(segments).where(segments.c.id == sid).values(member_count=count))
        data = conn.execute(select(audience_bitmaps.c.bitmap).where(audience_bitmaps.c.audience_id == sid)).scalar()
        bitmap = BitMap.deserialize(data) if data else BitMap()
        bitmap.add(member_id)
        self._store_bitmap(conn, sid, "segment", bitmap)
        return True

    def contains(self, conn, target: str, member_id: int) -> bool:
        """Whether the member is in the segment or audience ``target`` as stored (a static segment's rows, else
        its stored bitmap), in the caller's transaction."""
        sm = segment_members.c
        if conn.execute(select(exists().where(sm.segment_id == target, sm.member_id == member_id))).scalar():
            return True
        return member_id in self._stored_bitmap(conn, target)

    @staticmethod
    def has_tag(conn, member_id: int, tag: str) -> bool:
        """Whether the member carries ``tag``."""
        return conn.execute(select(exists().where(member_tags.c.member_id == member_id,
                                                  member_tags.c.tag == tag))).scalar()

    def tag_member(self, conn, tag: str, member_id: int, *, now: dt.datetime) -> None:
        """Tag a member in the caller's transaction (once: tagging again changes nothing), and put it into the
        tag's audience (``SetTag``'s bitmap) when that tag is served as an audience."""
        conn.execute(insert_ignore(conn, member_tags).values(member_id=member_id, tag=tag, created_at=now))
        external = conn.execute(select(audience_bitmaps.c.bitmap).where(
            audience_bitmaps.c.audience_id == tag, audience_bitmaps.c.kind == "tag")).first()
        if external is None:
            return
        bitmap = BitMap.deserialize(external.bitmap) if external.bitmap else BitMap()
        if member_id not in bitmap:
            bitmap.add(member_id)
            self._store_bitmap(conn, tag, "tag", bitmap)

    def _predicate(self, conn, target: str):
        """(where, from) over ``members`` for a segment, an audience or an external tag."""
        row = conn.execute(select(segments.c.type, segments.c.conditions).where(segments.c.id == target)).first()
        if row is not None:
            tree = row.conditions if row.type == "dynamic" else {"segment": target}
        else:
            aud = conn.execute(select(audiences).where(audiences.c.id == target)).first()
            if aud is not None:
                tree = {"all": [{"segment": s} for s in aud.include] + [{"not": {"segment": s}} for s in aud.exclude]}
            elif conn.execute(select(audience_bitmaps.c.kind).where(audience_bitmaps.c.audience_id == target,
                                                                    audience_bitmaps.c.kind == "tag")).first():
                tree = {"tag": {"eq": target}}
            else:
                raise NotFound(f"no segment, audience or external tag {target!r}")
        return cond.compile_predicate(tree, self._context(conn))

    @staticmethod
    def _columns(columns) -> list[str]:
        cols = list(columns) if columns else list(DEFAULT_COLUMNS)
        for i, c in enumerate(cols):
            if c not in PREVIEW_COLUMNS:
                raise InvalidArgument(f"columns[{i}]", f"unknown column {c!r}; expected some of "
                                                       f"{', '.join(PREVIEW_COLUMNS)}")
        return cols

    @staticmethod
    def _next_run(schedule: str | None, now: dt.datetime) -> dt.datetime | None:
        if not schedule:
            return None
        from croniter import croniter
        return croniter(schedule, now).get_next(dt.datetime)

    @staticmethod
    def _stored_bitmap(conn, audience_id: str) -> BitMap:
        data = conn.execute(select(audience_bitmaps.c.bitmap).where(audience_bitmaps.c.audience_id == audience_id)
                            ).scalar()
        return BitMap.deserialize(data) if data else BitMap()

    def _bump(self, conn) -> int:
        return bump_membership_version(conn, self.clock())

    def _store_bitmap(self, conn, audience_id: str, kind: str, bitmap: BitMap) -> None:
        bitmap.run_optimize()
        version = self._bump(conn)
        values = {"kind": kind, "bitmap": bitmap.serialize(), "member_count": len(bitmap), "version": version,
                  "updated_at": self.clock()}
        if not conn.execute(update(audience_bitmaps).where(audience_bitmaps.c.audience_id == audience_id)
                            .values(**values)).rowcount:
            conn.execute(insert(audience_bitmaps).values(audience_id=audience_id, **values))

    def _announce(self) -> None:
        if self._redis is None:
            return
        try:
            self._redis.publish(CHANNEL, "changed")
        except Exception as exc:  # noqa: BLE001 - the others still find it by their version check
            log.warning("could not announce a membership change on Redis: %s", exc)


def stored_membership(conn, audience_id: str) -> tuple[int, BitMap]:
    """The stored membership of a segment or audience and its version (0 and an empty bitmap when none is
    stored yet): what a watcher compares with the one it saw last (the scenarios' ``segment_entered``)."""
    row = conn.execute(select(audience_bitmaps.c.version, audience_bitmaps.c.bitmap)
                       .where(audience_bitmaps.c.audience_id == audience_id)).first()
    if row is None:
        return 0, BitMap()
    return row.version, BitMap.deserialize(row.bitmap) if row.bitmap else BitMap()
