"""Tables of the security module, on the same ``Base`` as ``loyalty.server.models`` (one metadata, one Alembic
chain: ``migrations/versions/0008_sec.py`` and ``0009_audit.py`` create them).

- ``api_keys``: one credential per row: an API key (``kind='key'``: ``secret_hash`` is the SHA-256 of its
  secret, the secret itself is never stored) or a registered client certificate (``kind='certificate'``:
  ``name`` is the certificate's subject, no secret). ``scopes`` and ``stores`` are what its principal may do;
  ``expires_at`` ends an old key's grace period after a rotation; ``revoked_at`` ends it at once. ``revision``
  is the ``api_key_state.revision`` of the row's last change.
- ``api_key_state``: one row, the revision of the last change to any key: every process polls it (one row,
  one index-free read) and reloads only the rows changed since the revision it holds.
- ``audit_log``: who did what (every admin change and manual points operation, and every refused admin call),
  written in the transaction of the change; append-only: no code path updates or deletes it, and a trigger
  refuses UPDATE and DELETE on both PostgreSQL and SQLite.
- ``limit_breaches``: confirms that went past a soft operation limit, for review (``loyalty limits list``); a
  hard limit refuses the confirm and leaves no row (nothing of a refused confirm is written).
- ``member_erasures``: one row per card of an erased member: a digest of its number, when, why, so the same
  request again answers the same erasure instead of "not found" (the number itself is gone).
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.server.models import Base, Id, UTCDateTime

__all__ = ["ApiKey", "ApiKeyState", "api_keys", "api_key_state", "KEY_KINDS", "AuditEntry", "LimitBreach",
           "MemberErasure", "audit_log", "limit_breaches", "member_erasures"]

KEY_KINDS = ("key", "certificate")


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("kind IN ('key', 'certificate')", name="kind"),
        Index("ix_api_keys_revision", "revision"),
        Index("ix_api_keys_name", "name"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    scopes: Mapped[Any] = mapped_column(JSON)                 # a list of SCOPES
    stores: Mapped[Any] = mapped_column(JSON)                 # a list of store ids; empty: every store
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    replaced_by: Mapped[str | None] = mapped_column(String(32))
    revision: Mapped[int] = mapped_column(Integer)


class ApiKeyState(Base):
    __tablename__ = "api_key_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)


api_keys = ApiKey.__table__
api_key_state = ApiKeyState.__table__


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(200), index=True)    # a key's name, a token's subject, "local"
    actor_kind: Mapped[str] = mapped_column(String(20))            # key | token | certificate | local
    rpc: Mapped[str] = mapped_column(String(64))                   # the RPC, or the CLI's operation
    target: Mapped[str] = mapped_column(String(200))               # member:12, segment:vip, program:7 ...
    digest: Mapped[str] = mapped_column(String(64))                # sha256 of the request, secrets left out
    outcome: Mapped[str] = mapped_column(String(32))               # OK, or the status code of a refusal
    detail: Mapped[str] = mapped_column(Text, default="")          # a refusal's message


class LimitBreach(Base):
    __tablename__ = "limit_breaches"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(index=True)
    limit: Mapped[str] = mapped_column(String(40))                 # card_daily_confirms ...
    threshold: Mapped[int]                                         # the soft limit
    value: Mapped[int]                                             # what the confirm brought the count to
    member_id: Mapped[int | None]
    card: Mapped[str | None] = mapped_column(String(64))
    store: Mapped[str] = mapped_column(String(64))
    terminal: Mapped[str] = mapped_column(String(64))
    number: Mapped[str] = mapped_column(String(64))
    purchase_id: Mapped[int | None]
    receipt_date: Mapped[dt.date]

    __table_args__ = (Index("ix_limit_breaches_member_id", "member_id"),)


class MemberErasure(Base):
    __tablename__ = "member_erasures"

    card_digest: Mapped[str] = mapped_column(String(64), primary_key=True)   # one row per card of the member
    member_id: Mapped[int] = mapped_column(Id, index=True)
    reason: Mapped[str] = mapped_column(String(500))
    erased_at: Mapped[dt.datetime]


audit_log = AuditEntry.__table__
limit_breaches = LimitBreach.__table__
member_erasures = MemberErasure.__table__
