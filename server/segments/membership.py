"""What the receipt core sees of segments: a per-process ``AudienceIndex`` of roaring bitmaps.

``audiences_of(member_id)`` returns the audience ids a member belongs to, as the program's promotions name
them in ``audience.include / exclude``: every stored segment (static, updatable, and the last snapshot of a
dynamic one), every audience (in ALL its included segments and NONE of its excluded ones, worked out from
the member's segments) and every external tag. Each check is one bitmap lookup, so the cost does not depend
on the number of members (the benchmark times it at 1k and 1M).

Freshness: every bitmap write bumps ``membership_version`` in the same transaction. ``audiences_of`` and
``checked_version`` look at that version at most every ``POLL_INTERVAL`` seconds (one primary-key read, done
by one thread while the others keep serving the bitmaps they hold) and reload only the bitmaps whose version
changed; with Redis, a message on ``loyalty:membership`` makes the listener reload at once. A recalculation
therefore reaches every process within about a second, without a restart.

The version is also what the processing service's cached member contexts are stamped with (with the program
version): a context built at another membership version is not used. Writes that change what a cached context
holds in other processes (a card status, the periodic job's tiers and lots) bump the version too
(``bump_membership_version``) and ``announce`` it, so they reach every till within the same bound. A program
registry switching to a new version first calls ``catch_up`` with the membership version its publication
announced, so a promotion never reaches a till before the memberships it names.

Dynamic segments can also be evaluated live for one member at calculation time:
``audiences_of(member_id, conn=conn)`` (one query narrowed to that member) replaces their snapshots.
"""
from __future__ import annotations

import logging
import threading
import time

from pyroaring import BitMap
from sqlalchemy import select

from loyalty.server.db import Database

from .models import audience_bitmaps, audiences, membership_version, segments
from loyalty.server.fanout import RedisListener

from .service import CHANNEL, SegmentService

__all__ = ["AudienceIndex", "POLL_INTERVAL"]

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5


class _State:
    __slots__ = ("version", "bitmaps", "versions", "audiences", "dynamic")

    def __init__(self, version=-1, bitmaps=None, versions=None, audiences=None, dynamic=frozenset()):
        self.version = version
        self.bitmaps: dict[str, BitMap] = bitmaps or {}        # segment and tag ids -> members
        self.versions: dict[str, int] = versions or {}
        self.audiences: tuple = audiences or ()                 # (id, include tuple, exclude tuple)
        self.dynamic: frozenset[str] = dynamic


class AudienceIndex:
    """Thread-safe; one per process. ``AudienceIndex(database_or_url, redis_url=None)``."""

    def __init__(self, database: Database | str, *, redis_url: str | None = None,
                 poll_interval: float = POLL_INTERVAL):
        self.db = Database(database) if isinstance(database, str) else database
        self.poll_interval = poll_interval
        self._state = _State()
        self._checked_at = 0.0
        self._lock = threading.Lock()
        self._listener: RedisListener | None = None
        self._segments = SegmentService(self.db)
        if redis_url:
            self._start_listener(redis_url)

    # ---- the hot path -------------------------------------------------------------------------------------

    def checked_version(self) -> int:
        """The membership version served, checked against storage at most every ``poll_interval`` seconds (by
        one thread; the others go on with what is held). What a cached member context is stamped with."""
        if time.monotonic() - self._checked_at >= self.poll_interval:
            self.refresh(blocking=self._state.version < 0)
        return self._state.version

    def audiences_of(self, member_id: int, conn=None) -> frozenset[str]:
        """Audience ids of ``member_id``. With ``conn`` (an open connection), dynamic segments are evaluated
        for this member now instead of from their last snapshot."""
        self.checked_version()
        state = self._state
        ids = {aid for aid, bm in state.bitmaps.items() if member_id in bm}
        if conn is not None and state.dynamic:
            ids -= state.dynamic
            ids |= self._segments.dynamic_segments_of(conn, member_id, state.dynamic)
        for aid, include, exclude in state.audiences:
            if all(s in ids for s in include) and not any(s in ids for s in exclude):
                ids.add(aid)
        return frozenset(ids)

    # ---- loading ------------------------------------------------------------------------------------------

    def refresh(self, *, blocking: bool = True) -> bool:
        """Reload what changed if the membership version moved; True when something was reloaded."""
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            with self.db.read() as conn:
                version = conn.execute(select(membership_version.c.version)
                                       .where(membership_version.c.id == 1)).scalar() or 0
                old = self._state
                if version == old.version:
                    self._checked_at = time.monotonic()
                    return False
                listing = dict(conn.execute(select(audience_bitmaps.c.audience_id, audience_bitmaps.c.version)).all())
                stale = [aid for aid, v in listing.items() if old.versions.get(aid) != v]
                bitmaps = {aid: bm for aid, bm in old.bitmaps.items() if aid in listing and aid not in stale}
                for k in range(0, len(stale), 200):
                    for aid, data in conn.execute(select(audience_bitmaps.c.audience_id, audience_bitmaps.c.bitmap)
                                                  .where(audience_bitmaps.c.audience_id.in_(stale[k:k + 200]))):
                        bitmaps[aid] = BitMap.deserialize(data)
                auds = tuple((r.id, tuple(r.include), tuple(r.exclude)) for r in conn.execute(select(audiences)))
                dynamic = frozenset(conn.execute(select(segments.c.id).where(segments.c.type == "dynamic"))
                                    .scalars())
            self._state = _State(version, bitmaps, listing, auds, dynamic)
            self._checked_at = time.monotonic()
            # A version moved by a card status or the periodic job reloads nothing: not worth a line each.
            log.log(logging.INFO if stale or auds != old.audiences else logging.DEBUG,
                    "audience index at membership version %s (%d bitmaps, %d reloaded)", version, len(bitmaps),
                    len(stale))
            return True
        finally:
            self._lock.release()

    def catch_up(self, version: int | None = None) -> int:
        """Hold at least membership ``version`` (None: whatever storage has now), reloading and waiting for a
        reload in progress if need be; returns the version held. Called before a new program version is
        served, so that its promotions find the memberships they name."""
        if version is None or self._state.version < version:
            self.refresh(blocking=True)
        return self._state.version

    @property
    def version(self) -> int:
        """The membership version held, without looking at storage (for callers that must not wait)."""
        return self._state.version

    # ---- Redis --------------------------------------------------------------------------------------------

    def _start_listener(self, redis_url: str) -> None:
        def changed(_text: str):
            self._checked_at = 0.0       # the next call (or this thread) reloads
            self.refresh(blocking=True)

        self._listener = RedisListener(redis_url, CHANNEL, name="membership-listener", on_message=changed,
                                       on_connect=lambda: setattr(self, "_checked_at", 0.0))

    def announce(self) -> None:
        """Tell every process that the membership version moved (after the commit that moved it); without
        Redis, they find it by polling."""
        if self._listener is not None:
            self._listener.publish("changed")

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
