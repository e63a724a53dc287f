"""What the lower modules of a running process share: storage, the clock, the live program, caches.

The processing facade builds one :class:`Runtime` and hands it to what runs beside the requests (the periodic
jobs, the segment and scenario modules, the ledger check) instead of itself: they see the four things they use,
typed, and nothing of the use cases.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .db import Database
    from .members import ContextCache
    from .programs import ProgramRegistry
    from .segments.membership import AudienceIndex

__all__ = ["Runtime"]


@dataclasses.dataclass
class Runtime:
    """``db``: the system of record; ``clock``: a zero-argument callable returning an aware ``datetime`` (tests
    pass a simulated one); ``programs``: the live program version; ``contexts``: the member contexts cached in
    this process (to drop after a change made beside the requests); ``audience_index``: the audience
    memberships the core reads (to announce a change to the other processes)."""
    db: "Database"
    clock: Callable[[], dt.datetime]
    programs: "ProgramRegistry"
    contexts: "ContextCache"
    audience_index: "AudienceIndex | None" = None
