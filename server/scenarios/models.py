"""Tables of the scenario module, on the same ``Base`` as ``loyalty.server.models`` (one metadata, one Alembic
chain: ``migrations/versions/0003_scenarios.py`` creates them).

- ``scenarios``: a validated definition (normalized JSON), its version and whether it is enabled.
- ``scenario_runs``: one member's journey through one scenario. ``state`` active / done / failed; an active
  run is due when ``wake_at <= now`` (a wait is nothing but a later ``wake_at``: durable timers). The unique
  ``(scenario_id, entry_key)`` is the re-entry policy made a constraint.
- ``scenario_step_log``: append-only ``(run, step, outcome)`` rows (triggered, entered, yes, no, completed,
  failed) written in the step's transaction; statistics and funnels are GROUP BYs over it. Append-only so
  that two workers never queue on one counter row.
- ``scenario_outbox``: messages and webhook calls, unique by ``key`` (run, step, visit); delivered by the
  workers with retries and exponential backoff; ``state='dead'`` rows are the dead-letter list.
- ``scenario_events``: the events the module adds itself (``birthday``, ``segment_entered``), the same
  shape as the domain ``events`` outbox.
- ``scenario_cursors``: the durable positions of event consumption (and other small per-module markers).
- ``scenario_segment_watch``: the last seen membership bitmap of a segment named by a ``segment_entered``
  trigger; the difference to the current one is who entered.
- ``promo_codes``: pools of codes; ``issue_key`` makes issuing one idempotent.
- ``batches`` / ``batch_members``: batch points actions: the frozen audience and the progress row.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Boolean, CheckConstraint, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.server.models import Base, Id

__all__ = [
    "Scenario", "ScenarioRun", "ScenarioStepLog", "ScenarioOutbox", "ScenarioEvent", "ScenarioCursor",
    "ScenarioSegmentWatch", "PromoCode", "Batch", "BatchMember", "RUN_STATES", "OUTBOX_STATES", "OUTCOMES",
    "scenarios", "scenario_runs", "scenario_step_log", "scenario_outbox", "scenario_events", "scenario_cursors",
    "scenario_segment_watch", "promo_codes", "batches", "batch_members",
]

RUN_STATES = ("active", "done", "failed")
OUTBOX_STATES = ("pending", "sent", "dead", "skipped")
OUTCOMES = ("triggered", "entered", "yes", "no", "completed", "failed")


class Scenario(Base):
    __tablename__ = "scenarios"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    version: Mapped[int] = mapped_column(default=1)
    definition: Mapped[dict[str, Any]]
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    origin: Mapped[str] = mapped_column(String(10), default="api")       # program | api | cli
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class ScenarioRun(Base):
    __tablename__ = "scenario_runs"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    scenario_id: Mapped[str] = mapped_column(String(100))
    member_id: Mapped[int] = mapped_column(Id, index=True)
    entry_key: Mapped[str] = mapped_column(String(200))
    trigger: Mapped[str] = mapped_column(String(40), default="")
    state: Mapped[str] = mapped_column(String(8), default="active")
    step: Mapped[str] = mapped_column(String(100), default="")
    visit: Mapped[int] = mapped_column(Integer, default=0)          # steps executed so far: part of effect keys
    wake_at: Mapped[dt.datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)       # failures of the current step
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)
    entered_at: Mapped[dt.datetime]      # the time of the event that started the run: condition windows count from it
    updated_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    error: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (
        UniqueConstraint("scenario_id", "entry_key"),
        CheckConstraint("state IN ('active', 'done', 'failed')", name="state"),
        Index("ix_scenario_runs_state_wake_at", "state", "wake_at"),
        Index("ix_scenario_runs_scenario_id_member_id", "scenario_id", "member_id"),
    )


class ScenarioStepLog(Base):
    __tablename__ = "scenario_step_log"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    run_id: Mapped[int] = mapped_column(Id)
    scenario_id: Mapped[str] = mapped_column(String(100))
    step: Mapped[str] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(10))
    at: Mapped[dt.datetime]

    __table_args__ = (
        CheckConstraint("outcome IN ('triggered', 'entered', 'yes', 'no', 'completed', 'failed')", name="outcome"),
        Index("ix_scenario_step_log_scenario_id_step", "scenario_id", "step"),
    )


class ScenarioOutbox(Base):
    __tablename__ = "scenario_outbox"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    run_id: Mapped[int | None] = mapped_column(Id)
    scenario_id: Mapped[str] = mapped_column(String(100), default="")
    step: Mapped[str] = mapped_column(String(100), default="")
    member_id: Mapped[int | None] = mapped_column(Id, index=True)
    channel: Mapped[str] = mapped_column(String(16))                 # email | sms | push | webhook
    transactional: Mapped[bool] = mapped_column(Boolean, default=False)
    recipient: Mapped[str] = mapped_column(String(2000), default="")  # address, phone, member id or URL
    subject: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[str] = mapped_column(Text, default="")
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(8), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime]                             # also the lease of a delivery in flight
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime]
    sent_at: Mapped[dt.datetime | None]

    __table_args__ = (
        CheckConstraint("state IN ('pending', 'sent', 'dead', 'skipped')", name="state"),
        Index("ix_scenario_outbox_state_next_attempt_at", "state", "next_attempt_at"),
    )


class ScenarioEvent(Base):
    __tablename__ = "scenario_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(String(24))
    key: Mapped[str] = mapped_column(String(200), unique=True)
    member_id: Mapped[int] = mapped_column(Id, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime]
    processed_at: Mapped[dt.datetime | None]


class ScenarioCursor(Base):
    __tablename__ = "scenario_cursors"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    position: Mapped[int] = mapped_column(default=0)
    value: Mapped[str] = mapped_column(String(100), default="")
    updated_at: Mapped[dt.datetime]


class ScenarioSegmentWatch(Base):
    __tablename__ = "scenario_segment_watch"

    segment_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[int] = mapped_column(default=0)
    bitmap: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[dt.datetime]


class PromoCode(Base):
    __tablename__ = "promo_codes"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    pool: Mapped[str] = mapped_column(String(100))
    code: Mapped[str] = mapped_column(String(100))
    member_id: Mapped[int | None] = mapped_column(Id)
    issue_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    issued_at: Mapped[dt.datetime | None]

    __table_args__ = (
        UniqueConstraint("pool", "code"),
        Index("ix_promo_codes_pool_issued_at", "pool", "issued_at"),
    )


class Batch(Base):
    """A batch points action and its progress: ``position`` is the highest member id done; each chunk moves
    it in the transaction that writes the chunk's ledger entries, so a killed batch resumes exactly there."""
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))                      # award | deduct
    points: Mapped[int]
    reason: Mapped[str] = mapped_column(Text, default="")
    expiry_days: Mapped[int | None]
    target: Mapped[dict[str, Any]]
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8), default="running")
    total: Mapped[int] = mapped_column(default=0)
    processed: Mapped[int] = mapped_column(default=0)                 # members done (written or skipped)
    written: Mapped[int] = mapped_column(default=0)                   # members with a ledger entry
    points_moved: Mapped[int] = mapped_column(default=0)
    position: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]

    __table_args__ = (
        CheckConstraint("kind IN ('award', 'deduct')", name="kind"),
        CheckConstraint("state IN ('running', 'done')", name="state"),
    )


class BatchMember(Base):
    __tablename__ = "batch_members"

    batch_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    member_id: Mapped[int] = mapped_column(Id, primary_key=True)


scenarios = Scenario.__table__
scenario_runs = ScenarioRun.__table__
scenario_step_log = ScenarioStepLog.__table__
scenario_outbox = ScenarioOutbox.__table__
scenario_events = ScenarioEvent.__table__
scenario_cursors = ScenarioCursor.__table__
scenario_segment_watch = ScenarioSegmentWatch.__table__
promo_codes = PromoCode.__table__
batches = Batch.__table__
batch_members = BatchMember.__table__
