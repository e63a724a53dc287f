"""Build-time generator of the clients' typed methods (``loyalty/clients/_typed.py``, never committed).

Why generated, not written by hand: every RPC of every ``loyalty.v1`` service gets its method on both clients
the moment its ``.proto`` changes (the Admin RPCs other work adds, a new List), with the request fields as
typed keyword arguments and the proto's own comment as the docstring, and nothing can drift out of step.
Why at build time, not at run time: editors and type checkers read the file; methods attached at run time
were invisible to them. ``setup.py`` compiles the protos to one ``FileDescriptorSet`` and calls
:func:`write_module`; this module imports nothing of ``loyalty`` (it runs before the package exists).

What is generated, for each RPC ``Name`` (``snake`` = ``name``):

- ``SyncMethods.snake(request=None, /, *, <fields>, timeout=None, retries=None) -> Response`` and the same
  ``async def`` on ``AsyncMethods``; a server-streaming RPC returns an iterator of its messages instead;
- for a paged RPC (the request has ``page_token``, the response ``next_page_token`` and one repeated message
  field, its items), ``iter_<what>`` (``list_segments`` -> ``iter_segments``) yielding the items of every page;
- ``SERVICES``: each service's full name and the ``*_pb2`` module that describes it, which
  ``loyalty.clients.rpcs`` reads to build its table of RPCs.
"""
from __future__ import annotations

import keyword
import pathlib
import re
import textwrap

from google.protobuf import descriptor_pb2

FDP = descriptor_pb2.FieldDescriptorProto
PACKAGE = "loyalty.v1"
# keyword arguments every method takes itself; a field with such a name is given through ``request``
RESERVED = {"self", "request", "timeout", "retries"}
_SCALARS = {
    FDP.TYPE_DOUBLE: "float", FDP.TYPE_FLOAT: "float", FDP.TYPE_BOOL: "bool", FDP.TYPE_STRING: "str",
    FDP.TYPE_BYTES: "bytes", FDP.TYPE_ENUM: "int | str",
}
PAGE_TOKEN, NEXT_PAGE_TOKEN = "page_token", "next_page_token"


def snake(name: str) -> str:
    """``RecordMessageEvents`` -> ``record_message_events`` (the servers' rule, ``grpc_register.snake``)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def iterator_name(method: str) -> str:
    """The name of a paged RPC's item iterator: ``list_segments`` -> ``iter_segments``."""
    verb, _, rest = snake(method).partition("_")
    return f"iter_{rest}" if verb in ("list", "get") and rest else f"iter_{snake(method)}"


class _Types:
    """Python names of the messages of a descriptor set: ``.loyalty.v1.Receipt`` -> ``receipt_pb2.Receipt``."""

    def __init__(self, files):
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.python: dict[str, str] = {}
        self.modules: dict[str, str] = {}           # alias -> import line
        self.module_of: dict[str, str] = {}         # file name -> dotted module
        for f in files:
            package_path, _, base = f.name.rpartition("/")
            alias = base.removesuffix(".proto") + "_pb2"
            self.modules[alias] = f"from {package_path.replace('/', '.')} import {alias}"
            self.module_of[f.name] = f"{package_path.replace('/', '.')}.{alias}"
            for message in f.message_type:
                self._add(f".{f.package}", alias, message)

    def _add(self, scope: str, prefix: str, message) -> None:
        full = f"{scope}.{message.name}"
        self.messages[full] = message
        self.python[full] = f"{prefix}.{message.name}"
        for nested in message.nested_type:
            self._add(full, f"{prefix}.{message.name}", nested)

    def annotation(self, field) -> str:
        """The type a keyword argument for ``field`` accepts (a message also as a dict of its fields)."""
        if field.type == FDP.TYPE_MESSAGE:
            entry = self.messages[field.type_name]
            if entry.options.map_entry:
                return "Mapping[Any, Any]"
            one = f"{self.python[field.type_name]} | Mapping[str, Any]"
        else:
            one = _SCALARS.get(field.type, "int")
        if field.label == FDP.LABEL_REPEATED:
            return f"Sequence[{one}]"
        return one


def _comments(f) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): (loc.leading_comments or loc.trailing_comments).strip()
            for loc in f.source_code_info.location if loc.leading_comments or loc.trailing_comments}


def _docstring(rpc: str, service: str, comment: str, request: str, extra: str, indent: str) -> str:
    paragraphs = [f"``{rpc}`` of ``{service}``.", " ".join(comment.split()),
                  f"``request`` is a ``{request}`` or a dict of its fields, or give the fields as keyword "
                  "arguments (they are set over ``request``); an unknown key is a ``LoyaltyError`` naming it. "
                  "``timeout`` / ``retries`` override the client's. " + extra]
    text = "\n\n".join(textwrap.fill(p.strip(), 100, initial_indent=indent, subsequent_indent=indent)
                        for p in paragraphs if p)
    return f'{indent}"""{text.lstrip()}\n{indent}"""'


