"""Paging of every List RPC: ``page_size`` / ``page_token`` in the request, ``next_page_token`` in the answer.

Decided once, here, for every list:

- a list is in a stable order by a unique key (a segment's id, a run's id, ...), and a page token is that
  key of the last item sent, so a page never repeats or skips an item that existed when the first page was
  read, whatever was added since;
- the token is opaque to clients: url-safe base64 of ``[list, *key]`` in JSON. A token that does not decode,
  or that belongs to another list, is INVALID_ARGUMENT naming ``page_token``;
- ``page_size`` 0 is the default (``DEFAULT_PAGE_SIZE``, 100); more than ``MAX_PAGE_SIZE`` (1000) is capped
  to it; a negative one is INVALID_ARGUMENT naming ``page_size``. Requests that had a ``limit`` before
  paging existed keep it: it is the page size when ``page_size`` is 0 (a negative one names ``limit``);
- ``next_page_token`` is empty on the last page. Services read one item more than the page to know.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from loyalty.server.errors import InvalidArgument

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Page", "page_of", "paged", "encode_token"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class Page:
    """The page a request asks for: at most ``size`` items after the item whose key is ``after`` (None: from
    the start)."""
    list_name: str
    size: int
    after: tuple | None

    def token(self, items: Sequence, key: Callable[[Any], tuple]) -> str:
        """``next_page_token`` for ``items`` as read (``size`` + 1 of them at most): the key of the page's
        last item when one more was read, else empty."""
        return encode_token(self.list_name, key(items[self.size - 1])) if len(items) > self.size else ""


def encode_token(list_name: str, key: tuple) -> str:
    return base64.urlsafe_b64encode(json.dumps([list_name, *key]).encode()).decode().rstrip("=")


def _decode_token(token: str, list_name: str, shape: tuple[type, ...]) -> tuple:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raw = None
    if (not isinstance(raw, list) or len(raw) != len(shape) + 1 or raw[0] != list_name
            or not all(type(v) is t for v, t in zip(raw[1:], shape))):
        raise InvalidArgument("page_token", "not a page token of this list (pass next_page_token as it came)")
    return tuple(raw[1:])


def page_of(request, list_name: str, shape: tuple[type, ...], *, default: int = DEFAULT_PAGE_SIZE) -> Page:
    """The page ``request`` asks for; ``shape`` is the types of the list's key (``(str,)``, ``(int,)``)."""
    field, size = ("page_size", request.page_size) if request.page_size else ("limit", getattr(request, "limit", 0))
    if size < 0:
        raise InvalidArgument(field, f"must not be negative, got {size}")
    size = size or default
    after = _decode_token(request.page_token, list_name, shape) if request.page_token else None
    return Page(list_name, min(size, MAX_PAGE_SIZE), after)


def paged(items: Sequence, page: Page, key: Callable[[Any], tuple]) -> tuple[list, str]:
    """One page of a whole list already in its order by ``key`` (ascending): the page's items and the next
    page's token. For the short lists (program versions, segments, scenarios) read whole."""
    start = 0 if page.after is None else next((i for i, x in enumerate(items) if key(x) > page.after), len(items))
    window = list(items[start:start + page.size + 1])
    return window[:page.size], page.token(window, key)
