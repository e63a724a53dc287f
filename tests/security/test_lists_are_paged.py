"""The security module's lists page like every other List RPC (``server/paging.py``): ``page_size`` /
``page_token`` in, ``next_page_token`` out, every item once, a foreign token refused naming ``page_token``."""
from __future__ import annotations

import datetime as dt

import grpc
import pytest
from sqlalchemy import insert

from loyalty.server.errors import InvalidArgument
from loyalty.server.security.models import limit_breaches
from loyalty.v1 import admin_pb2, security_pb2, security_pb2_grpc


def _breach(i: int) -> dict:
    return {"at": dt.datetime(2026, 12, 1, 10, i, tzinfo=dt.timezone.utc), "limit": "card_daily_confirms",
            "threshold": 3, "value": 4, "member_id": None, "card": None, "store": "msk-01", "terminal": "pos-1",
            "number": f"n-{i}", "purchase_id": None, "receipt_date": dt.date(2026, 12, 1)}


def test_limit_breaches_page_newest_first(service):
    with service.db.write() as conn:
        conn.execute(insert(limit_breaches), [_breach(i) for i in range(7)])
    numbers, token, pages = [], "", 0
    while True:
        page = service.list_limit_breaches(admin_pb2.ListLimitBreachesRequest(page_size=3, page_token=token))
        numbers += [b.number for b in page.breaches]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert numbers == [f"n-{i}" for i in reversed(range(7))] and pages == 3
    with pytest.raises(InvalidArgument) as bad:
        service.list_limit_breaches(admin_pb2.ListLimitBreachesRequest(page_token="bm90LWEtdG9rZW4"))
    assert bad.value.path == "page_token"


def test_keys_page_oldest_first(secured):
    admin = secured.key("admin", name="pager")
    made = [secured.key("read", name=f"reader-{i}") for i in range(4)]
    assert len(made) == 4
    names, token = [], ""
    with grpc.insecure_channel(secured.server.target) as channel:
        stub = security_pb2_grpc.KeysStub(channel)
        auth = (("authorization", f"Bearer {admin}"),)
        while True:
            page = stub.ListKeys(security_pb2.ListKeysRequest(page_size=2, page_token=token), metadata=auth,
                                 timeout=30)
            assert len(page.keys) <= 2
            names += [k.name for k in page.keys]
            token = page.next_page_token
            if not token:
                break
        with pytest.raises(grpc.RpcError) as bad:
            stub.ListKeys(security_pb2.ListKeysRequest(page_token="bm90LWEtdG9rZW4"), metadata=auth, timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in bad.value.details()
    assert len(names) == len(set(names)) and {"pager", "reader-0", "reader-3"} <= set(names)
    assert names.index("pager") < names.index("reader-0") < names.index("reader-3")
