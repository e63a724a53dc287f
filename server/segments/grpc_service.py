"""``loyalty.v1.Segments`` over gRPC: each method turns the request message into one ``SegmentService`` call
and its result into the response message. Errors stay ``loyalty.server.errors`` types, so the server maps
them to status codes and rich details exactly as for the Processing and Admin services.

``add_segments_service(server, module)`` is what the gRPC server calls: ``server`` is the transport's
``LoyaltyServer`` (its raw-bytes handlers, error mapping, metrics and I/O pool are reused) or a plain
``grpc.Server``; ``module`` is the process's ``Runtime`` (its database and clock are shared) or a
``SegmentService``.
"""
from __future__ import annotations

import io
import json


from loyalty.server.errors import InvalidArgument
from loyalty.server.grpc_register import register_servicer
from loyalty.server.paging import page_of, paged
from loyalty.server.runtime import Runtime
from loyalty.server.timeutil import iso
from loyalty.v1 import segments_pb2

from .service import SegmentService

__all__ = ["SegmentsServicer", "add_segments_service", "SERVICE_NAME"]

SERVICE_NAME = "loyalty.v1.Segments"


def _segment(d: dict) -> segments_pb2.Segment:
    if d["kind"] == "audience":
        return segments_pb2.Segment(id=d["id"], kind="audience", title=d.get("title") or "",
                                    include=d["include"], exclude=d["exclude"], origin=d.get("origin", ""))
    return segments_pb2.Segment(
        id=d["id"], kind="segment", title=d["title"] or "", type=d["type"],
        conditions_json=json.dumps(d["conditions"], ensure_ascii=False) if d["conditions"] is not None else "",
        schedule=d["schedule"] or "", member_count=d["member_count"], calculated_at=iso(d["calculated_at"]),
        next_run_at=iso(d["next_run_at"]), origin=d["origin"])


def _run(r: dict) -> segments_pb2.SegmentRun:
    return segments_pb2.SegmentRun(
        id=r["id"], segment_id=r["segment_id"], source=r["source"], status=r["status"], phase=r.get("phase", ""),
        started_at=iso(r["started_at"]), finished_at=iso(r["finished_at"]), duration_ms=r["duration_ms"],
        member_count=r["member_count"], added=r["added"], removed=r["removed"], error=r.get("error", ""))


def _changed(r: dict) -> segments_pb2.ChangeMembersResponse:
    return segments_pb2.ChangeMembersResponse(changed=r["changed"], unchanged=r["unchanged"], unknown=r["unknown"],
                                              unknown_refs=r["unknown_refs"], member_count=r["member_count"])


def _before(page) -> int | None:
    """The id below which a newest-first log's next page starts."""
    return None if page.after is None else page.after[0]


class SegmentsServicer:
    """The methods of ``loyalty.v1.Segments`` as plain sync functions: request message in, response out."""

    def __init__(self, segments: SegmentService):
        self.segments = segments

    def _define(self, request, mode):
        spec = {"id": request.id, "title": request.title}
        if request.type:
            spec["type"] = request.type
        if request.conditions_json:
            try:
                spec["conditions"] = json.loads(request.conditions_json)
            except json.JSONDecodeError as exc:
                raise InvalidArgument("conditions_json", f"invalid JSON at column {exc.colno}: {exc.msg}") from None
        if request.schedule:
            spec["schedule"] = request.schedule
        return _segment(self.segments.define_segment(spec, path="", mode=mode, origin="api"))

    def create_segment(self, request):
        return self._define(request, "create")

    def update_segment(self, request):
        return self._define(request, "update")

    def get_segment(self, request):
        return _segment(self.segments.get(request.id))

    def list_segments(self, request):
        """Segments, then audiences, each by id (the key: kind's rank, id)."""
        rows, token = paged(self.segments.list(), page_of(request, "segments", (int, str)),
                            key=lambda d: (int(d["kind"] == "audience"), d["id"]))
        return segments_pb2.ListSegmentsResponse(segments=[_segment(d) for d in rows], next_page_token=token)

    def define_audience(self, request):
        spec = {"id": request.id, "title": request.title, "include": list(request.include),
                "exclude": list(request.exclude)}
        return _segment(self.segments.define_audience(spec, path="", origin="api"))

    def recalculate_segment(self, request):
        return _run(self.segments.recalculate(request.id, source="api"))

    def count_members(self, request):
        return segments_pb2.CountResponse(count=self.segments.count(request.id))

    def preview_members(self, request):
        """A page of the members by id (``limit`` or ``page_size``, 20 by default), resumable with
        ``next_page_token``."""
        columns = list(request.columns) or None
        page = page_of(request, "segment_members", (int,), default=20)
        rows = self.segments.preview_page(request.id, columns, page.size + 1,
                                          after=None if page.after is None else page.after[0])
        cols = self.segments._columns(columns)
        return segments_pb2.PreviewResponse(
            columns=cols, rows=[segments_pb2.PreviewRow(values=[iso(r[c]) for c in cols]) for _, r in rows[:page.size]],
            next_page_token=page.token(rows, key=lambda r: (r[0],)))

    def export_members(self, request):
        out = io.StringIO()
        n = self.segments.export_csv(request.id, out, list(request.columns) or None)
        return segments_pb2.ExportResponse(csv=out.getvalue().encode("utf-8"), count=n)

    def export_members_stream(self, request):
        """A generator of chunks (server streaming): each read from the database as the client takes it."""
        for text, rows in self.segments.export_chunks(request.id, list(request.columns) or None):
            yield segments_pb2.ExportResponse(csv=text.encode("utf-8"), count=rows)

    def get_history(self, request):
        page = page_of(request, "segment_runs", (int,), default=50)
        rows = self.segments.history(request.id, page.size + 1, before=_before(page))
        return segments_pb2.HistoryResponse(runs=[_run(r) for r in rows[:page.size]],
                                            next_page_token=page.token(rows, key=lambda r: (r["id"],)))

    def get_changes(self, request):
        page = page_of(request, "segment_changes", (int,))
        rows = self.segments.changes(request.id, page.size + 1, before=_before(page))
        return segments_pb2.ChangesResponse(changes=[
            segments_pb2.SegmentChange(member_id=c["member_id"], action=c["action"], source=c["source"],
                                       actor=c["actor"], at=iso(c["at"]))
            for c in rows[:page.size]], next_page_token=page.token(rows, key=lambda c: (c["id"],)))

    def add_members(self, request):
        return _changed(self.segments.add_members(request.id, list(request.members), source="api",
                                                  actor=request.actor))

    def remove_members(self, request):
        return _changed(self.segments.remove_members(request.id, list(request.members), source="api",
                                                     actor=request.actor))

    def import_csv(self, request):
        try:
            text = request.csv.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidArgument("csv", "not UTF-8 text") from None
        return _changed(self.segments.import_csv(request.id, text, source="csv", actor=request.actor,
                                                 remove=request.remove))

    def set_tag(self, request):
        r = self.segments.set_tag(request.id, request.tag, external=request.external, replace=request.replace)
        return segments_pb2.SetTagResponse(**r)


def add_segments_service(server, module: SegmentService | Runtime, *,
                         redis_url: str | None = None) -> SegmentsServicer:
    """Register ``loyalty.v1.Segments`` on ``server`` (a ``LoyaltyServer`` or a plain ``grpc.Server``):
    the module given, or one over the process's ``Runtime``."""
    if not isinstance(module, SegmentService):
        module = SegmentService(module.db, clock=module.clock, redis_url=redis_url)
    servicer = SegmentsServicer(module)
    register_servicer(server, segments_pb2, "Segments", servicer)
    return servicer

