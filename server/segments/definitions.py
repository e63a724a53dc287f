"""Segment and audience definitions, as the program file, the Admin API and the CLI give them: each is
validated with field paths before anything is written (conditions, type changes, schedules, references to
other segments in dependency order), then written with its audit record and a membership-version bump.
A part of ``SegmentService`` (``service``), which holds the storage, the clock and the bitmaps it uses."""
from __future__ import annotations

from sqlalchemy import delete, insert, select, update

from loyalty.server.errors import InvalidArgument, NotFound
from loyalty.server.security import audit

from . import conditions as cond
from .common import _id
from .compiler import CompileContext, compile_query
from .models import SEGMENT_TYPES, audience_bitmaps, audiences, segment_members, segments

__all__ = ["Definitions"]

SEGMENT_KEYS = ("id", "title", "type", "conditions", "schedule")
AUDIENCE_KEYS = ("id", "title", "include", "exclude")


class Definitions:
    """Defining, redefining and deleting segments and audiences (``SegmentService``'s part)."""

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
                compile_query(tree, CompileContext(self._as_of(), groups, lookup))  # cycles
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
