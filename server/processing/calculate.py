"""CalculateReceipt: the member context and the program snapshot into the core, no side effects; from memory
alone on the event loop when the context is cached."""
from __future__ import annotations

import time

from loyalty.core import InputError
from loyalty.v1 import processing_pb2

from ..convert import answer_to_proto, receipt_to_dict
from ..errors import InvalidArgument
from ..members import validate_ref
from ..programs import Snapshot
from .common import _check_receipt, _data_errors
from ..runtime import Runtime
from .context import MemberRef, Reads
from .effects import _accrued_active, activates_at


class Calculation:
    """CalculateReceipt: no side effects."""

    def __init__(self, rt: Runtime, reads: Reads):
        self.rt, self.reads = rt, reads

    # ---- Processing service -------------------------------------------------------------------------------

    def calculate_receipt(self, request) -> processing_pb2.CalculateReceiptResponse:
        """SPEC 4 for ``request.receipt`` with the context of ``request.member`` (card or phone; both empty:
        anonymous). No side effects. Unknown card: ``NotFound``. No program published:
        ``FailedPrecondition``."""
        member = request.member
        answer = self.calculate_answer(member.card, member.phone, receipt_to_dict(request.receipt))
        return processing_pb2.CalculateReceiptResponse(answer=answer_to_proto(answer))

    # What a calculate that must not wait for storage may use: (renew_at, checked_at, snapshot, budgets), set
    # by the last waiting calculate at checked_at. Past renew_at, one call is sent to renew it (the others keep
    # using it meanwhile); past checked_at + CALCULATE_STALE_MAX (storage not answering) nobody uses it.
    _calc_lease: tuple[float, float, Snapshot, dict | None] | None = None
    CALCULATE_LEASE = 0.1
    CALCULATE_STALE_MAX = 1.0

    @_data_errors
    def calculate_answer(self, card: str, phone: str, receipt: dict, *, wait: bool = True,
                         fits: bool = False) -> dict | None:
        """``calculate_receipt`` on plain values, for an edge that decodes the request bytes itself
        (``convert.decode_calculate_request``): ``card`` / ``phone`` of the ``MemberRef`` (both empty:
        anonymous), ``receipt`` as ``convert.receipt_to_dict`` makes it. Returns the core's answer dict
        with ``program_version``; raises what ``calculate_receipt`` raises.

        ``wait=False`` is for a caller on an event loop: it never touches storage, and returns None at once
        when the answer needs anything not in memory (the member's context is not cached; the program
        snapshot and budget figures of the last waiting call are due for renewal, about every
        ``CALCULATE_LEASE`` seconds); the caller then asks again, waiting, from a thread. A new program
        version or budget figure reaches these calls that much later.

        ``fits=True``: the caller's decoder already knows the receipt's strings pass the storage check
        (``convert.decode_receipt_request``), which is then skipped."""
        now = time.monotonic()
        if wait:
            snap = self.rt.programs.current()
        else:
            lease = self._calc_lease
            if lease is None or now - lease[1] > self.CALCULATE_STALE_MAX:
                return None
            if lease[0] <= now:
                self._calc_lease = (now + self.CALCULATE_LEASE,) + lease[1:]
                return None       # this call renews the lease from a thread; the others go on with it
            _, _, snap, budgets = lease
        ref = validate_ref(MemberRef(card, phone))
        if not fits:
            _check_receipt(receipt)
        at, moment, clock = self.reads.receipt_time(receipt)
        member = None
        if ref is not None:
            # A cached context serves only the program and membership versions it was built for; taken
            # before the context is read (which then can only be newer). Without waiting: the versions held.
            index = self.rt.audience_index
            stamp = (snap.version, index.checked_version() if wait else index.version)
            ctx = self.rt.contexts.get(ref, stamp)
            if ctx is None:
                if not wait:
                    return None
                with self.rt.db.read() as conn:
                    ctx = self.reads.load_context(conn, ref, snap, lock=False)
                self.rt.contexts.put(ref, ctx, stamp)
            member = ctx.as_core(snap.program, at)
        if wait:
            budgets = self.reads.budgets(snap)
            self._calc_lease = (now + self.CALCULATE_LEASE, now, snap, budgets)
        try:
            answer = snap.engine.calculate(receipt, member, budgets)
        except InputError as exc:
            raise InvalidArgument(exc.path, exc.reason) from None
        accrued = answer["totals"]["accrued_points"]
        if accrued and member is not None and not answer["member"]["anonymous"]:
            # what a confirm now would do: the points of a receipt past its return window are active at once
            if activates_at(snap.program, moment, clock) <= clock:
                _accrued_active(answer, accrued)
        answer["program_version"] = snap.version
        return answer
