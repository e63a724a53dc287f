"""Tables of the segment module, on the same ``Base`` as ``loyalty.server.models`` (one metadata, one Alembic
chain: ``migrations/versions/0002_segments.py`` creates them).

- ``segments``: a definition (``type`` static / updatable / dynamic, the condition tree, the cron schedule).
- ``audiences``: include / exclude lists of segment ids (a member is in ALL included and NONE excluded).
- ``segment_members``: the stored membership of static and updatable segments, one row per member. It has
  no foreign keys on purpose: a recalculation inserts and deletes up to millions of rows set-based, and a
  per-row constraint trigger would cost more than the query itself (members are never deleted; a deleted
  segment deletes its rows).
- ``segment_changes``: the manual-change log (add / remove / CSV import, who and where from).
- ``segment_runs``: the recalculation history (when, source, count, added, removed, duration) and, while a
  run is going, its phase: the progress indicator.
- ``member_tags``: labels on members; a tag set on a segment's members may be passed to the loyalty side
  as an external audience.
- ``audience_bitmaps``: what the receipt core sees: per audience id (a segment, an audience or an external
  tag) the serialized roaring bitmap of member ids. ``membership_version`` is bumped in the same
  transaction as any change of them; every process reloads its ``AudienceIndex`` when it moves.
- ``message_events``: what happened to messages, per member and channel: ``sent`` written by the scenario
  module's outbox when it hands a message over (``event_id`` NULL), and the events providers report back
  through ``RecordMessageEvents`` (delivered, opened, clicked, bounced, unsubscribed, confirmed by double
  opt-in), each unique by the provider's ``event_id`` so a retried batch is not counted twice. Read by the
  segments' ``messages`` condition and the scenarios' ``message`` condition.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.server.limits import ID_LIMIT
from loyalty.server.models import Base, Id

__all__ = [
    "Segment", "Audience", "SegmentMember", "SegmentChange", "SegmentRun", "MemberTag", "AudienceBitmap",
    "MembershipVersion", "MessageEvent", "SEGMENT_TYPES", "MESSAGE_KINDS",
    "segments", "audiences", "segment_members", "segment_changes", "segment_runs", "member_tags",
    "audience_bitmaps", "membership_version", "message_events",
]

SEGMENT_TYPES = ("static", "updatable", "dynamic")
# what a message event may say (segments' ``messages`` and scenarios' ``message`` conditions test these)
MESSAGE_KINDS = ("sent", "delivered", "opened", "clicked", "bounced", "unsubscribed", "confirmed")


class Segment(Base):
    __tablename__ = "segments"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)   # the id promotions name
    title: Mapped[str] = mapped_column(String(200), default="")
    type: Mapped[str] = mapped_column(String(10))
    conditions: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # None: a static list without conditions
    schedule: Mapped[str | None] = mapped_column(String(100))        # cron, updatable only
    origin: Mapped[str] = mapped_column(String(10), default="api")   # program | api | cli
    member_count: Mapped[int] = mapped_column(default=0)
    calculated_at: Mapped[dt.datetime | None]
    next_run_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]

    __table_args__ = (
        CheckConstraint("type IN ('static', 'updatable', 'dynamic')", name="type"),
    )


class Audience(Base):
    __tablename__ = "audiences"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    include: Mapped[list] = mapped_column(JSON)
    exclude: Mapped[list] = mapped_column(JSON)
    origin: Mapped[str] = mapped_column(String(10), default="api")
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class SegmentMember(Base):
    __tablename__ = "segment_members"

    segment_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    member_id: Mapped[int] = mapped_column(Id, primary_key=True)


class SegmentChange(Base):
    """One manual change of a static segment: ``add`` or ``remove`` of one member."""
    __tablename__ = "segment_changes"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    segment_id: Mapped[str] = mapped_column(String(100), index=True)
    member_id: Mapped[int] = mapped_column(Id)
    action: Mapped[str] = mapped_column(String(6))
    source: Mapped[str] = mapped_column(String(10))                  # api | cli | csv | scenario
    actor: Mapped[str] = mapped_column(String(100), default="")
    at: Mapped[dt.datetime]

    __table_args__ = (
        CheckConstraint("action IN ('add', 'remove')", name="action"),
    )


class SegmentRun(Base):
    """One calculation: ``status`` running / done / failed, ``phase`` while running (the progress)."""
    __tablename__ = "segment_runs"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    segment_id: Mapped[str] = mapped_column(String(100), index=True)
    source: Mapped[str] = mapped_column(String(10))                  # schedule | api | cli | program
    status: Mapped[str] = mapped_column(String(8))
    phase: Mapped[str] = mapped_column(String(20), default="")
    started_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    duration_ms: Mapped[int] = mapped_column(default=0)
    member_count: Mapped[int] = mapped_column(default=0)
    added: Mapped[int] = mapped_column(default=0)
    removed: Mapped[int] = mapped_column(default=0)
    error: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (
        CheckConstraint("status IN ('running', 'done', 'failed')", name="status"),
    )


class MemberTag(Base):
    __tablename__ = "member_tags"

    member_id: Mapped[int] = mapped_column(Id, primary_key=True)
    tag: Mapped[str] = mapped_column(String(100), primary_key=True)
    created_at: Mapped[dt.datetime]

    __table_args__ = (
        Index("ix_member_tags_tag_member_id", "tag", "member_id"),
    )


class AudienceBitmap(Base):
    """The compact membership the core reads: ``kind`` segment | audience | tag."""
    __tablename__ = "audience_bitmaps"

    audience_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    bitmap: Mapped[bytes] = mapped_column(LargeBinary)
    member_count: Mapped[int] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[dt.datetime]

    __table_args__ = (
        CheckConstraint("kind IN ('segment', 'audience', 'tag')", name="kind"),
    )


class MembershipVersion(Base):
    """One row (``id = 1``): bumped whenever any bitmap changes."""
    __tablename__ = "membership_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[dt.datetime]


class MessageEvent(Base):
    __tablename__ = "message_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    member_id: Mapped[int] = mapped_column(Id)
    channel: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))
    at: Mapped[dt.datetime]                                          # when it happened (the provider's time)
    event_id: Mapped[str | None] = mapped_column(String(ID_LIMIT), unique=True)   # the provider's id; NULL: ours
    message_id: Mapped[str | None] = mapped_column(String(200))     # our outbox key, or the provider's id
    scenario_id: Mapped[str | None] = mapped_column(String(100))
    recorded_at: Mapped[dt.datetime | None]                          # when a provider's event reached us

    __table_args__ = (
        CheckConstraint("kind IN ('sent', 'delivered', 'opened', 'clicked', 'bounced', 'unsubscribed', "
                        "'confirmed')", name="kind"),
        Index("ix_message_events_member_id_kind_at", "member_id", "kind", "at"),
    )


segments = Segment.__table__
audiences = Audience.__table__
segment_members = SegmentMember.__table__
segment_changes = SegmentChange.__table__
segment_runs = SegmentRun.__table__
member_tags = MemberTag.__table__
audience_bitmaps = AudienceBitmap.__table__
membership_version = MembershipVersion.__table__
message_events = MessageEvent.__table__
