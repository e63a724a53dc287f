"""Tables of the security module, on the same ``Base`` as ``loyalty.server.models`` (one metadata, one Alembic
chain: ``migrations/versions/0008_sec.py`` creates them).

- ``api_keys``: one credential per row: an API key (``kind='key'``: ``secret_hash`` is the SHA-256 of its
  secret, the secret itself is never stored) or a registered client certificate (``kind='certificate'``:
  ``name`` is the certificate's subject, no secret). ``scopes`` and ``stores`` are what its principal may do;
  ``expires_at`` ends an old key's grace period after a rotation; ``revoked_at`` ends it at once. ``revision``
  is the ``api_key_state.revision`` of the row's last change.
- ``api_key_state``: one row, the revision of the last change to any key: every process polls it (one row,
  one index-free read) and reloads only the rows changed since the revision it holds.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.server.models import Base, UTCDateTime

__all__ = ["ApiKey", "ApiKeyState", "api_keys", "api_key_state", "KEY_KINDS"]

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
