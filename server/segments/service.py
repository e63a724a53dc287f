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

The service is assembled from its parts, one module each: ``definitions`` (segments and audiences defined
and deleted), ``calculation`` (predicates, recalculation runs, one member's dynamic segments), ``static``
(static membership by hand or by a scenario), ``tags``; conditions are validated in ``conditions``, compiled
in ``compiler``. This module holds what they share (storage, clock, stored bitmaps, the version bump and its
announcement) and the reads: get, list, count, preview, export, run history and change log.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import logging
from typing import Any, Iterable, Iterator

from pyroaring import BitMap
from sqlalchemy import and_, exists, func, insert, select, update

from loyalty.server.db import Database
from loyalty.server.errors import InvalidArgument, NotFound
from loyalty.server.models import balances, cards, members
from loyalty.server.timeutil import utcnow

from .calculation import Calculation
from .common import _CHUNK, Progress
from .definitions import Definitions
from .models import (
    audience_bitmaps, audiences, membership_version, segment_changes, segment_members, segment_runs, segments,
)
from .static import StaticMembership
from .tags import Tags

__all__ = ["SegmentService", "PREVIEW_COLUMNS", "CHANNEL", "Progress", "bump_membership_version",
           "stored_membership"]

log = logging.getLogger(__name__)

CHANNEL = "loyalty:membership"

# column name -> SQL expression, for preview and export ("configurable columns"). The subqueries correlate to
# ``members`` alone: a segment whose conditions join ``balances`` must not make them read the outer row's.
PREVIEW_COLUMNS: dict[str, Any] = {
    "member_id": members.c.id, "phone": members.c.phone, "first_name": members.c.first_name,
    "last_name": members.c.last_name, "gender": members.c.gender, "birth_date": members.c.birth_date,
    "email": members.c.email, "city": members.c.city, "source": members.c.source,
    "registered_at": members.c.registered_at,
    "card": select(cards.c.number).where(cards.c.member_id == members.c.id).order_by(
        (cards.c.status == "active").desc(), cards.c.id.desc()).limit(1).correlate(members).scalar_subquery(),
    **{name: select(column).where(balances.c.member_id == members.c.id).correlate(members).scalar_subquery()
       for name, column in (("tier", balances.c.tier), ("active_points", balances.c.active),
                            ("pending_points", balances.c.pending), ("purchases_sum", balances.c.purchases_sum))},
}
DEFAULT_COLUMNS = ("member_id", "card", "first_name", "last_name", "gender", "city", "tier", "active_points")


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


class SegmentService(Definitions, Calculation, StaticMembership, Tags):
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

    def count(self, target: str) -> int:
        """The live count: stored segments read their membership, dynamic segments and audiences are
        evaluated now (one query)."""
        with self.db.read() as conn:
            where, src = self._predicate(conn, target)
            return conn.execute(select(func.count()).select_from(src).where(where)).scalar_one()

    def preview(self, target: str, columns: Iterable[str] | None = None, limit: int = 20) -> list[dict]:
        """The first ``limit`` members (by id) with the chosen columns (``PREVIEW_COLUMNS``)."""
        if not 1 <= limit <= 10000:
            raise InvalidArgument("limit", "from 1 to 10000")
        return [row for _, row in self.preview_page(target, columns, limit)]

    def preview_page(self, target: str, columns: Iterable[str] | None, size: int,
                     after: int | None = None) -> list[tuple[int, dict]]:
        """At most ``size`` members with ids above ``after`` (None: from the first), by id: each as
        ``(member id, {column: value})`` with the chosen columns (``PREVIEW_COLUMNS``). The id is the page's
        key whether or not ``member_id`` is among the columns."""
        cols = self._columns(columns)
        with self.db.read() as conn:
            where, src = self._predicate(conn, target)
            if after is not None:
                where = and_(where, members.c.id > after)
            rows = conn.execute(select(members.c.id, *[PREVIEW_COLUMNS[c].label(c) for c in cols])
                                .select_from(src).where(where).order_by(members.c.id).limit(size)).all()
        return [(r[0], dict(zip(cols, r[1:]))) for r in rows]

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

    def contains(self, conn, target: str, member_id: int) -> bool:
        """Whether the member is in the segment or audience ``target`` as stored (a static segment's rows, else
        its stored bitmap), in the caller's transaction."""
        sm = segment_members.c
        if conn.execute(select(exists().where(sm.segment_id == target, sm.member_id == member_id))).scalar():
            return True
        return member_id in self._stored_bitmap(conn, target)

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