class _Method:
    """One RPC as the generator needs it."""

    def __init__(self, types: _Types, service: str, method, comment: str):
        self.rpc = method.name
        self.name = snake(method.name)
        self.service = service
        self.comment = comment
        self.request_type = method.input_type.lstrip(".")
        self.request = types.python[method.input_type]
        self.response = types.python[method.output_type]
        self.streaming = method.server_streaming
        fields = types.messages[method.input_type].field
        self.kwargs = [(f.name, types.annotation(f)) for f in fields
                       if f.name not in RESERVED and not keyword.iskeyword(f.name)]
        response = types.messages[method.output_type]
        # the items: the one repeated message field (PreviewMembers' ``rows`` beside its ``columns``)
        repeated = [f for f in response.field if f.label == FDP.LABEL_REPEATED and f.type == FDP.TYPE_MESSAGE]
        paged = (any(f.name == PAGE_TOKEN for f in fields) and len(repeated) == 1
                 and any(f.name == NEXT_PAGE_TOKEN for f in response.field))
        self.items = (repeated[0].name, types.python[repeated[0].type_name]) if paged else None

    def signature(self, kwargs) -> str:
        params = [f"        {name}: {ann} | None = None," for name, ann in kwargs]
        return "\n".join([
            "        self,",
            f"        request: {self.request} | Mapping[str, Any] | None = None,",
            "        /,",
            "        *,",
            *params,
            "        timeout: float | None = None,",
            "        retries: int | None = None,",
        ])

    @staticmethod
    def fields_dict(kwargs) -> str:
        return "{" + ", ".join(f'"{name}": {name}' for name, _ in kwargs) + "}"


def _method_source(m: _Method, is_async: bool) -> list[str]:
    fields = m.fields_dict(m.kwargs)
    if m.streaming:
        returns = f"{'AsyncIterator' if is_async else 'Iterator'}[{m.response}]"
        doc = _docstring(m.rpc, m.service, m.comment, m.request_type,
                         "Server streaming: the messages are yielded as they arrive.", "        ")
        head = f"    def {m.name}(\n{m.signature(m.kwargs)}\n    ) -> {returns}:"
        call = f"        return self._invoke_stream(\"{m.name}\", request, {fields}, timeout, retries)"
    else:
        doc = _docstring(m.rpc, m.service, m.comment, m.request_type, "", "        ")
        prefix = "async def" if is_async else "def"
        head = f"    {prefix} {m.name}(\n{m.signature(m.kwargs)}\n    ) -> {m.response}:"
        call = (f"        return {'await ' if is_async else ''}self._invoke(\"{m.name}\", request, {fields}, "
                "timeout, retries)")
    out = [head, doc, call, ""]
    if m.items is not None:
        out += _iterator_source(m, is_async)
    return out


def _iterator_source(m: _Method, is_async: bool) -> list[str]:
    field, item = m.items
    kwargs = [(n, a) for n, a in m.kwargs if n != PAGE_TOKEN]
    returns = f"{'AsyncIterator' if is_async else 'Iterator'}[{item}]"
    doc = _docstring(m.rpc, m.service, m.comment, m.request_type,
                     f"Every page: yields each of ``{field}``, asking for the next page until "
                     "``next_page_token`` is empty (``page_size`` sets the page's size).", "        ")
    return [f"    def {iterator_name(m.rpc)}(\n{m.signature(kwargs)}\n    ) -> {returns}:", doc,
            f"        return self._invoke_pages(\"{m.name}\", \"{field}\", request, {m.fields_dict(kwargs)}, "
            "timeout, retries)", ""]


def generate(descriptor_set: bytes) -> str:
    """The source of ``_typed.py`` for the services of package ``loyalty.v1`` in ``descriptor_set``."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    types = _Types(fds.file)
    methods: list[_Method] = []
    services: list[tuple[str, str]] = []
    for f in fds.file:
        if f.package != PACKAGE:
            continue
        comments = _comments(f)
        for si, service in enumerate(f.service):
            full = f"{f.package}.{service.name}"
            services.append((full, types.module_of[f.name]))
            methods += [_Method(types, full, m, comments.get((6, si, 2, mi), ""))
                        for mi, m in enumerate(service.method)]
    used = sorted(types.modules.values())
    lines = [
        '"""Generated by ``loyalty/clients/codegen.py`` at build time from the ``.proto`` files: do not edit.',
        "",
        "The typed methods of :class:`loyalty.clients.LoyaltyClient` (``SyncMethods``) and",
        ':class:`loyalty.clients.AsyncLoyaltyClient` (``AsyncMethods``), one per RPC."""',
        "from __future__ import annotations",
        "",
        "from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence",
        "from typing import Any",
        "",
        *used,
        "",
        "# (service, module of its descriptor)",
        "SERVICES = (",
        *[f'    ("{name}", "{module}"),' for name, module in services],
        ")",
        "",
    ]
    for cls, is_async in (("SyncMethods", False), ("AsyncMethods", True)):
        lines += ["", f"class {cls}:",
                  f'    """One {"coroutine " if is_async else ""}method per RPC; the client class supplies '
                  'the transport."""', "",
                  "    _invoke: Callable[..., Any]",
                  "    _invoke_stream: Callable[..., Any]",
                  "    _invoke_pages: Callable[..., Any]", ""]
        for m in methods:
            lines += _method_source(m, is_async)
    return "\n".join(lines).rstrip() + "\n"


def write_module(descriptor_set: bytes, target: pathlib.Path) -> None:
    """Write ``target`` when its text changes (an unchanged file keeps its time, so nothing rebuilds)."""
    text = generate(descriptor_set)
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
