"""Published programs: immutable versions in ``program_versions`` and, per process, the current one compiled.

``ProgramRegistry.current()`` returns one immutable ``Snapshot`` (version, program, engine). Switching to a new
version swaps that single reference, so a request holds a whole program from start to end and never sees half
of one. A new version reaches every process within a second: with Redis, a message on ``CHANNEL`` wakes a
listener thread at once (a slower version check stays on as a safety net); without Redis, ``current()``
asks the database for the highest version at most every ``POLL_INTERVAL`` seconds (one indexed query).

A version and the audience memberships its promotions name reach a process together: before a new snapshot
is served, the registry's ``memberships`` callable (the process's ``AudienceIndex.catch_up``) loads the
memberships committed before it, those the publication's message names (``"<version> <membership version>"``)
or, when polling, whatever storage holds by then (the memberships were committed before the version was).
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from loyalty.core import Engine, ProgramError, load_program_text
from loyalty.core.model import Program

from .db import Database
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .fanout import RedisListener
from .models import program_versions
from .timeutil import utcnow

__all__ = ["ProgramRegistry", "Snapshot", "CHANNEL", "POLL_INTERVAL"]

log = logging.getLogger(__name__)

CHANNEL = "loyalty:program"
POLL_INTERVAL = 0.5           # seconds between version checks without Redis
REDIS_POLL_INTERVAL = 5.0     # the safety net when Redis announces publications


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    program: Program
    engine: Engine
    checksum: str


class ProgramRegistry:
    """One per process. ``memberships``: None, or ``catch_up(membership_version | None) -> int`` called
    before a new version is served (the processing service sets it to its ``AudienceIndex.catch_up``)."""

    def __init__(self, database: Database, *, redis_url: str | None = None, clock=None, memberships=None):
        self.db = database
        self.clock = clock or utcnow
        self.memberships = memberships
        self._snapshot: Snapshot | None = None
        self._checked_at = 0.0
        self._check_lock = threading.Lock()
        self._interval = POLL_INTERVAL
        self._listener: RedisListener | None = None
        if redis_url:
            self._start_listener(redis_url)

    # ---- reading ------------------------------------------------------------------------------------------

    def current(self) -> Snapshot:
        """The snapshot to serve a request with; ``FailedPrecondition`` when nothing is published."""
        if time.monotonic() - self._checked_at >= self._interval:
            self.refresh(blocking=self._snapshot is None)
        snap = self._snapshot
        if snap is None:
            raise FailedPrecondition("no loyalty program is published yet: run `loyalty program publish FILE`")
        return snap

    def refresh(self, *, blocking: bool = True, membership: int | None = None) -> None:
        """Load the highest version if it is not the one held, and the memberships before it is served
        (at least ``membership``, the version a publication's message named). Only one thread checks at a
        time; the others (``blocking=False``) keep serving the snapshot they have."""
        if not self._check_lock.acquire(blocking=blocking):
            return
        try:
            row = None
            with self.db.read() as conn:
                latest = conn.execute(select(func.max(program_versions.c.version))).scalar()
                held = self._snapshot.version if self._snapshot else None
                if latest is not None and latest != held:
                    row = conn.execute(select(program_versions.c.version, program_versions.c.yaml,
                                              program_versions.c.checksum)
                                       .where(program_versions.c.version == latest)).one()
            if row is not None:
                snapshot = _compile(row.version, row.yaml, row.checksum)
                self._catch_up(membership)
                self._snapshot = snapshot
                log.info("serving program version %s", row.version)
            self._checked_at = time.monotonic()
        finally:
            self._check_lock.release()

    def _catch_up(self, membership: int | None) -> int | None:
        """The memberships a new version may name, loaded before it is served (read after the version was
        seen, so they include every membership committed before it); the membership version held."""
        return None if self.memberships is None else self.memberships(membership)

    # ---- publishing ---------------------------------------------------------------------------------------

    def publish(self, yaml_text: str, comment: str = "") -> dict:
        """Validate, store as the next version, switch this process and tell the others. Returns the
        stored row as a dict (``version``, ``name``, ``checksum``, ``published_at``, ``comment``)."""
        if not isinstance(yaml_text, str) or not yaml_text.strip():
            raise InvalidArgument("yaml", "the program text is empty")
        try:
            program = load_program_text(yaml_text)
        except ProgramError as exc:
            raise InvalidArgument(exc.path, exc.reason) from None
        checksum = hashlib.sha256(yaml_text.encode("utf-8")).hexdigest()
        for _ in range(5):
            try:
                def write(conn):
                    version = (conn.execute(select(func.max(program_versions.c.version))).scalar() or 0) + 1
                    row = {"version": version, "name": program.name, "yaml": yaml_text, "checksum": checksum,
                           "published_at": self.clock(), "comment": comment or ""}
                    conn.execute(insert(program_versions).values(**row))
                    return row
                row = self.db.run_write(write)
                break
            except IntegrityError:   # two publishers took the same number: take the next one
                continue
        else:  # pragma: no cover
            raise FailedPrecondition("could not allocate a program version; retry")
        snapshot = Snapshot(row["version"], program, Engine(program), checksum)
        membership = self._catch_up(None)
        self._snapshot = snapshot
        self._announce(row["version"], membership)
        return row

    def get(self, version: int = 0) -> dict:
        with self.db.read() as conn:
            if not version:
                version = conn.execute(select(func.max(program_versions.c.version))).scalar()
                if version is None:
                    raise NotFound("no program is published yet")
            row = conn.execute(select(program_versions).where(program_versions.c.version == version)).first()
        if row is None:
            raise NotFound(f"program version {version} does not exist")
        out = dict(row._mapping)
        out["current"] = self._is_current(version)
        return out

    def versions(self) -> list[dict]:
        cols = [c for c in program_versions.c if c.name != "yaml"]
        with self.db.read() as conn:
            rows = conn.execute(select(*cols).order_by(program_versions.c.version.desc())).all()
        latest = rows[0].version if rows else None
        return [dict(r._mapping, yaml="", current=r.version == latest) for r in rows]

    def _is_current(self, version: int) -> bool:
        with self.db.read() as conn:
            return conn.execute(select(func.max(program_versions.c.version))).scalar() == version

    # ---- Redis --------------------------------------------------------------------------------------------

    def _start_listener(self, redis_url: str) -> None:
        def connected():
            self._interval = REDIS_POLL_INTERVAL
            self._checked_at = 0.0       # a publication may have happened while we were not subscribed

        def down(exc):
            log.warning("program listener: %s; polling every %.1fs", exc, POLL_INTERVAL)
            self._interval = POLL_INTERVAL

        def published(text: str):
            self.refresh(blocking=True, membership=_membership_of(text))

        self._listener = RedisListener(redis_url, CHANNEL, name="program-listener", on_message=published,
                                       on_connect=connected, on_down=down)

    def _announce(self, version: int, membership: int | None) -> None:
        """``"<version> <membership version>"``: the receivers load at least those memberships before they
        serve the version (a plain ``"<version>"``, from a publisher without an audience index, works too)."""
        if self._listener is not None:
            self._listener.publish(str(version) if membership is None else f"{version} {membership}")

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()


def _membership_of(text: str) -> int | None:
    parts = text.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _compile(version: int, yaml_text: str, checksum: str) -> Snapshot:
    program = load_program_text(yaml_text)
    return Snapshot(version, program, Engine(program), checksum)
