"""The one output module every ``loyalty`` command prints through.

Scripts get JSON on stdout and nothing else there; people get rich tables; errors are one line on stderr
(``error: <path>: <reason>``) and a non-zero exit; long work shows a progress bar on stderr that stays out of
the way when asked to be quiet or when stderr is not a terminal.

JSON has one shape whatever produced it (a library dict or a gRPC response): numbers are JSON numbers (the
int64 fields protobuf's JSON mapping prints as strings are turned back into numbers, by the message's own
descriptor), and every moment is RFC 3339 in UTC with ``Z`` and whole seconds (``2026-03-02T09:30:00Z``):
datetimes, and the text of fields named ``at`` or ``*_at`` that carries an offset. A receipt's own ``at``
is the till's local time (SPEC 6) and stays as given.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from typing import Iterator, Sequence

import click
from google.protobuf.descriptor import FieldDescriptor

__all__ = ["emit_json", "emit_table", "error_exit", "message_dict", "moment", "progress", "rfc3339"]


def emit_json(obj, pretty: bool = False) -> None:
    """Print ``obj`` (plain data, or a protobuf message) as one JSON document on stdout (one line unless
    ``pretty``), moments in RFC 3339 UTC."""
    obj = _moments(message_dict(obj) if hasattr(obj, "DESCRIPTOR") else obj)
    if pretty:
        text = json.dumps(obj, ensure_ascii=False, indent=2, default=_plain)
    else:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_plain)
    click.echo(text)


def rfc3339(moment: dt.datetime) -> str:
    """``2026-03-02T09:30:00Z``: the moment in UTC, whole seconds (a naive datetime is taken as UTC, as
    storage keeps it)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _moments(value, key: str = "", receipt: bool = False):
    """``value`` with every datetime, and every time text under an ``at`` / ``*_at`` key, in RFC 3339 UTC;
    a receipt's ``at`` (the till's local time, SPEC 6) is left as given."""
    if isinstance(value, dict):
        return {k: _moments(v, str(k), key == "receipt") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_moments(v, key) for v in value]
    if isinstance(value, str) and not (key.endswith("_at") or (key == "at" and not receipt)):
        return value
    return moment(value)


def moment(value):
    """``value`` in RFC 3339 UTC when it is a datetime or ISO 8601 text with an offset; else as it is (a
    local time without an offset, a date, "")."""
    if isinstance(value, str) and "T" in value:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
        return rfc3339(parsed) if parsed.tzinfo is not None else value
    return rfc3339(value) if isinstance(value, dt.datetime) else value


def _plain(value):
    """What ``json`` cannot print by itself: dates as ``YYYY-MM-DD``, anything else as text."""
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def message_dict(message) -> dict:
    """A protobuf message as a dict with the proto's field names, zeros included, int64 fields as numbers."""
    from loyalty.clients.client import to_dict
    return _numbers(to_dict(message), message.DESCRIPTOR)


def _numbers(value: dict, descriptor) -> dict:
    """``value`` (protobuf's JSON mapping of a ``descriptor`` message) with its 64-bit integers as ints."""
    for field in descriptor.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            value[field.name] = {k: _number(v, value_field) for k, v in item.items()}
        elif field.is_repeated:
            value[field.name] = [_number(v, field) for v in item]
        else:
            value[field.name] = _number(item, field)
    return value


_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def _number(item, field):
    if field.type in _INT64_TYPES:
        return int(item)
    if field.message_type is not None and isinstance(item, dict) \
            and not field.message_type.full_name.startswith("google.protobuf."):
        return _numbers(item, field.message_type)
    return item


def emit_table(rows: Sequence, columns: Sequence[str], title: str | None = None) -> None:
    """Print ``rows`` (mappings keyed by column name, or sequences in column order) as a table on stdout,
    moments as in JSON (RFC 3339 UTC)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in columns:
        table.add_column(name)
    for row in rows:
        cells = [row.get(name) for name in columns] if isinstance(row, dict) else list(row)
        cells = [_moments(cell, name) for cell, name in zip(cells, columns)]
        table.add_row(*("" if cell is None else str(cell) for cell in cells))
    console = Console()
    console.on_broken_pipe = _broken_pipe       # rich would exit 1 itself; the command's group decides
    console.print(table)


def _broken_pipe() -> None:
    raise BrokenPipeError


def error_exit(message: str, code: int = 2):
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(str(message).split())
    click.echo(f"error: {one_line}", err=True)
    sys.exit(code)


class _Progress:
    def __init__(self, bar=None, task=None):
        self._bar = bar
        self._task = task

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def update(self, completed: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed)


@contextlib.contextmanager
def progress(total: int | None, description: str, quiet: bool = False) -> Iterator[_Progress]:
    """A progress bar on stderr: ``with progress(n, "members") as bar: ... bar.advance()``. A no-op when
    ``quiet`` or when stderr is not a terminal, so scripts and logs stay clean."""
    if quiet or not sys.stderr.isatty():
        yield _Progress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    with bar:
        yield _Progress(bar, bar.add_task(description, total=total))
