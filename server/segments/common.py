"""Small helpers the parts of the segment service share: member-id temporary tables (the set-based path of
calculations, imports and tags), the id check of segments, audiences and tags, the chunk size of bulk reads
and writes, and the progress callback's type."""
from __future__ import annotations

import uuid
from typing import Callable

from sqlalchemy import BigInteger, Column, MetaData, Table

from loyalty.server.errors import InvalidArgument

from .conditions import _NAME_RE

__all__ = ["Progress"]

_CHUNK = 5000

Progress = Callable[[str, int, int], None]      # (phase, done, total)


def _id(value, path: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidArgument(path, f"an id of 1-100 letters, digits, _ . - is required, got {value!r}")
    return value


def _temp_ids(conn) -> Table:
    t = Table(f"tmp_seg_{uuid.uuid4().hex[:10]}", MetaData(), Column("member_id", BigInteger),
              prefixes=["TEMPORARY"])
    t.create(conn)
    return t
