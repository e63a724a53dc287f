"""The member context and the program snapshot a use case needs, and the storage helpers the use cases share
(member lookups, locks, keyed writes that replay)."""
from __future__ import annotations

import datetime as dt
import time

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from loyalty.core import InputError, load_program_text
from loyalty.core.errors import quote
from loyalty.core.inputs import parse_receipt_time
from loyalty.v1 import processing_pb2

from ..convert import iso
from ..dialects import dialect_of
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..limits import ID_LIMIT
from ..members import MemberContext, check_text, effective_tier, find_member, load_usage, member_view, next_tier
from ..models import balances, events, program_versions, promotion_budgets
from ..programs import Snapshot
from ..runtime import Runtime
from .common import RECEIPT_AHEAD


class MemberRef:
    """A ``MemberRef`` of two plain strings, for ``validate_ref``."""
    __slots__ = ("card", "phone")

    def __init__(self, card: str, phone: str):
        self.card, self.phone = card, phone


class Reads:
    """What every use case reads (the member context, the program snapshot and older versions, budgets, the
    receipt's time) and how it writes keyed operations, over the process's ``Runtime``; one per process,
    shared by the use cases."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.budget_cache: tuple[float, dict] | None = None     # (valid until, spent by promotion): ``budgets``
        self._old_programs: dict = {}       # version -> Program of older versions (``program_version``)

    def write_replaying(self, fn, *args, idempotent: bool = True):
        """``db.run_write(fn, ...)`` for a write idempotent by a unique key: when a concurrent call wrote the
        key first (the unique violation of our insert), run once more to replay its stored answer; when the
        connection is lost while committing, run again to learn the outcome (``Database.run_write``)."""
        for attempt in range(2):
            try:
                return self.rt.db.run_write(fn, *args, idempotent=idempotent)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def program_version(self, conn, version: int):
        """The ``Program`` of a published version (the current one from memory, older ones parsed once)."""
        snap = self.rt.programs.current()
        if snap.version == version:
            return snap.program
        program = self._old_programs.get(version)
        if program is None:
            yaml_text = conn.execute(select(program_versions.c.yaml)
                                     .where(program_versions.c.version == version)).scalar_one()
            program = load_program_text(yaml_text)
            if len(self._old_programs) >= 16:
                self._old_programs.clear()
            self._old_programs[version] = program
        return program

    def lock_balance(self, conn, member_id: int) -> tuple[int, int]:
        stmt = select(balances.c.active, balances.c.pending).where(balances.c.member_id == member_id)
        row = conn.execute(dialect_of(conn).lock(stmt)).one()
        return row[0], row[1]

    # ---- helpers ------------------------------------------------------------------------------------------

    def audiences(self, conn, member_id: int) -> tuple[str, ...]:
        """The member's audience ids; dynamic segments are evaluated for this member on ``conn`` now."""
        return tuple(sorted(self.rt.audience_index.audiences_of(member_id, conn=conn)))

    def load_context(self, conn, ref, snap: Snapshot, *, lock: bool) -> MemberContext:
        ctx = find_member(conn, ref, lock=lock)
        if ctx is None:
            raise NotFound(f"{'card' if ref[0] == 'card' else 'phone'} {ref[1]} was not found")
        limited = [p.id for p in snap.program.promotions if p.limits.uses_per_member is not None]
        if limited:
            ctx.usage = load_usage(conn, ctx.member_id, limited)
        ctx.audiences = self.audiences(conn, ctx.member_id)
        return ctx

    def calculate(self, snap: Snapshot, receipt: dict, member: dict | None, conn=None, *,
                   budgets: dict | None = None) -> dict:
        """The core's answer; ``budgets`` (what budgeted promotions have spent) as the caller read them, or
        None to read them here (``_budgets``)."""
        if budgets is None:
            budgets = self.budgets(snap, conn)
        try:
            answer = snap.engine.calculate(receipt, member, budgets)
        except InputError as exc:
            raise InvalidArgument(exc.path, exc.reason) from None
        answer["program_version"] = snap.version
        return answer

    def budgets(self, snap: Snapshot, conn=None) -> dict | None:
        """What budgeted promotions have spent.

        Without ``conn`` (CalculateReceipt, no side effects): read at most once a second per process.
        With ``conn`` (a confirm's write transaction): read now, never from the cache, the program's budget
        rows locked (PostgreSQL ``FOR UPDATE``, in promotion id order, always after the member's lock;
        SQLite's write lock already serialises) until the COMMIT that adds this receipt's spend, so no two
        confirms decide on the same figure and a budget ends at most one receipt's spend past its limit.
        (A group-commit batch reads them once, with ``_PGB_BUDGETS``, and adds what its earlier confirms
        spend.)"""
        ids = [p.id for p in snap.program.promotions
               if p.limits.discount_budget is not None or p.limits.points_budget is not None]
        if not ids:
            return None
        if conn is None:
            cached = self.budget_cache
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            with self.rt.db.read() as read:
                used = dict(read.execute(select(promotion_budgets.c.promotion, promotion_budgets.c.spent)).all())
            self.budget_cache = (time.monotonic() + 1.0, used)
            return used
        stmt = (select(promotion_budgets.c.promotion, promotion_budgets.c.spent)
                .where(promotion_budgets.c.promotion.in_(ids)).order_by(promotion_budgets.c.promotion))
        return dict(conn.execute(dialect_of(conn).lock(stmt)).all())

    def receipt_at(self, receipt: dict) -> dt.datetime | None:
        """The receipt's local time (naive), checked (``receipt_time``)."""
        return self.receipt_time(receipt)[0]

    def receipt_time(self, receipt: dict) -> tuple[dt.datetime, dt.datetime, dt.datetime]:
        """``(local time, moment, now)`` of the receipt, checked: a valid time with a valid offset, not more than
        ``RECEIPT_AHEAD`` ahead of the server's clock ``now`` (a till whose clock is years off would park its
        points and count its receipts in the wrong windows)."""
        if "at" not in receipt:
            raise InvalidArgument("receipt.at", "required")
        try:
            local, moment = parse_receipt_time(receipt["at"], "receipt.at")
        except InputError as exc:
            raise InvalidArgument(exc.path, exc.reason) from None
        if moment.year < 1900:
            raise InvalidArgument("receipt.at", f"before 1900: {quote(receipt['at'])}")
        now = self.rt.clock()
        if moment > now + RECEIPT_AHEAD:
            raise InvalidArgument("receipt.at", f"more than {RECEIPT_AHEAD.days} day ahead of the server's clock "
                                                f"({iso(now)}): check the till's date and time")
        return local, moment, now

    @staticmethod
    def purchase_key(key, path: str) -> tuple[str, str, str]:
        for name in ("store", "terminal", "number"):
            if not getattr(key, name):
                raise InvalidArgument(f"{path}.{name}", "required")
            check_text(f"{path}.{name}", getattr(key, name), ID_LIMIT)
        return key.store, key.terminal, key.number

    def member_message(self, ref) -> processing_pb2.Member:
        with self.rt.db.read() as conn:
            view = member_view(conn, ref, self.audiences)
        if view is None:
            raise NotFound(f"{'card' if ref[0] == 'card' else 'phone'} {ref[1]} was not found")
        ctx, m = view["ctx"], view["member"]
        msg = processing_pb2.Member(
            member_id=str(ctx.member_id), card=ctx.card, phone=m["phone"] or "", status=ctx.status,
            active_points=ctx.active_points, pending_points=ctx.pending_points, purchases_sum=ctx.purchases_sum,
            next_expiry_points=view["next_expiry_points"], next_expiry_at=iso(view["next_expiry_at"]),
            subscriptions=view["subscriptions"], audiences=view["audiences"], source=m["source"],
            registered_at=iso(m["registered_at"]),
            profile=processing_pb2.Profile(first_name=m["first_name"], last_name=m["last_name"],
                                           gender=m["gender"], birth_date=iso(m["birth_date"]), email=m["email"],
                                           city=m["city"], custom={k: str(v) for k, v in (m["custom"] or {}).items()}))
        try:
            program = self.rt.programs.current().program
        except FailedPrecondition:
            msg.tier = ctx.tier
            return msg
        msg.tier = effective_tier(program, ctx.tier, ctx.purchases_sum)
        name, missing = next_tier(program, ctx.purchases_sum)
        msg.next_tier = name
        if missing is not None:
            msg.to_next_tier = missing
        return msg

    def event(self, conn, kind: str, member_id: int | None, now: dt.datetime, *, key: str | None = None,
               **payload) -> None:
        conn.execute(insert(events).values(kind=kind, key=key, member_id=member_id, payload=payload,
                                           created_at=now))
