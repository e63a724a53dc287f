"""What generic gRPC tools ask a real server: reflection under ``grpc.reflection.v1`` (current grpcurl,
Postman, grpcui) and ``v1alpha`` (older ones) lists every service and describes them, and ``Health/List``
answers every service's status, with no traceback in the server log."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
# v1 is v1alpha with the package renamed (same messages, same field numbers), so these encode both
from grpc_reflection.v1alpha import reflection_pb2

from serverutil import start_server

LOYALTY = {"loyalty.v1.Processing", "loyalty.v1.Admin", "loyalty.v1.Segments", "loyalty.v1.Scenarios",
           "loyalty.v1.Keys"}
VERSIONS = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("reflection"))
    yield srv
    srv.stop()


def _ask(target: str, service: str, **request) -> reflection_pb2.ServerReflectionResponse:
    with grpc.insecure_channel(target) as channel:
        info = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return next(iter(info(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10)))


@pytest.mark.parametrize("version", VERSIONS)
def test_reflection_lists_and_describes_every_service(server, version):
    listed = {s.name for s in _ask(server.target, version, list_services="").list_services_response.service}
    assert LOYALTY | {"grpc.health.v1.Health", *VERSIONS} <= listed

    answer = _ask(server.target, version, file_containing_symbol="loyalty.v1.Segments")
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in answer.file_descriptor_response.file_descriptor_proto]
    segments = next(f for f in files if f.name == "loyalty/v1/segments.proto")
    methods = {m.name: m for m in segments.service[0].method}
    assert methods["ExportMembersStream"].server_streaming and not methods["ExportMembers"].server_streaming
    request = next(m for m in segments.message_type if m.name == "ListSegmentsRequest")
    assert [f.name for f in request.field] == ["page_size", "page_token"]


def test_health_list_answers_every_service_and_logs_no_traceback(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = stub.List(health_pb2.HealthListRequest(), timeout=5).statuses
        check = stub.Check(health_pb2.HealthCheckRequest(service="loyalty.v1.Segments"), timeout=5)
    assert set(statuses) == LOYALTY | {""}
    assert {s.status for s in statuses.values()} == {health_pb2.HealthCheckResponse.SERVING}
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in server.log()
