"""The Admin RPCs of the audit log, the operation limits and personal data, a use case of ``ProcessingService``
over the typed ``Runtime`` (storage, clock, cached contexts, audience index); the decisions are in ``audit``,
``limits`` and ``privacy``."""
from __future__ import annotations

import datetime as dt

from loyalty.core.errors import quote
from loyalty.v1 import admin_pb2

from ..timeutil import iso
from ..runtime import Runtime
from ..paging import encode_token, page_of
from ..errors import InvalidArgument
from . import audit, limits, privacy

__all__ = ["Security", "parse_since"]


def parse_since(text: str, path: str = "since") -> dt.datetime | None:
    """An ISO date (its midnight) or datetime; without an offset it is UTC. Empty: None."""
    text = text.strip()
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(path, f"expected an ISO date or datetime such as 2026-12-03T10:00:00+03:00, "
                                    f"got {quote(text)}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


class Security:
    """ListAudit, ListLimitBreaches, EraseMember, ExportMember."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def list_audit(self, request) -> admin_pb2.ListAuditResponse:
        """The audit log oldest first, from ``since``, of ``actor``, a page at a time (``paging``)."""
        since = parse_since(request.since)
        page = page_of(request, "audit", (int,))
        with self.rt.db.read() as conn:
            rows = audit.listing(conn, since=since, actor=request.actor.strip(), limit=page.size + 1,
                                 after=page.after[0] if page.after else 0)
        return admin_pb2.ListAuditResponse(
            entries=[admin_pb2.AuditEntry(**{**row, "at": iso(row["at"])}) for row in rows[:page.size]],
            next_page_token=page.token(rows, key=lambda row: (row["id"],)))

    def list_limit_breaches(self, request) -> admin_pb2.ListLimitBreachesResponse:
        """Confirms past a soft operation limit, newest first."""
        since = parse_since(request.since)
        page = page_of(request, "limit_breaches", (int,))
        with self.rt.db.read() as conn:
            rows = limits.listing(conn, since=since, limit=page.size + 1,
                                  before=page.after[0] if page.after else None)
        # newest first: the key that orders the pages is the id counted down
        token = encode_token("limit_breaches", (rows[page.size - 1]["id"],)) if len(rows) > page.size else ""
        rows = rows[:page.size]
        return admin_pb2.ListLimitBreachesResponse(next_page_token=token, breaches=[admin_pb2.LimitBreach(
            id=r["id"], at=iso(r["at"]), limit=r["limit"], threshold=r["threshold"], value=r["value"],
            member_id=str(r["member_id"] or ""), card=r["card"] or "", store=r["store"], terminal=r["terminal"],
            number=r["number"], purchase_id=str(r["purchase_id"] or ""), receipt_date=r["receipt_date"].isoformat())
            for r in rows])

    def erase_member(self, request) -> admin_pb2.EraseMemberResponse:
        """Erase the personal data of the member holding ``card`` (``privacy.erase``)."""
        done = privacy.erase(self.rt.db, request.card, request.reason, self.rt.clock())
        if not done["replayed"]:
            self.rt.contexts.invalidate(done["member_id"])
            self.rt.audience_index.announce()      # the other processes' cached contexts hold the card
        return admin_pb2.EraseMemberResponse(member_id=str(done["member_id"]), erased_at=iso(done["erased_at"]),
                                             replayed=done["replayed"], cards=done["cards"])

    def export_member(self, request) -> admin_pb2.ExportMemberResponse:
        """Everything held about the member holding ``card`` as JSON (``privacy.export``); who read it is
        audited."""
        member_id, document = privacy.export(self.rt.db, request.card)
        self.rt.db.run_write(audit.record, "ExportMember", f"member:{member_id}", self.rt.clock())
        return admin_pb2.ExportMemberResponse(member_id=str(member_id), json=document.decode())
