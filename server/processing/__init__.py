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

``ProcessingService`` is the facade the edge calls: it builds one object per use case over the process's typed
``Runtime`` (storage, clock, program registry, caches) and the shared ``Reads`` (``context``: member context,
program snapshot, keyed writes), in the order a request travels: ``Calculation`` (``calculate``),
``Confirmation`` (``confirm``, deciding with ``effects`` and writing with ``confirm_write`` row by row or
``confirm_sql`` set-based), ``Refunds`` (``refunds``), ``Accounts`` (``accounts``) and ``Publishing``
(``publishing``, which tells the segment and scenario modules of a new program through ``ProgramPart``
callables wired here); ``common`` holds what they share (request hashes, limits, retry signals).
"""
from __future__ import annotations

from ..db import Database
from ..members import ContextCache
from ..programs import ProgramRegistry
from ..runtime import Runtime
from ..scenarios.definitions import parse_scenarios
from ..security.service import Security
from ..segments.membership import AudienceIndex
from ..segments.service import SegmentService
from ..timeutil import utcnow
from .accounts import Accounts
from .calculate import Calculation
from ..limits import REASON_LIMIT  # noqa: F401 - part of the package's surface
from .common import _check_receipt, _hash  # noqa: F401 - part of the package's surface
from .confirm import Confirmation
from .context import Reads
from .publishing import Publishing
from .refunds import Refunds

__all__ = ["ProcessingService"]


class ProcessingService:
    """Sync and thread-safe; one per process, shared by every request thread.

    ``clock`` is a zero-argument callable returning an aware ``datetime`` (default: UTC now); tests pass a
    simulated one so that activation and expiry can be exercised without waiting. ``group_commit`` /
    ``batch_threads``: ConfirmPurchase's group commit on PostgreSQL (``Confirmation``).
    """

    def __init__(self, database: Database, programs: ProgramRegistry, *, clock=None,
                 redis_url: str | None = None, audience_index: AudienceIndex | None = None,
                 group_commit: int | None = None, batch_threads: int | None = None):
        # Audience membership from the segment module (roaring bitmaps, reloaded when a recalculation
        # bumps the membership version): what the core's audience conditions check.
        audience_index = audience_index or AudienceIndex(database, redis_url=redis_url)
        # A new program version is served only once the memberships its promotions name are loaded.
        programs.memberships = audience_index.catch_up
        # What the use cases, the jobs, the segment and scenario modules and the ledger check share.
        self.runtime = rt = Runtime(database, clock or utcnow, programs, ContextCache(), audience_index)
        self.reads = Reads(rt)
        self.calculation = Calculation(rt, self.reads)
        self.confirmation = Confirmation(rt, self.reads, group_commit=group_commit, batch_threads=batch_threads)
        self.refunds = Refunds(rt, self.reads)
        self.accounts = Accounts(rt, self.reads)
        # The program file's parts kept by other modules: scenarios checked (workers apply them), segments and
        # audiences defined and calculated first, so a promotion never names an audience that does not exist yet.
        self.publishing = Publishing(rt, parts=(_check_scenarios, _segments_part(rt)))
        self.security = Security(rt)

    # the runtime's parts, as the edge and the CLI read them
    db = property(lambda self: self.runtime.db)
    programs = property(lambda self: self.runtime.programs)
    clock = property(lambda self: self.runtime.clock)
    contexts = property(lambda self: self.runtime.contexts)
    audience_index = property(lambda self: self.runtime.audience_index)

    # ---- the use cases, as the edge calls them ------------------------------------------------------------

    def calculate_receipt(self, request):
        return self.calculation.calculate_receipt(request)

    def calculate_answer(self, card: str, phone: str, receipt: dict, *, wait: bool = True, fits: bool = False):
        return self.calculation.calculate_answer(card, phone, receipt, wait=wait, fits=fits)

    def confirm_purchase(self, request):
        return self.confirmation.confirm_purchase(request)

    def confirm_answer(self, card: str, phone: str, receipt: dict, *, fits: bool = False):
        return self.confirmation.confirm_answer(card, phone, receipt, fits=fits)

    def confirm_future(self, card: str, phone: str, receipt: dict, *, fits: bool = False):
        return self.confirmation.confirm_future(card, phone, receipt, fits=fits)

    def watch_group_commit(self, make_on_batch) -> None:
        self.confirmation.watch_group_commit(make_on_batch)

    def trace_group_commit(self, capture, around) -> None:
        self.confirmation.trace_group_commit(capture, around)

    def refund_purchase(self, request):
        return self.refunds.refund_purchase(request)

    def cancel_purchase(self, request):
        return self.refunds.cancel_purchase(request)

    def get_member(self, request):
        return self.accounts.get_member(request)

    def enroll_member(self, request):
        return self.accounts.enroll_member(request)

    def update_member(self, request):
        return self.accounts.update_member(request)

    def adjust_points(self, request):
        return self.accounts.adjust_points(request)

    def set_card_status(self, request):
        return self.accounts.set_card_status(request)

    def publish_program(self, request):
        return self.publishing.publish_program(request)

    def get_program(self, request):
        return self.publishing.get_program(request)

    def list_program_versions(self, request):
        return self.publishing.list_program_versions(request)

    def list_audit(self, request):
        return self.security.list_audit(request)

    def list_limit_breaches(self, request):
        return self.security.list_limit_breaches(request)

    def erase_member(self, request):
        return self.security.erase_member(request)

    def export_member(self, request):
        return self.security.export_member(request)

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
        self.confirmation.close()
        self.programs.close()
        self.audience_index.close()
        self.db.dispose()


def _check_scenarios(source: dict) -> None:
    """The program file's ``scenarios:`` checked (``InvalidArgument`` naming the step); workers apply them."""
    if source.get("scenarios"):
        parse_scenarios(source["scenarios"])


def _segments_part(rt: Runtime):
    """The program file's ``segments:`` and ``audiences:`` defined and calculated by the segment module."""
    def prepare(source: dict) -> None:
        if source.get("segments") or source.get("audiences"):
            SegmentService(rt.db, clock=rt.clock).apply_program(source)
    return prepare
