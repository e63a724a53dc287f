"""The standard services beside ours: health with ``List``, and reflection under both of its names."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["HealthWithList", "REFLECTION_V1", "enable_reflection"]


class HealthWithList(health.aio.HealthServicer):
    """grpcio-health-checking's asyncio servicer, plus ``List`` (its own answers UNIMPLEMENTED, with a
    traceback in the log): every service's status, as ``Check`` answers it, kept as the statuses are set."""

    def __init__(self):
        super().__init__()
        self._statuses = {"": health_pb2.HealthCheckResponse.SERVING}
        self._final = False

    async def set(self, service: str, status) -> None:
        if not self._final:
            self._statuses[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._final = True
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._statuses.items()})


# grpcio-reflection implements v1alpha only; v1 (grpc.reflection.v1.ServerReflection, what current grpcurl,
# Postman and grpcui ask first) is the same protocol with the package renamed: identical messages, field
# numbers and semantics, so the v1alpha servicer answers it, registered under the v1 name.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(server, service_names: tuple[str, ...], guarded=None) -> None:
    """Serve reflection as ``grpc.reflection.v1`` and ``v1alpha``, both listing ``service_names`` and
    themselves; ``guarded(names)``: the servicer to use instead of the open one (admin credentials only)."""
    names = service_names + (REFLECTION_V1, reflection.SERVICE_NAME)
    servicer = guarded(names) if guarded is not None else reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(tuple(grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
                                          for name in (REFLECTION_V1, reflection.SERVICE_NAME)))
