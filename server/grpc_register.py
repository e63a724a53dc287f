"""Registering a module's servicer (Segments, Scenarios) on a server: on the ``LoyaltyServer`` its methods
get the same handler as Processing and Admin (thread pool, error mapping with rich details, metrics); on a
plain ``grpc.Server`` (tests, embedding) each ``ServiceError`` becomes the same status (``status.status_for``)."""
from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import grpc

from loyalty.server.errors import ServiceError
from loyalty.server.status import status_for

__all__ = ["register_servicer", "snake", "ModuleHost"]


@runtime_checkable
class ModuleHost(Protocol):
    """A server that serves a module's methods with its own handlers (the ``LoyaltyServer``)."""

    def add_module_service(self, full_name: str, methods: dict) -> None:
        """Serve ``methods`` (RPC name -> ``(request class, fn(request) -> response, server streaming)``; a
        streaming ``fn`` returns a generator of responses) as ``full_name``."""

def snake(name: str) -> str:
    """An RPC's method name in Python: ``RecordMessageEvents`` -> ``record_message_events``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def register_servicer(server, pb2, service: str, servicer) -> None:
    """Serve ``loyalty.v1.<service>`` (described in ``pb2``) with ``servicer``, whose methods are the RPC
    names in snake case, taking the request message and returning the response message (a server-streaming
    RPC: a generator of them)."""
    descriptor = pb2.DESCRIPTOR.services_by_name[service]
    methods = {m.name: (getattr(pb2, m.input_type.name), getattr(servicer, snake(m.name)), m.server_streaming)
               for m in descriptor.methods}
    if isinstance(server, ModuleHost):                          # the LoyaltyServer: its own handlers
        server.add_module_service(descriptor.full_name, methods)
        return

    def plain(request_cls, fn, streaming):
        def call(request, context):
            try:
                return fn(request)
            except ServiceError as exc:
                context.abort_with_status(status_for(exc))

        def stream(request, context):
            try:
                yield from fn(request)
            except ServiceError as exc:
                context.abort_with_status(status_for(exc))
        kind = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        return kind(stream if streaming else call, request_deserializer=request_cls.FromString,
                    response_serializer=lambda m: m.SerializeToString())
    handlers = {name: plain(*spec) for name, spec in methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
