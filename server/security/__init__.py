"""Who is calling: the principal of a call, as the edge established it.

The edge authenticates every call (an API key, an OIDC access token, a client certificate) into a
:class:`Principal` and runs the call's work inside :func:`acting_as`; anything below it (the audit log, store
checks of a ``pos`` key) reads :func:`current` instead of having the caller threaded through every signature.
Without authentication (``--auth off``, tests calling the service directly) :func:`current` is ``LOCAL``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

__all__ = ["Principal", "LOCAL", "SCOPES", "acting_as", "current"]

# The scopes of SPEC section 10 / issue 13: what a credential may do.
SCOPES = ("pos", "integration", "admin", "read")


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``name`` is what the audit log records as the actor (a key's name, a token's
    subject, a certificate's subject); ``kind`` how it was proven (``key``, ``token``, ``certificate``,
    ``local``); ``stores`` the stores a ``pos`` credential is bound to (empty: every store)."""
    name: str
    kind: str
    scopes: frozenset[str]
    stores: frozenset[str] = frozenset()

    def allows(self, scope: str) -> bool:
        return scope in self.scopes

    def may_serve_store(self, store: str) -> bool:
        return not self.stores or store in self.stores


# The caller when authentication is off or the service is called in-process (the CLI on a database, tests).
LOCAL = Principal("local", "local", frozenset(SCOPES))

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("loyalty_principal", default=LOCAL)


@contextlib.contextmanager
def acting_as(principal: Principal):
    """Run the enclosed work (on the thread that does it) as ``principal``."""
    token = _current.set(principal)
    try:
        yield principal
    finally:
        _current.reset(token)


def current() -> Principal:
    """The principal of the call being served on this thread (``LOCAL`` outside any call)."""
    return _current.get()
