"""The system of record: SQLAlchemy 2 typed models of members, cards, purchases, the points ledger, lots,
balances, program versions and the outbox of domain events.

Rules every table follows: money, points and quantities are integers; timestamps carry a time zone (stored
as UTC; SQLite gets them back aware too); every table that moves points has a unique key that makes a retry
harmless (``purchases`` by store/terminal/number, ``refunds.refund_id``, ``operations.operation_id``,
``ledger.key``), and so do enrolments (``members.enroll_request_id``) and member updates
(``member_updates.request_id``). Relationships are ``lazy="raise"``: the service reads with explicit Core
statements, so no query hides behind an attribute. The schema is created by the Alembic chain in
``migrations/``; a test proves that ``upgrade`` from empty equals these models.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, Boolean, CheckConstraint, Date, DateTime, ForeignKey, Index, Integer, MetaData, String, Text,
    TypeDecorator, UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .limits import AT_LIMIT, EMAIL_LIMIT, ID_LIMIT, KEY_LIMIT, NAME_LIMIT

__all__ = [
    "Base", "UTCDateTime", "Member", "Card", "Subscription", "MemberUpdate", "ProgramVersionRow", "Purchase",
    "PurchaseLine", "Refund", "LedgerEntry", "PointLot", "Balance", "Operation", "PromotionUsage", "PromotionBudget",
    "Event",    "LEDGER_KINDS", "LOT_STATES", "PURCHASE_STATUSES", "EVENT_KINDS", "SOURCES",
]

LEDGER_KINDS = ("accrual", "redemption", "refund", "reversal", "expiry", "adjustment", "top_up", "activation")
LOT_STATES = ("pending", "active", "expired")
PURCHASE_STATUSES = ("confirmed", "refunded", "cancelled")
SOURCES = ("manual", "api", "form", "import", "pos")
CHANNELS = ("email", "sms", "push")          # members' subscriptions, messages and their events
EVENT_KINDS = ("purchase_confirmed", "refund", "member_registered", "tier_changed", "card_status_changed",
               "top_up", "points_expiring")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator):
    """An aware datetime stored as UTC. PostgreSQL keeps ``timestamptz``; SQLite, which has no time zones,
    stores the naive UTC wall clock and gets an aware value back, so the code never mixes the two."""
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a time-zone column")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dt.datetime: UTCDateTime(),
        dt.date: Date(),
        int: BigInteger(),
        dict[str, Any]: JSON(),
    }


# ---- members ------------------------------------------------------------------------------------------------

class Member(Base):
    __tablename__ = "members"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    phone: Mapped[str | None] = mapped_column(String(32), unique=True)
    first_name: Mapped[str] = mapped_column(String(NAME_LIMIT), default="")
    last_name: Mapped[str] = mapped_column(String(NAME_LIMIT), default="")
    gender: Mapped[str] = mapped_column(String(10), default="")       # female | male | ""
    birth_date: Mapped[dt.date | None]
    email: Mapped[str] = mapped_column(String(EMAIL_LIMIT), default="")
    city: Mapped[str] = mapped_column(String(NAME_LIMIT), default="")
    custom: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source: Mapped[str] = mapped_column(String(10))                    # manual | api | form | import | pos
    enroll_request_id: Mapped[str | None] = mapped_column(String(KEY_LIMIT), unique=True)
    registered_at: Mapped[dt.datetime]

    cards: Mapped[list[Card]] = relationship(back_populates="member", lazy="raise")
    subscriptions: Mapped[list[Subscription]] = relationship(lazy="raise")
    balance: Mapped[Balance] = relationship(lazy="raise")

    __table_args__ = (
        CheckConstraint("source IN ('manual', 'api', 'form', 'import', 'pos')", name="source"),
    )


class Card(Base):
    __tablename__ = "cards"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    number: Mapped[str] = mapped_column(String(ID_LIMIT), unique=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), index=True)
    status: Mapped[str] = mapped_column(String(12), default="active")
    status_changed_at: Mapped[dt.datetime]

    member: Mapped[Member] = relationship(back_populates="cards", lazy="raise")

    __table_args__ = (
        CheckConstraint("status IN ('active', 'restricted', 'suspended', 'blocked')", name="status"),
    )


class Subscription(Base):
    """A channel (email, sms, push...) the member agreed to. ``saved_on`` holds what ``on`` was when the card
    left ``active`` (NULL while active), so that returning to ``active`` restores exactly that."""
    __tablename__ = "subscriptions"

    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    on: Mapped[bool] = mapped_column(Boolean)
    saved_on: Mapped[bool | None] = mapped_column(Boolean)
    updated_at: Mapped[dt.datetime]


class MemberUpdate(Base):
    """A change of a member's profile or subscriptions (``UpdateMember``), kept as the audit record and
    idempotent by ``request_id`` (NULL: the request had none). ``changes`` maps each changed field
    (``city``, ``custom.pet``, ``subscriptions.email``) to ``[before, after]``."""
    __tablename__ = "member_updates"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    request_id: Mapped[str | None] = mapped_column(String(KEY_LIMIT), unique=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), index=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    changes: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime]


class Balance(Base):
    """The member's balances, kept beside the ledger in the same transaction; its row is the lock that
    serialises every change of one member's points. ``active`` may go below zero only when a refund takes
    back accrued points the member has already spent (a debt the next credits pay off)."""
    __tablename__ = "balances"

    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), primary_key=True)
    active: Mapped[int] = mapped_column(default=0)
    pending: Mapped[int] = mapped_column(default=0)
    purchases_sum: Mapped[int] = mapped_column(default=0)   # tier metric over the window, net of refunds
    tier: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime]


# ---- program ------------------------------------------------------------------------------------------------

class ProgramVersionRow(Base):
    """An immutable published program; the highest version is the current one."""
    __tablename__ = "program_versions"

    version: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    yaml: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(64))          # sha256 of the YAML text
    published_at: Mapped[dt.datetime]
    comment: Mapped[str] = mapped_column(Text, default="")


# ---- purchases ----------------------------------------------------------------------------------------------

class Purchase(Base):
    __tablename__ = "purchases"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    store: Mapped[str] = mapped_column(String(ID_LIMIT))
    terminal: Mapped[str] = mapped_column(String(ID_LIMIT))
    number: Mapped[str] = mapped_column(String(ID_LIMIT))
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), index=True)
    card: Mapped[str | None] = mapped_column(String(ID_LIMIT))
    program_version: Mapped[int] = mapped_column(ForeignKey("program_versions.version"))
    request_hash: Mapped[str] = mapped_column(String(64))
    answer: Mapped[dict[str, Any]]                               # the stored answer, replayed on retries
    receipt_at: Mapped[str] = mapped_column(String(AT_LIMIT))   # local time as the POS sent it
    # When the purchase happened, by its receipt (SPEC 6), not when the server heard of it: the moment (UTC; a
    # time sent without an offset is taken as UTC) orders it against the clock (activation of its points), the
    # local date counts it in windows (segments, tier windows).
    receipt_time: Mapped[dt.datetime]
    receipt_date: Mapped[dt.date]
    amount: Mapped[int]
    discount: Mapped[int]
    payable: Mapped[int]
    redeemed_points: Mapped[int]
    redeemed_amount: Mapped[int]
    accrued_points: Mapped[int]
    refunded_payable: Mapped[int] = mapped_column(default=0)     # tier metric taken back so far
    refunded_amount: Mapped[int] = mapped_column(default=0)      # money given back so far
    returned_points: Mapped[int] = mapped_column(default=0)      # written-off points given back so far
    taken_back_points: Mapped[int] = mapped_column(default=0)    # accrued points taken back so far
    status: Mapped[str] = mapped_column(String(10), default="confirmed")
    created_at: Mapped[dt.datetime] = mapped_column(index=True)

    __table_args__ = (
        UniqueConstraint("store", "terminal", "number"),
        CheckConstraint("status IN ('confirmed', 'refunded', 'cancelled')", name="status"),
        Index("ix_purchases_member_id_receipt_date", "member_id", "receipt_date"),
    )


class PurchaseLine(Base):
    """One line's result and what of it has been returned so far (quantities in thousandths).

    No foreign key to ``purchases``: lines are written in the statement that writes their purchase and
    neither is ever deleted, and the key's check, one trigger call per line, was a fifth of PostgreSQL's work
    per confirm (``benchmarks/server.py``; migration 0004). ``loyalty ledger check`` finds orphans instead."""
    __tablename__ = "purchase_lines"

    purchase_id: Mapped[int] = mapped_column(Id, primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    sku: Mapped[str] = mapped_column(String(ID_LIMIT))
    quantity: Mapped[int]
    amount: Mapped[int]
    payable: Mapped[int]
    redeemed: Mapped[int]                  # minor units paid with points
    points: Mapped[int]                    # accrued
    refunded_quantity: Mapped[int] = mapped_column(default=0)
    refunded_payable: Mapped[int] = mapped_column(default=0)
    refunded_redeemed: Mapped[int] = mapped_column(default=0)
    refunded_points: Mapped[int] = mapped_column(default=0)


class Refund(Base):
    __tablename__ = "refunds"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    refund_id: Mapped[str] = mapped_column(String(KEY_LIMIT), unique=True)
    purchase_id: Mapped[int] = mapped_column(ForeignKey("purchases.id"), index=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any]]
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime]


# ---- points -------------------------------------------------------------------------------------------------

class LedgerEntry(Base):
    """Append-only. ``points`` is the signed change of the member's total (active + pending);
    ``active_delta`` and ``pending_delta`` split it, so an ``activation`` moves points with ``points = 0``.
    The sums of the two deltas over a member equal its balances: ``loyalty.server.ledger.check`` proves it."""
    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)   # idempotency key of this entry
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), index=True)
    kind: Mapped[str] = mapped_column(String(12))
    points: Mapped[int]
    active_delta: Mapped[int]
    pending_delta: Mapped[int]
    purchase_id: Mapped[int | None] = mapped_column(ForeignKey("purchases.id"))
    refund_id: Mapped[str | None] = mapped_column(String(KEY_LIMIT))
    operation_id: Mapped[str | None] = mapped_column(String(KEY_LIMIT))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime]

    __table_args__ = (
        CheckConstraint("kind IN ('accrual', 'redemption', 'refund', 'reversal', 'expiry', 'adjustment', "
                        "'top_up', 'activation')", name="kind"),
        CheckConstraint("points = active_delta + pending_delta", name="points_split"),
    )


class PointLot(Base):
    """Points received together: pending until ``activates_at``, then active until ``expires_at``.
    Write-offs consume the earliest-expiring active lots first."""
    __tablename__ = "point_lots"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"))
    points: Mapped[int]
    remaining: Mapped[int]
    state: Mapped[str] = mapped_column(String(8))
    activates_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]
    entry_id: Mapped[int] = mapped_column(ForeignKey("ledger.id"))
    purchase_id: Mapped[int | None] = mapped_column(ForeignKey("purchases.id"), index=True)
    expiring_notified: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        CheckConstraint("state IN ('pending', 'active', 'expired')", name="state"),
        CheckConstraint("remaining >= 0 AND remaining <= points", name="remaining"),
        Index("ix_point_lots_member_state", "member_id", "state", "expires_at"),
        Index("ix_point_lots_state_activates_at", "state", "activates_at"),
        Index("ix_point_lots_state_expires_at", "state", "expires_at"),
    )


class Operation(Base):
    """A manual credit / debit / top-up, idempotent by ``operation_id`` and kept as the audit record."""
    __tablename__ = "operations"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    operation_id: Mapped[str] = mapped_column(String(KEY_LIMIT), unique=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    points: Mapped[int]
    reason: Mapped[str] = mapped_column(Text, default="")
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime]


class PromotionUsage(Base):
    """Uses of a limited promotion by a member in one period (``period_key``: ``2026-03-02``, ``2026-W10``,
    ``2026-03``, ``2026`` or ``all``), fed to the core as ``member.usage``."""
    __tablename__ = "promotion_usage"

    member_id: Mapped[int] = mapped_column(ForeignKey("members.id"), primary_key=True)
    promotion: Mapped[str] = mapped_column(String(100), primary_key=True)
    period_key: Mapped[str] = mapped_column(String(16), primary_key=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)


class PromotionBudget(Base):
    """What a promotion with a budget has spent (minor units of discount, or points)."""
    __tablename__ = "promotion_budgets"

    promotion: Mapped[str] = mapped_column(String(100), primary_key=True)
    spent: Mapped[int] = mapped_column(default=0)


# ---- events -------------------------------------------------------------------------------------------------

class Event(Base):
    """Durable outbox of domain events, written in the transaction of the change they describe; the
    scenario module consumes them (``processed_at``)."""
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(String(24), index=True)
    key: Mapped[str | None] = mapped_column(String(200), unique=True)
    member_id: Mapped[int | None] = mapped_column(ForeignKey("members.id"), index=True)
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime]
    processed_at: Mapped[dt.datetime | None]

    __table_args__ = (
        CheckConstraint("kind IN ('purchase_confirmed', 'refund', 'member_registered', 'tier_changed', "
                        "'card_status_changed', 'top_up', 'points_expiring')", name="kind"),
    )


members = Member.__table__
cards = Card.__table__
subscriptions = Subscription.__table__
member_updates = MemberUpdate.__table__
balances = Balance.__table__
program_versions = ProgramVersionRow.__table__
purchases = Purchase.__table__
purchase_lines = PurchaseLine.__table__
refunds = Refund.__table__
ledger = LedgerEntry.__table__
point_lots = PointLot.__table__
operations = Operation.__table__
promotion_usage = PromotionUsage.__table__
promotion_budgets = PromotionBudget.__table__
events = Event.__table__
