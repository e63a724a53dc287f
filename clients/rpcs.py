"""The RPCs the clients call, as data: ``RPCS`` maps each client method name (``confirm_purchase``) to its
:class:`Rpc` (path, request and response classes, idempotency key, streaming), read from the services'
descriptors, and :func:`build_request` turns what a caller gives (a message, a dict, keyword fields) into the
request message exactly as the client sends it.

A dict is checked against the message's descriptor before protobuf parses it, so a typo is a
:class:`LoyaltyError` (INVALID_ARGUMENT) naming the key's path, ``receipt.lnes: unknown field``, and a value
of the wrong type names its field too, never protobuf's ``ParseError``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import uuid
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ._typed import SERVICES
from .codegen import snake
from .errors import invalid_field

__all__ = ["Rpc", "RPCS", "IDEMPOTENCY_KEYS", "build_request"]

# The field a client fills with a random key when the caller leaves it empty, so that every attempt of a
# call carries the same key and the server answers a retry from what it stored (see ``client.py``).
IDEMPOTENCY_KEYS = {
    "RefundPurchase": "refund_id",
    "EnrollMember": "request_id",
    "UpdateMember": "request_id",
    "AdjustPoints": "operation_id",
}


@dataclasses.dataclass(frozen=True)
class Rpc:
    """One RPC: ``name`` is the client method, ``path`` the gRPC method path."""
    name: str
    service: str
    method: str
    request: type[Message]
    response: type[Message]
    key_field: str | None
    streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"


def _load() -> dict[str, Rpc]:
    rpcs: dict[str, Rpc] = {}
    for service_name, module_name in SERVICES:
        module = importlib.import_module(module_name)
        service = module.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]]
        for m in service.methods:
            rpcs[snake(m.name)] = Rpc(snake(m.name), service_name, m.name, getattr(module, m.input_type.name),
                                      getattr(module, m.output_type.name), IDEMPOTENCY_KEYS.get(m.name),
                                      m.server_streaming)
    return rpcs


RPCS: dict[str, Rpc] = _load()


def build_request(name: str, request: Any = None, fields: Mapping[str, Any] | None = None) -> Message:
    """The request of the client method ``name`` from ``request`` (a message, a dict of its fields or None)
    with ``fields`` set over it (None values are left out) and its idempotency key filled when empty: what
    the method sends (for a caller that hands it elsewhere, as the CLI does to a service in process). A
    message that needs nothing of this is sent as it is; otherwise the caller's message is never changed."""
    rpc = RPCS[name]
    given = {field: value for field, value in (fields or {}).items() if value is not None}
    if isinstance(request, rpc.request) and not given and not _key_missing(rpc, request):
        return request                                  # sent as it is: nothing to copy
    message = _message(rpc.request, request)
    for field, value in given.items():
        _set(message, field, value)
    if _key_missing(rpc, message):
        setattr(message, rpc.key_field, uuid.uuid4().hex)
    return message


def _key_missing(rpc: Rpc, message: Message) -> bool:
    return bool(rpc.key_field) and not getattr(message, rpc.key_field)


def _message(cls: type[Message], request: Any) -> Message:
    if request is None:
        return cls()
    if isinstance(request, cls):
        copy = cls()
        copy.CopyFrom(request)
        return copy
    if isinstance(request, Mapping):
        return _parse(cls, request)
    raise TypeError(f"expected {cls.DESCRIPTOR.full_name} or a dict, got {type(request).__name__}")


def _parse(cls: type[Message], data: Mapping[str, Any]) -> Message:
    _check_keys(cls.DESCRIPTOR, data, "")
    try:
        return json_format.ParseDict(data, cls())
    except json_format.ParseError as exc:
        raise invalid_field(*_locate(cls, data, "", exc)) from None


def _set(message: Message, field: str, value: Any) -> None:
    """One keyword field over the request: a message (or a list of them) as given, anything else as the
    dict parser reads it."""
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    target = getattr(message, field)
    if isinstance(value, Message):
        target.CopyFrom(value)
    elif _repeated(descriptor) and any(isinstance(v, Message) for v in value):
        del target[:]
        target.extend(value)
    else:
        message.ClearField(field)
        _check_keys(message.DESCRIPTOR, {field: value}, "")
        try:
            json_format.ParseDict({field: value}, message)
        except json_format.ParseError as exc:
            raise invalid_field(*_locate(type(message), {field: value}, "", exc)) from None


def _check_keys(descriptor: Descriptor, data: Mapping[str, Any], path: str) -> None:
    """Every key of ``data`` (and of the dicts inside it) names a field of ``descriptor``."""
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        field = _fields(descriptor).get(key)
        if field is None:
            raise invalid_field(where, "unknown field")
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        if _repeated(field) and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    _check_keys(field.message_type, item, f"{where}[{i}]")
        elif isinstance(value, Mapping) and not field.message_type.full_name.startswith("google.protobuf."):
            _check_keys(field.message_type, value, where)


def _repeated(field: FieldDescriptor) -> bool:
    """Whether ``field`` is a list (``label`` is gone from protobuf 7's descriptors, ``is_repeated`` new)."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED


@functools.cache
def _fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields by proto name and by JSON name (what ``ParseDict`` accepts), built once."""
    return {**{f.json_name: f for f in descriptor.fields}, **{f.name: f for f in descriptor.fields}}


def _locate(cls: type[Message], data: Mapping[str, Any], path: str,
            exc: json_format.ParseError) -> tuple[str, str]:
    """The path and reason of the value protobuf refused: each field is parsed alone, and a refused one that
    holds a message (or a list of them) is searched inside, so the path ends at the bad leaf with its
    index (``receipt.lines[2].quantity``), which protobuf's own message leaves out."""
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        try:
            json_format.ParseDict({key: value}, cls())
            continue
        except json_format.ParseError as inner:
            exc = inner
        field = _fields(cls.DESCRIPTOR).get(key)
        sub = message_factory.GetMessageClass(field.message_type) if field and field.message_type else None
        if sub is not None and isinstance(value, Mapping):
            return _locate(sub, value, where, exc)
        if sub is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    try:
                        json_format.ParseDict(item, sub())
                    except json_format.ParseError as bad:
                        return _locate(sub, item, f"{where}[{i}]", bad)
        return where, _reason(exc)
    return path or "request", _reason(exc)


def _reason(exc: json_format.ParseError) -> str:
    """protobuf's reason without its chain of "Failed to parse x field: " prefixes."""
    return str(exc).rsplit(" field: ", 1)[-1].rstrip(".") or "invalid value"
