"""``loyalty worker``: the process that runs scenarios, delivers the outbox and works through batches.

Any number of workers, on one machine or several, share the one PostgreSQL database; there is no broker.
Why the database and ``SELECT ... FOR UPDATE SKIP LOCKED`` rather than a queue library (Celery, RQ, Dramatiq):

- no extra moving part to deploy, watch and back up: the queue is the table the system of record already
  has, and ``loyalty worker`` needs nothing but the database URL;
- transactional with the ledger: a step's points, its outbox row and the run's advance commit in ONE
  transaction, so "award twice" or "advance without awarding" cannot happen. With a broker the message ack
  and the database commit are two systems, and exactly-once would need an outbox table anyway;
- durable timers for free: a ``wait`` is a ``wake_at`` column, indexed; a broker's delayed delivery is
  often bounded or lost on restart;
- SKIP LOCKED lets each worker take rows nobody holds, without waiting, and a worker that dies simply drops
  its connection: its locks go with it and the rows are due again at once. Deliveries, which happen outside
  a transaction, use a lease instead, renewed while the worker lives (``outbox.py``).

SQLite (the embedded default) has one writer: each claiming transaction is ``BEGIN IMMEDIATE``, so one or
several worker processes on one machine still never take the same run.

One ``tick`` does, in order: apply the scenarios of a newly published program, consume new events into
runs, the daily birthday events, segment-entered detection, due run steps, due deliveries, one chunk of a
running batch. ``run`` repeats ticks, sleeping ``poll_s`` when a tick found nothing to do.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from loyalty.server.db import Database

from . import batch as batches_mod
from . import events as events_mod
from .common import utcnow
from .engine import Runner
from .outbox import LEASE_S, Channels, deliver_due
from .service import ScenarioService

__all__ = ["Worker"]

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, database: Database | str, *, clock=None, channels: Channels | None = None,
                 name: str | None = None, lease_s: float = LEASE_S, run_limit: int = 20, outbox_limit: int = 20,
                 batch_chunk: int = batches_mod.CHUNK, poll_s: float = 0.5, housekeeping_s: float = 5.0):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.db = Database(database) if isinstance(database, str) else database
        self.clock = clock or utcnow
        self.channels = channels or Channels()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = lease_s
        self.run_limit = run_limit
        self.outbox_limit = outbox_limit
        self.batch_chunk = batch_chunk
        self.poll_s = poll_s
        self.housekeeping_s = housekeeping_s
        self.service = ScenarioService(self.db, clock=self.clock)
        self.runner = Runner(self.db, self.clock)
        self._next_housekeeping = 0.0
        self.stop_event = threading.Event()
        self.totals = {"runs_created": 0, "steps": 0, "deliveries": 0, "batch_chunks": 0}

    def tick(self, *, housekeeping: bool | None = None) -> dict:
        """One pass of every duty; returns what it did."""
        out = {"program": False, "runs_created": 0, "birthdays": 0, "segment_entered": 0, "steps": 0,
               "deliveries": 0, "batch_chunks": 0}
        due = housekeeping if housekeeping is not None else time.monotonic() >= self._next_housekeeping
        if due:
            self._next_housekeeping = time.monotonic() + self.housekeeping_s
            out["program"] = self.service.sync_program()
            out["birthdays"] = events_mod.emit_birthdays(self.db, self.clock())
            out["segment_entered"] = events_mod.watch_segments(self.db, self.clock())
        out["runs_created"] = events_mod.intake(self.db, self.clock())
        out["steps"] = self.runner.run_due(self.clock(), self.run_limit)
        out["deliveries"] = deliver_due(self.db, self.channels, self.clock(), limit=self.outbox_limit,
                                        lease_s=self.lease_s, clock=self.clock)
        out["batch_chunks"] = 1 if batches_mod.process_chunk(self.db, self.clock(), chunk=self.batch_chunk) else 0
        for k in self.totals:
            self.totals[k] += out[k]
        return out

    @staticmethod
    def busy(out: dict) -> bool:
        return any(out[k] for k in ("runs_created", "birthdays", "segment_entered", "steps", "deliveries",
                                    "batch_chunks"))

    def run_until_idle(self, max_ticks: int = 1000) -> int:
        """Tick (with housekeeping) until a tick finds nothing to do; for tests and ``--once``."""
        for n in range(1, max_ticks + 1):
            if not self.busy(self.tick(housekeeping=True)):
                return n
        raise RuntimeError(f"still busy after {max_ticks} ticks")

    def run(self) -> None:
        """Tick until ``stop_event`` is set (SIGTERM / SIGINT in the CLI); a storage outage is logged and
        retried after a pause, never fatal."""
        log.info("worker %s started", self.name)
        while not self.stop_event.is_set():
            try:
                out = self.tick()
            except Exception as exc:  # noqa: BLE001 - keep going: the database may come back
                log.warning("worker %s: %s: %s", self.name, type(exc).__name__, getattr(exc, "message", exc))
                self.stop_event.wait(min(5.0, self.poll_s * 4))
                continue
            if not self.busy(out):
                self.stop_event.wait(self.poll_s)
        log.info("worker %s stopped: %s", self.name, self.totals)

    def close(self) -> None:
        self.db.dispose()
