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
