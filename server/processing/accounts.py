"""Member accounts: get, enrol, update (profile, subscriptions), manual points (AdjustPoints) and card status."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from loyalty.core.errors import quote
from loyalty.v1 import processing_pb2

from .. import ledger
from ..dialects import dialect_of
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ..limits import ID_LIMIT, KEY_LIMIT, REASON_LIMIT
from ..members import check_card, check_text, find_member, validate_enroll, validate_ref, validate_status, validate_update
from ..models import balances, cards, member_updates, members, operations, subscriptions
from ..security import audit
from ..segments.service import bump_membership_version
from ..runtime import Runtime
from .common import _data_errors, _hash
from .context import Reads


def _plain(value):
    """A column's value as JSON holds it (dates as ISO text), for the audit record of a change."""
    return value.isoformat() if isinstance(value, dt.date) else value


class Accounts:
    """Member accounts: get, enrol, update, manual points, card status."""

    def __init__(self, rt: Runtime, reads: Reads):
        self.rt, self.reads = rt, reads

    @_data_errors
    def get_member(self, request) -> processing_pb2.Member:
        """The member by ``request.member.card`` or ``.phone``: status, tier, balances, next expiry,
        progress, subscriptions, profile. ``NotFound`` when unknown."""
        ref = validate_ref(request.member if request.HasField("member") else None, required=True)
        return self.reads.member_message(ref)

    @_data_errors
    def enroll_member(self, request) -> processing_pb2.Member:
        """Register a member with a new card (required) and phone (optional); both unique (``AlreadyExists``
        naming the field). ``source`` defaults to ``api``, ``registered_at`` to now. With ``request_id`` a
        retry, also a concurrent one, returns the member that request enrolled. Emits ``member_registered``."""
        values = validate_enroll(request)
        if values["registered_at"] is not None and values["registered_at"] > self.rt.clock():
            raise InvalidArgument("registered_at", "must not be in the future")
        try:
            lowest = self.rt.programs.current().program.tiers.levels[0].name
        except FailedPrecondition:
            lowest = ""
        try:
            # A concurrent enrolment of the same card / phone / request_id that commits first fails our insert;
            # the second run sees it (the same request_id: that member; else AlreadyExists).
            self.reads.write_replaying(self._enroll_tx, values, lowest,
                                  idempotent=bool(values.get("enroll_request_id")))
        except IntegrityError:
            raise AlreadyExists("the card or the phone is already registered") from None
        return self.reads.member_message(("card", values["card"]))

    def _enroll_tx(self, conn, v: dict, tier: str) -> None:
        # The card and the phone are looked up BEFORE the request id: on PostgreSQL each statement reads what
        # was committed when it started, so an identical call that commits between the two reads shows its
        # request id here, and this call replays it instead of calling its card "taken".
        taken = None
        if conn.execute(select(cards.c.id).where(cards.c.number == v["card"])).first() is not None:
            taken = AlreadyExists(f"card {v['card']} is already registered", field="card")
        elif v["phone"] and conn.execute(select(members.c.id).where(members.c.phone == v["phone"])).first():
            taken = AlreadyExists(f"phone {v['phone']} is already registered", field="phone")
        if v["enroll_request_id"]:
            prior = conn.execute(select(cards.c.number).join(members, members.c.id == cards.c.member_id)
                                 .where(members.c.enroll_request_id == v["enroll_request_id"])).first()
            if prior is not None:
                if prior.number != v["card"]:
                    raise AlreadyExists(f"request {v['enroll_request_id']} enrolled another card",
                                        field="request_id")
                return
        if taken is not None:
            raise taken
        now = self.rt.clock()
        member_id = conn.execute(insert(members).values(
            phone=v["phone"], first_name=v["first_name"], last_name=v["last_name"], gender=v["gender"],
            birth_date=v["birth_date"], email=v["email"], city=v["city"], custom=v["custom"], source=v["source"],
            enroll_request_id=v["enroll_request_id"], registered_at=v["registered_at"] or now)
            .returning(members.c.id)).scalar_one()
        conn.execute(insert(cards).values(number=v["card"], member_id=member_id, status="active",
                                          status_changed_at=now))
        conn.execute(insert(balances).values(member_id=member_id, active=0, pending=0, purchases_sum=0, tier=tier,
                                             updated_at=now))
        if v["subscriptions"]:
            conn.execute(insert(subscriptions), [
                {"member_id": member_id, "channel": ch, "on": on, "saved_on": None, "updated_at": now}
                for ch, on in sorted(v["subscriptions"].items())])
        self.reads.event(conn, "member_registered", member_id, now, key=f"member_registered:{member_id}",
                    card=v["card"], source=v["source"])

    @_data_errors
    def update_member(self, request) -> processing_pb2.Member:
        """Set or clear the member's profile fields and phone, set or remove custom fields, switch
        subscriptions on or off (``UpdateMemberRequest``: what is left out stays). A phone another member has:
        ``AlreadyExists`` naming ``phone``. With ``request_id`` a retry, also a concurrent one, changes
        nothing more and answers the member as it is; the same key with another payload is ``AlreadyExists``.
        The member's cached context is dropped (its audiences may depend on the profile)."""
        v = validate_update(request)
        try:
            # A concurrent change that commits first (the same request id, or the same phone for another
            # member) fails our write; the second run sees it and replays, or names the phone.
            member_id, card = self.reads.write_replaying(self._update_tx, v, _hash(request),
                                                    idempotent=v["request_id"] is not None)
        except IntegrityError:
            raise AlreadyExists("the phone is already registered to another member", field="phone") from None
        self.rt.contexts.invalidate(member_id)
        return self.reads.member_message(("card", card))

    def _update_tx(self, conn, v: dict, request_hash: str) -> tuple[int, str]:
        """``(member_id, card)`` of the member changed (or of the one the stored request changed)."""
        ops = dialect_of(conn)

        def stored():
            if v["request_id"] is None:
                return None
            done = conn.execute(select(member_updates.c.member_id, member_updates.c.request_hash)
                                .where(member_updates.c.request_id == v["request_id"])).first()
            if done is not None and done.request_hash != request_hash:
                raise AlreadyExists(f"request {v['request_id']} already updated a member with a different payload",
                                    field="request_id")
            return None if done is None else (done.member_id, self._card_of(conn, done.member_id))

        done = stored()
        if done is not None:
            return done
        try:
            ctx = find_member(conn, v["ref"])
            if ctx is None:
                raise NotFound(f"{'card' if v['ref'][0] == 'card' else 'phone'} {v['ref'][1]} was not found")
        except (NotFound, InvalidArgument):
            # An identical call that changed the very phone this one finds the member by may have committed
            # since the first look: replay it.
            done = stored()
            if done is not None:
                return done
            raise
        # The member's row is the lock of its profile (the scenario engine's profile steps take it too); a
        # concurrent call with this request id that held it has committed by now (SQLite: the write lock).
        stmt = select(members).where(members.c.id == ctx.member_id)
        row = conn.execute(ops.lock(stmt)).one()._mapping
        if ops.locks_rows:
            done = stored()
            if done is not None:
                return done
        now = self.rt.clock()
        changes, values = {}, {}
        for name, value in v["fields"].items():
            if name == "phone" and value is not None and value != row["phone"]:
                if conn.execute(select(members.c.id).where(members.c.phone == value)).first() is not None:
                    raise AlreadyExists(f"phone {value} is already registered to another member", field="phone")
            if value != row[name]:
                values[name] = value
                changes[name] = [_plain(row[name]), _plain(value)]
        custom = dict(row["custom"] or {})
        for name in v["clear_custom"]:
            if name in custom:
                changes[f"custom.{name}"] = [custom.pop(name), None]
        for name, value in v["custom"].items():
            if custom.get(name) != value:
                changes[f"custom.{name}"] = [custom.get(name), value]
                custom[name] = value
        if custom != (row["custom"] or {}):
            values["custom"] = custom
        if values:
            conn.execute(update(members).where(members.c.id == ctx.member_id).values(**values))
        if v["subscriptions"]:
            changes.update(self._set_subscriptions(conn, ctx.member_id, v["subscriptions"], now))
        conn.execute(insert(member_updates).values(request_id=v["request_id"], member_id=ctx.member_id,
                                                   request_hash=request_hash, changes=changes, created_at=now))
        return ctx.member_id, ctx.card

    def _set_subscriptions(self, conn, member_id: int, wanted: dict, now: dt.datetime) -> dict:
        """Switch the member's channels as ``wanted`` says; the changes as ``{"subscriptions.<ch>": [before,
        after]}``. While no card of the member is active (``_status_tx`` switched every channel off and keeps
        what was on in ``saved_on``), the choice goes to ``saved_on``: the channel stays off until a card is
        active again, and then it is what the member chose. The cards are locked first, as ``_status_tx``
        locks them, so a status change cannot pass between reading them and writing."""
        stmt = select(cards.c.status).where(cards.c.member_id == member_id)
        statuses = conn.execute(dialect_of(conn).lock(stmt)).scalars()
        live = "active" in set(statuses)
        subs = subscriptions.c
        current = {r.channel: r for r in conn.execute(select(subs.channel, subs.on, subs.saved_on)
                                                      .where(subs.member_id == member_id))}
        changes = {}
        for channel, on in sorted(wanted.items()):
            row = current.get(channel)
            before = None if row is None else (row.on if live or row.saved_on is None else row.saved_on)
            if before == on:
                continue
            changes[f"subscriptions.{channel}"] = [before, on]
            values = {"on": on, "saved_on": None} if live else {"on": False, "saved_on": on}
            if row is None:
                conn.execute(insert(subscriptions).values(member_id=member_id, channel=channel, updated_at=now,
                                                          **values))
            else:
                conn.execute(update(subscriptions).where(subs.member_id == member_id, subs.channel == channel)
                             .values(updated_at=now, **values))
        return changes

    @staticmethod
    def _card_of(conn, member_id: int) -> str:
        """The member's card a phone would find: the newest active one, else the newest."""
        return conn.execute(select(cards.c.number).where(cards.c.member_id == member_id)
                            .order_by((cards.c.status == "active").desc(), cards.c.id.desc()).limit(1)).scalar_one()

    @_data_errors
    def adjust_points(self, request) -> processing_pb2.AdjustPointsResponse:
        """``credit`` / ``top_up`` give ``points`` as an active lot (expiring after ``expiry_days`` or the
        program's), ``debit`` takes them (never below zero: ``FailedPrecondition(available_points=N)``); the
        ``reason`` is required (SPEC 5: audited).
        Idempotent by ``operation_id`` (required; concurrent calls with the same one: one operation is made,
        the others replay it)."""
        ref = validate_ref(request.member if request.HasField("member") else None, required=True)
        if request.kind not in ("credit", "debit", "top_up"):
            raise InvalidArgument("kind", f"expected credit, debit or top_up, got {quote(request.kind)}")
        if request.points <= 0:
            raise InvalidArgument("points", f"must be at least 1, got {request.points}")
        if request.points > 10**12:
            raise InvalidArgument("points", f"must be at most {10**12}, got {request.points}")
        operation_id = check_text("operation_id", request.operation_id.strip(), KEY_LIMIT)
        if not operation_id:
            raise InvalidArgument("operation_id", "required: the idempotency key of this operation")
        check_text("reason", request.reason, REASON_LIMIT)
        if not request.reason.strip():
            raise InvalidArgument("reason", "required: why the points are given or taken, for the audit trail")
        expiry_days = None
        if request.HasField("expiry_days"):
            if request.kind == "debit":
                raise InvalidArgument("expiry_days", "only credits and top-ups expire")
            if not 1 <= request.expiry_days <= 36500:
                raise InvalidArgument("expiry_days", f"must be 1 to 36500, got {request.expiry_days}")
            expiry_days = request.expiry_days
        else:
            try:
                expiry_days = self.rt.programs.current().program.expiry_days
            except FailedPrecondition:
                expiry_days = None
        response, member_id = self.reads.write_replaying(self._adjust_tx, ref, request, operation_id, expiry_days,
                                                    _hash(request))
        self.rt.contexts.invalidate(member_id)
        return processing_pb2.AdjustPointsResponse(**response)

    def _adjust_tx(self, conn, ref, request, operation_id: str, expiry_days: int | None, request_hash: str):
        def stored():
            done = conn.execute(select(operations.c.request_hash, operations.c.response, operations.c.member_id)
                                .where(operations.c.operation_id == operation_id)).first()
            if done is not None and done.request_hash != request_hash:
                raise AlreadyExists(f"operation {operation_id} was already made with a different payload",
                                    field="operation_id")
            # (its member's cached context is dropped by the caller: perhaps a replay after a lost COMMIT reply)
            return None if done is None else (dict(done.response, replayed=True), done.member_id)

        done = stored()
        if done is not None:
            return done
        ctx = find_member(conn, ref, lock=True)
        if ctx is None:
            raise NotFound(f"member {ref[1]} was not found")
        if dialect_of(conn).locks_rows:
            # Checked again under the member's lock: a concurrent call with this key that held it has
            # committed by now (SQLite held the write lock since the first check).
            done = stored()
            if done is not None:
                return done
        now = self.rt.clock()
        points, kind = request.points, request.kind
        if kind == "debit":
            available = max(ctx.active_points, 0)
            if points > available:
                raise FailedPrecondition(f"not enough points: {points} to debit, {available} available",
                                         available_points=available)
            ledger.consume_active(conn, ctx.member_id, points)
            ledger.add_entry(conn, key=f"operation:{operation_id}", member_id=ctx.member_id, kind="adjustment",
                             active_delta=-points, now=now, operation_id=operation_id, reason=request.reason)
            delta = -points
        else:
            entry = ledger.add_entry(conn, key=f"operation:{operation_id}", member_id=ctx.member_id,
                                     kind="top_up" if kind == "top_up" else "adjustment", active_delta=points,
                                     now=now, operation_id=operation_id, reason=request.reason)
            ledger.new_lot(conn, member_id=ctx.member_id, points=points, entry_id=entry, state="active",
                           activates_at=now,
                           expires_at=now + dt.timedelta(days=expiry_days) if expiry_days else None)
            delta = points
        ledger.move_balance(conn, ctx.member_id, active=delta, now=now)
        if delta > 0 and ctx.active_points < 0:
            ledger.settle_debt(conn, ctx.member_id, ctx.active_points + delta)
        if kind == "top_up":
            self.reads.event(conn, "top_up", ctx.member_id, now, key=f"top_up:{operation_id}", card=ctx.card,
                        points=points, reason=request.reason, operation_id=operation_id)
        response = {"operation_id": operation_id, "active_points": ctx.active_points + delta,
                    "pending_points": ctx.pending_points, "replayed": False}
        conn.execute(insert(operations).values(operation_id=operation_id, member_id=ctx.member_id, kind=kind,
                                               points=points, reason=request.reason, request_hash=request_hash,
                                               response=response, created_at=now))
        audit.record(conn, "AdjustPoints", f"member:{ctx.member_id} operation:{operation_id}", now)
        return response, ctx.member_id

    @_data_errors
    def set_card_status(self, request) -> processing_pb2.Member:
        """Change a card's status. Leaving ``active`` switches every subscription off and remembers which
        were on; returning to ``active`` restores exactly those. Emits ``card_status_changed``."""
        card = request.card.strip()
        if not card:
            raise InvalidArgument("card", "required")
        check_card("card", card)
        status = validate_status(request.status)
        check_text("reason", request.reason, REASON_LIMIT)
        member_id = self.rt.db.run_write(self._status_tx, card, status, request.reason)
        self.rt.contexts.invalidate(member_id)
        self.rt.audience_index.announce()      # the other processes' cached contexts hold the old status
        return self.reads.member_message(("card", card))

    def _status_tx(self, conn, card: str, status: str, reason: str) -> int:
        stmt = select(cards.c.member_id, cards.c.status).where(cards.c.number == card)
        row = conn.execute(dialect_of(conn).lock(stmt)).first()
        if row is None:
            raise NotFound(f"card {card} was not found")
        before = row.status
        if before == status:
            return row.member_id
        now = self.rt.clock()
        subs = subscriptions.c
        if before == "active":
            conn.execute(update(subscriptions).where(subs.member_id == row.member_id)
                         .values(saved_on=subs.on, on=False, updated_at=now))
        elif status == "active":
            conn.execute(update(subscriptions).where(subs.member_id == row.member_id, subs.saved_on.is_not(None))
                         .values(on=subs.saved_on, saved_on=None, updated_at=now))
        conn.execute(update(cards).where(cards.c.number == card).values(status=status, status_changed_at=now))
        audit.record(conn, "SetCardStatus", f"member:{row.member_id} status:{before}->{status}", now)
        self.reads.event(conn, "card_status_changed", row.member_id, now, card=card, status_before=before,
                    status=status, reason=reason)
        bump_membership_version(conn, now)      # last: its row lock is held until the commit
        return row.member_id
