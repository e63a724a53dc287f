"""The one output module every ``loyalty`` command prints through.

Scripts get JSON on stdout and nothing else there; people get rich tables; errors are one line on stderr
(``error: <path>: <reason>``) and a non-zero exit; long work shows a progress bar on stderr that stays out of
the way when asked to be quiet or when stderr is not a terminal.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Iterator, Sequence

import click

__all__ = ["emit_json", "emit_table", "error_exit", "progress"]


def emit_json(obj, pretty: bool = False) -> None:
    """Print ``obj`` as one JSON document on stdout (one line unless ``pretty``)."""
    if pretty:
        text = json.dumps(obj, ensure_ascii=False, indent=2, default=str)
    else:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)
    click.echo(text)


def emit_table(rows: Sequence, columns: Sequence[str], title: str | None = None) -> None:
    """Print ``rows`` (mappings keyed by column name, or sequences in column order) as a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in columns:
        table.add_column(name)
    for row in rows:
        cells = [row.get(name) for name in columns] if isinstance(row, dict) else list(row)
        table.add_row(*("" if cell is None else str(cell) for cell in cells))
    Console().print(table)


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
