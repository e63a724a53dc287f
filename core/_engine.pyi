"""Typing stub of the compiled receipt core (``_engine.pyx``); semantics in docs/ENGINE.md."""
from typing import Any, Mapping

from .model import Program

__all__ = ["Engine"]

class Engine:
    """A program compiled once into an immutable C snapshot; thread-safe, no global state."""

    @property
    def program(self) -> Program: ...
    def __init__(self, program: Program) -> None: ...
    def calculate(
        self,
        receipt: Mapping[str, Any],
        member: Mapping[str, Any] | None = None,
        budgets_used: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """The answer dict of docs/ENGINE.md ("lines", "totals", "promotions", "hints", "messages",
        "member"). Raises ``loyalty.core.errors.InputError(path, reason)`` on bad input."""
        ...
