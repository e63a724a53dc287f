"""Errors the core raises: each names the path of the bad field and why, and never carries a traceback
to a client. The server maps ``InputError`` and ``ProgramError`` to ``INVALID_ARGUMENT``."""

__all__ = ["LoyaltyError", "ProgramError", "InputError", "quote", "QUOTE_LIMIT"]

# The most of a client's value an error message repeats: enough to recognise it, never the value itself (a
# 10,000-character phone quoted twice, in the message and in the detail, made a trailer default gRPC clients
# refuse, and they saw RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT we sent).
QUOTE_LIMIT = 32


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters of it: a longer string is its first
    ``limit`` characters and its length, ``'+7900000000000000000…' (10000 characters)``."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}… ({len(text)} characters)"


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
