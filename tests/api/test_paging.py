"""``loyalty.server.paging``: page size default, cap and sign; tokens opaque, bound to their list and to the
key's shape; a page of a whole list continues after the last key sent, whatever was added before it."""
from __future__ import annotations

import pytest

from loyalty.server.errors import InvalidArgument
from loyalty.server.paging import MAX_PAGE_SIZE, encode_token, page_of, paged
from loyalty.v1 import segments_pb2


def test_the_page_size_has_a_default_a_cap_and_no_sign():
    assert page_of(segments_pb2.ListSegmentsRequest(), "segments", (int, str)).size == 100
    assert page_of(segments_pb2.HistoryRequest(), "runs", (int,), default=50).size == 50
    assert page_of(segments_pb2.HistoryRequest(limit=7), "runs", (int,)).size == 7          # the older field
    assert page_of(segments_pb2.HistoryRequest(limit=7, page_size=3), "runs", (int,)).size == 3
    assert page_of(segments_pb2.ListSegmentsRequest(page_size=5000), "segments", (int, str)).size == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument) as err:
        page_of(segments_pb2.ListSegmentsRequest(page_size=-2), "segments", (int, str))
    assert err.value.path == "page_size"


@pytest.mark.parametrize("token", [
    "%%%", "bm90IGpzb24", encode_token("scenarios", ("a",)), encode_token("segments", ("x", "a")),
    encode_token("segments", (0,)),
])
def test_a_token_of_another_list_or_shape_is_refused_naming_page_token(token):
    with pytest.raises(InvalidArgument) as err:
        page_of(segments_pb2.ListSegmentsRequest(page_token=token), "segments", (int, str))
    assert err.value.path == "page_token"


def test_a_page_continues_after_the_last_key_sent():
    key = lambda s: (s,)                                               # noqa: E731
    items = ["a", "c", "e", "g"]
    first, token = paged(items, page_of(segments_pb2.ListSegmentsRequest(page_size=2), "ids", (str,)), key)
    assert first == ["a", "c"] and token
    items = ["a", "b", "c", "d", "e", "g"]                            # b and d added meanwhile
    rest, last = paged(items, page_of(segments_pb2.ListSegmentsRequest(page_size=2, page_token=token), "ids",
                                      (str,)), key)
    assert rest == ["d", "e"] and last
    tail, end = paged(items, page_of(segments_pb2.ListSegmentsRequest(page_size=2, page_token=last), "ids",
                                     (str,)), key)
    assert tail == ["g"] and end == ""
