"""Errors the core raises: each names the path of the bad field and why, and never carries a traceback
to a client. The server maps ``InputError`` and ``ProgramError`` to ``INVALID_ARGUMENT``."""

__all__ = ["LoyaltyError", "ProgramError", "InputError"]


class LoyaltyError(ValueError):
    """A bad value at ``path`` (``promotions[3].effect``, ``receipt.lines[0].quantity``)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class ProgramError(LoyaltyError):
    """The program file is invalid."""


class InputError(LoyaltyError):
    """The receipt or member context is invalid."""
