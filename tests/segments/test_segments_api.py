"""The ``loyalty.v1.Segments`` gRPC service on loopback (a plain ``grpc.server`` over SQLite): create with a
bad condition is INVALID_ARGUMENT naming the path; create, recalculate, count, preview, export, history,
static changes and a tag round-trip through the wire."""
from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest

from helpers.segments import add_member
from loyalty.server.segments.grpc_service import add_segments_service
from loyalty.v1 import segments_pb2 as pb, segments_pb2_grpc


@pytest.fixture
def database_url(tmp_path):     # SQLite only: the gRPC mapping does not depend on the database
    return f"sqlite:///{tmp_path / 'api.db'}"


@pytest.fixture
def stub(segsvc):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    add_segments_service(server, segsvc)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield segments_pb2_grpc.SegmentsStub(channel)
    finally:
        channel.close()
        server.stop(0)


def test_segments_over_grpc(segsvc, stub):
    with segsvc.db.engine.begin() as c:
        add_member(c, 1, active=500)
        add_member(c, 2, active=50)
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateSegment(pb.DefineSegmentRequest(id="x", type="updatable", conditions_json=json.dumps(
            {"all": [{"points": {"active": {"gte": "lots"}}}]})))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conditions.all[0].points.active.gte" in e.value.details()
    seg = stub.CreateSegment(pb.DefineSegmentRequest(id="rich", type="updatable", conditions_json=json.dumps(
        {"points": {"active": {"gte": 100}}}), schedule="0 3 * * *"))
    assert (seg.type, seg.next_run_at) == ("updatable", "2026-03-03T03:00:00+00:00")
    run = stub.RecalculateSegment(pb.RecalculateSegmentRequest(id="rich"))
    assert (run.member_count, run.added, run.removed) == (1, 1, 0)
    assert stub.CountMembers(pb.SegmentRef(id="rich")).count == 1
    prev = stub.PreviewMembers(pb.PreviewRequest(id="rich", columns=["member_id", "card", "active_points"]))
    assert [list(r.values) for r in prev.rows] == [["1", "C1", "500"]]
    assert stub.ExportMembers(pb.ExportRequest(id="rich", columns=["card"])).csv == b"card\r\nC1\r\n"
    assert [r.added for r in stub.GetHistory(pb.HistoryRequest(id="rich")).runs] == [1]
    stub.CreateSegment(pb.DefineSegmentRequest(id="list", type="static"))
    r = stub.ImportCsv(pb.ImportCsvRequest(id="list", csv=b"phone\n79000000002\n", actor="ops"))
    assert (r.changed, r.member_count) == (1, 1)
    assert [(c.member_id, c.action, c.source) for c in stub.GetChanges(pb.HistoryRequest(id="list")).changes] == [
        (2, "add", "csv")]
    with pytest.raises(grpc.RpcError) as e:
        stub.RecalculateSegment(pb.RecalculateSegmentRequest(id="list"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as e:
        stub.CountMembers(pb.SegmentRef(id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    t = stub.SetTag(pb.SetTagRequest(id="rich", tag="q2-offer", external=True))
    assert (t.tagged, t.member_count, t.external) == (1, 1, True)


def test_preview_pages_through_every_member_once_by_id(segsvc, stub):
    """PreviewMembers is paged like every list: 7 rich members of 9 read 3 at a time come back by id, each
    once, whether or not ``member_id`` is a column; a member joining behind the cursor is not repeated; a
    token of another list is INVALID_ARGUMENT naming ``page_token``; ``limit`` stays the page size."""
    with segsvc.db.engine.begin() as c:
        for mid in range(1, 10):
            add_member(c, mid, active=0 if mid in (4, 8) else 100 + mid)
    stub.CreateSegment(pb.DefineSegmentRequest(id="rich", type="dynamic", conditions_json=json.dumps(
        {"points": {"active": {"gte": 100}}})))
    cards, token, pages = [], "", 0
    while True:
        page = stub.PreviewMembers(pb.PreviewRequest(id="rich", columns=["card"], page_size=3, page_token=token))
        assert list(page.columns) == ["card"] and len(page.rows) <= 3
        cards += [r.values[0] for r in page.rows]
        pages += 1
        if pages == 1:
            with segsvc.db.engine.begin() as c:
                add_member(c, 2_000, active=500)     # joins after the first page, at the end by id
        token = page.next_page_token
        if not token:
            break
    assert cards == ["C1", "C2", "C3", "C5", "C6", "C7", "C9", "C2000"] and pages == 3
    assert [r.values for r in stub.PreviewMembers(pb.PreviewRequest(id="rich", limit=2)).rows][1][0] == "2"
    assert len(stub.PreviewMembers(pb.PreviewRequest(id="rich")).rows) == 8      # 20 by default
    # the default columns read balances beside a condition that joins them (once INTERNAL: no FROM clause)
    csv = stub.ExportMembers(pb.ExportRequest(id="rich")).csv.decode().splitlines()
    assert csv[0] == "member_id,card,first_name,last_name,gender,city,tier,active_points"
    assert csv[1:3] == ["1,C1,M1,Test,female,Moscow,Basic,101", "2,C2,M2,Test,female,Moscow,Basic,102"]
    history_token = stub.GetHistory(pb.HistoryRequest(id="rich", page_size=1)).next_page_token
    with pytest.raises(grpc.RpcError) as e:
        stub.PreviewMembers(pb.PreviewRequest(id="rich", page_token="bm90LWEtdG9rZW4"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.PreviewMembers(pb.PreviewRequest(id="rich", page_size=-1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in e.value.details()
    assert history_token == ""
