"""Registering a module's servicer (Segments, Scenarios) on a server: on the ``LoyaltyServer`` its methods
get the same handler as Processing and Admin (thread pool, error mapping with rich details, metrics); on a
plain ``grpc.Server`` (tests, embedding) each ``ServiceError`` becomes its status code and message."""
from __future__ import annotations

import re

import grpc

from loyalty.server.errors import ServiceError

__all__ = ["register_servicer"]

_CODES = {"INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT, "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
          "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
          "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION, "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def register_servicer(server, pb2, service: str, servicer) -> None:
    """Serve ``loyalty.v1.<service>`` (described in ``pb2``) with ``servicer``, whose methods are the RPC
    names in snake case, taking the request message and returning the response message."""
    descriptor = pb2.DESCRIPTOR.services_by_name[service]
    methods = {m.name: (getattr(pb2, m.input_type.name), getattr(servicer, _snake(m.name)))
               for m in descriptor.methods}
    if hasattr(server, "_make_handler") and hasattr(server, "server"):     # the LoyaltyServer
        handlers = {name: grpc.unary_unary_rpc_method_handler(server._make_handler(name, request_cls, fn,
                                                                                   server.io_pool))
                    for name, (request_cls, fn) in methods.items()}
    else:
        def plain(request_cls, fn):
            def call(request, context):
                try:
                    return fn(request)
                except ServiceError as exc:
                    # at most about 1 kB: a default client refuses trailers over 8 KiB (RESOURCE_EXHAUSTED)
                    message = exc.message if len(exc.message) <= 1000 else f"{exc.message[:1000]}…"
                    context.abort(_CODES.get(exc.code, grpc.StatusCode.INTERNAL), message)
            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=request_cls.FromString,
                                                       response_serializer=lambda m: m.SerializeToString())
        handlers = {name: plain(request_cls, fn) for name, (request_cls, fn) in methods.items()}
    target = server.server if hasattr(server, "_make_handler") and hasattr(server, "server") else server
    target.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
