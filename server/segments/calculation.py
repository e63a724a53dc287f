"""How a segment's members are found: the compile context (evaluation day, product groups, other segments),
the ``(where, from)`` predicate of a segment, audience or external tag, a recalculation run (set-based through
a temporary table, its added and removed counts, its stored bitmap) and the dynamic segments of one member.
A part of ``SegmentService`` (``service``), which holds the storage, the clock and the bitmaps it uses."""
from __future__ import annotations

import datetime as dt
import time
from typing import Iterable

from pyroaring import BitMap
from sqlalchemy import delete, exists, func, insert, literal, select, update

from loyalty.core import ProgramError, load_program_text
from loyalty.server.dialects import dialect_of
from loyalty.server.errors import FailedPrecondition, InvalidArgument, NotFound
from loyalty.server.models import members, program_versions
from loyalty.server.security import audit

from .common import Progress, _temp_ids
from .compiler import CompileContext, _Compiler, compile_predicate, compile_query
from .models import SEGMENT_TYPES, audience_bitmaps, audiences, segment_members, segment_runs, segments

__all__ = ["Calculation"]

RUN_SOURCES = ("schedule", "api", "cli", "program")


class Calculation:
    """Predicates, recalculation runs and one member's dynamic segments (``SegmentService``'s part)."""

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
            query = compile_query(seg["conditions"], ctx)
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
        compiler = _Compiler(ctx)
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

    def _context(self, conn, only_member: int | None = None) -> CompileContext:
        return CompileContext(self._as_of(), self._groups(conn), self._lookup(conn), only_member)

    def predicate(self, conn, target: str):
        """``(where, from)`` over ``members`` selecting a segment's, an audience's or an external tag's members
        (``select(members.c.id).select_from(src).where(where)``)."""
        return self._predicate(conn, target)

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
        return compile_predicate(tree, self._context(conn))
