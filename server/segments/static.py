"""Static segments' membership, changed by hand (Admin API, CLI, CSV import) or by a scenario step: member
references resolved set-based, each change logged per member, the count and the bitmap rewritten in the same
transaction. A part of ``SegmentService`` (``service``), which holds the storage, the clock and the bitmaps it
uses."""
from __future__ import annotations

import csv
import io
from typing import Iterable

from pyroaring import BitMap
from sqlalchemy import delete, exists, func, insert, literal, select, update

from loyalty.server.dialects import insert_ignore
from loyalty.server.errors import FailedPrecondition, InvalidArgument
from loyalty.server.members import ERASED_PREFIX
from loyalty.server.models import cards, members
from loyalty.server.security import audit

from .common import _CHUNK, _temp_ids
from .models import audience_bitmaps, segment_changes, segment_members, segments

__all__ = ["StaticMembership"]

CHANGE_SOURCES = ("api", "cli", "csv", "scenario")


class StaticMembership:
    """Adding and removing members of static segments (``SegmentService``'s part)."""

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
            elif not ref.lower().startswith(ERASED_PREFIX):        # an erased card's marker names no one
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
