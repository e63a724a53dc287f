"""The processing service: SPEC sections 5-6 as plain synchronous Python, one instance per process.

Each public method takes the request message of ``loyalty.v1`` and returns the response message, and reads
like a story: validate (nothing is written before the whole request is known to be good), load the member
context and the program snapshot, call the core, write in one transaction, answer. Errors are the
``loyalty.server.errors`` types: ``InvalidArgument(path, reason)`` names the field as the client sent it
(``receipt.lines[2].quantity``, ``member.card``, ``lines[0].quantity``), ``NotFound``, ``AlreadyExists``
(an idempotency key reused with another payload), ``FailedPrecondition`` (not enough points:
``details["available_points"]``), ``Unavailable`` (storage down; the transaction was rolled back).

The gRPC layer (``grpc_server.py``) only maps these to status codes; idempotency and concurrency live here,
in the storage transactions.

``ProcessingService`` is the facade the edge calls; each use case is decided in a module of its own, in the
order a request travels: ``context`` (member context, program snapshot, shared storage helpers),
``calculate``, ``confirm`` (with ``effects``: what a confirmed receipt does, and ``confirm_sql``: the
PostgreSQL statements of one confirm and of a group-commit batch), ``refunds``, ``accounts`` and
``publishing``; ``common`` holds what they share (request hashes, limits, retry signals).
"""
from __future__ import annotations

import concurrent.futures
import os
import threading

from ..batcher import Batcher
from ..db import Database
from ..members import ContextCache
from ..programs import ProgramRegistry
from ..runtime import Runtime
from ..security.service import SecurityCases
from ..segments.membership import AudienceIndex
from ..timeutil import utcnow
from .accounts import AccountCases
from .calculate import CalculateCases
from .common import REASON_LIMIT, _check_receipt, _hash  # noqa: F401 - part of the package's surface
from .confirm import ConfirmCases
from .confirm import member_of
from .confirm_sql import SetWrite  # noqa: F401 - tests watch its writes
from .context import ContextCases
from .publishing import PublishingCases
from .refunds import RefundCases

__all__ = ["ProcessingService"]


class ProcessingService(CalculateCases, ConfirmCases, RefundCases, AccountCases, PublishingCases, SecurityCases,
                        ContextCases):
    """Sync and thread-safe; one per process, shared by every request thread.

    ``clock`` is a zero-argument callable returning an aware ``datetime`` (default: UTC now); tests pass a
    simulated one so that activation and expiry can be exercised without waiting.
    """

    def __init__(self, database: Database, programs: ProgramRegistry, *, clock=None,
                 redis_url: str | None = None, audience_index: AudienceIndex | None = None,
                 group_commit: int | None = None, batch_threads: int | None = None):
        self.db = database
        self.programs = programs
        self.clock = clock or utcnow
        self.contexts = ContextCache()
        self._budget_cache: tuple[float, dict] | None = None
        self._old_programs: dict = {}       # version -> Program of older versions (``_program_version``)
        # Group commit of ConfirmPurchase on PostgreSQL (``_confirm_batch``): ``group_commit`` is the largest
        # batch (0: off, every confirm in its own transaction); None reads $LOYALTY_CONFIRM_BATCH (default 32).
        # $LOYALTY_CONFIRM_BATCH_WINDOW_MS (default 4) is how long a batch waits to fill under load (``Batcher``;
        # in interleaved runs of benchmarks/server.py, 4 ms instead of 1 made batches larger and took about a fifth
        # off PostgreSQL's CPU per confirm, most of it spent per batch), and
        # $LOYALTY_CONFIRM_BATCH_THREADS (default 2) how many batches run at once (each on its own connection).
        env = os.environ.get
        if group_commit is None:
            group_commit = int(env("LOYALTY_CONFIRM_BATCH", "32") or 0)
        self._batcher = None
        # PostgreSQL writes a confirm's rows set-based (``confirm_sql``), a group at a time or alone as a group of one.
        self._set_based = database.dialect == "postgresql"
        self._alone_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._alone_lock = threading.Lock()
        if group_commit > 0 and database.dialect == "postgresql":
            self._batcher = Batcher(self._confirm_batch, max_batch=group_commit,
                                    window=float(env("LOYALTY_CONFIRM_BATCH_WINDOW_MS", "4") or 0) / 1000,
                                    threads=batch_threads or int(env("LOYALTY_CONFIRM_BATCH_THREADS", "2") or 2),
                                    name="confirm-batch", key=member_of)
        # Audience membership from the segment module (roaring bitmaps, reloaded when a recalculation
        # bumps the membership version): what the core's audience conditions check.
        self.audience_index = audience_index or AudienceIndex(database, redis_url=redis_url)
        # A new program version is served only once the memberships its promotions name are loaded.
        programs.memberships = self.audience_index.catch_up
        # What the jobs, the segment and scenario modules and the ledger check are given instead of this object.
        self.runtime = Runtime(database, self.clock, programs, self.contexts, self.audience_index)

    @classmethod
    def open(cls, database_url: str, *, redis_url: str | None = None, clock=None,
             batch_threads: int | None = None) -> "ProcessingService":
        """Connect to ``database_url`` (``sqlite:///...`` or ``postgresql+psycopg://...``; the schema must
        be at head: call ``loyalty.server.db.upgrade(url)`` first) and, with ``redis_url``, listen for
        program publications there. Storage problems surface as ``Unavailable`` on the first request and
        as ``check_ready() == False``. ``batch_threads``: group-commit batches in flight (None:
        $LOYALTY_CONFIRM_BATCH_THREADS, default 2)."""
        database = Database(database_url)
        clock = clock or utcnow
        return cls(database, ProgramRegistry(database, redis_url=redis_url, clock=clock), clock=clock,
                   redis_url=redis_url, batch_threads=batch_threads)

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def check_ready(self, timeout: float | None = None) -> bool:
        """True when storage answers a trivial query (within ``timeout`` seconds: a hung server is not ready;
        for the health service); never raises."""
        return self.db.ping(timeout)

    def close(self) -> None:
        """Stop the program listener and dispose of the connection pool."""
        if self._batcher is not None:
            self._batcher.close()
        if self._alone_executor is not None:
            self._alone_executor.shutdown(wait=True)
        self.programs.close()
        self.audience_index.close()
        self.db.dispose()
