"""Tags on members: a segment's or audience's members labelled at once (optionally served to the loyalty
side as an external audience, with its bitmap), or one member tagged in the caller's transaction (a scenario
step). A part of ``SegmentService`` (``service``), which holds the storage, the clock and the bitmaps it
uses."""
from __future__ import annotations

import datetime as dt

from pyroaring import BitMap
from sqlalchemy import delete, exists, func, insert, literal, select

from loyalty.server.dialects import insert_ignore
from loyalty.server.errors import InvalidArgument
from loyalty.server.models import members
from loyalty.server.security import audit

from .common import _id, _temp_ids
from .models import audience_bitmaps, audiences, member_tags, segments

__all__ = ["Tags"]


class Tags:
    """Tagging members (``SegmentService``'s part)."""

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
