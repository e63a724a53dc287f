"""PostgreSQL going away under a running server: the server reaches PostgreSQL through a TCP proxy of ours,
which we cut (the real PostgreSQL keeps running). Calls then answer UNAVAILABLE, health turns NOT_SERVING,
nothing of the failed call is written; once the link is back the same request goes through and health is
SERVING again.
"""
from __future__ import annotations

import time

import grpc
import psycopg
import pytest

from loyalty.clients.client import LoyaltyError
from serverutil import TcpProxy, cli, fresh_postgres_database, pg_url_through, start_server

pytestmark = pytest.mark.postgres

AT = "2026-03-02T12:30:00+03:00"


def confirm_request(number: str) -> dict:
    return {"member": {"card": "7000001"},
            "receipt": {"store": "msk-01", "terminal": "pos-1", "number": number, "at": AT, "redeem_points": 100,
                        "lines": [{"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000,
                                   "price": 89900}]}}


def wait_health(client, want: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = client.health()
        if status == want:
            return status
        time.sleep(0.1)
    return status


def stored(url: str, number: str) -> tuple[int, int]:
    """(purchases with this number, active points of 7000001), read on the real PostgreSQL, not the proxy."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        purchases = conn.execute("SELECT count(*) FROM purchases WHERE number = %s", (number,)).fetchone()[0]
        active = conn.execute("SELECT b.active FROM balances b JOIN cards c ON c.member_id = b.member_id "
                              "WHERE c.number = '7000001'").fetchone()[0]
    return purchases, active


def test_postgres_cut_mid_run_is_unavailable_then_recovers(tmp_path):
    with fresh_postgres_database() as url:
        proxy = TcpProxy("127.0.0.1", 5432)
        srv = start_server(tmp_path, database_url=pg_url_through(url, proxy))
        try:
            with srv.client(retries=0, timeout=10) as client:
                first = client.confirm_purchase(confirm_request("before-cut"))
                assert first.answer.member.active_after == 900          # 1000 - 100

                proxy.cut()
                with pytest.raises(LoyaltyError) as err:
                    client.confirm_purchase(confirm_request("during-cut"))
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                assert "Traceback" not in err.value.message
                assert wait_health(client, "NOT_SERVING", 6) == "NOT_SERVING"
                assert stored(url, "during-cut") == (0, 900)              # nothing half-written

                proxy.restore()
                assert wait_health(client, "SERVING", 6) == "SERVING"
                again = client.confirm_purchase(confirm_request("during-cut"))
                assert not again.replayed and again.answer.member.active_after == 800
                assert stored(url, "during-cut") == (1, 800)
            result = cli("ledger", "check", "--database-url", url)
            assert result.returncode == 0, result.stdout + result.stderr
        finally:
            srv.stop()
            proxy.close()
