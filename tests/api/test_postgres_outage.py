"""PostgreSQL going away under a running server: the server reaches PostgreSQL through a TCP proxy of ours,
which we cut (the real PostgreSQL keeps running). Calls then answer UNAVAILABLE, health turns NOT_SERVING,
nothing of the failed call is written; once the link is back the same request goes through and health is
SERVING again. A COMMIT whose reply is lost is found out (or answered "outcome unknown", never "nothing was
written"), and a database that hangs holds no call past its deadline nor commits it afterwards.
"""
from __future__ import annotations

import time

import grpc
import psycopg
import pytest

from loyalty.clients.client import LoyaltyError
from serverutil import TcpProxy, cli, fresh_postgres_database, now_at, pg_url_through, start_server

pytestmark = pytest.mark.postgres

AT = now_at()       # printed now: its points wait out the return window (SPEC 6)


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


def count(url: str, sql: str, *args) -> int:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute(sql, args).fetchone()[0]


@pytest.mark.parametrize("group_commit", ["32", "0"])
def test_a_lost_commit_reply_is_found_out_within_the_call(tmp_path, monkeypatch, group_commit):
    """The COMMIT reaches PostgreSQL, its reply never comes back: the server looks again (the same key) and
    answers with what was stored; every keyed write once, on the group-commit path and the single one."""
    monkeypatch.setenv("LOYALTY_CONFIRM_BATCH", group_commit)
    with fresh_postgres_database() as url:
        proxy = TcpProxy("127.0.0.1", 5432)
        srv = start_server(tmp_path, database_url=pg_url_through(url, proxy))
        try:
            with srv.client(retries=0, timeout=10) as client:
                proxy.lose_commit_reply()
                reply = client.confirm_purchase(confirm_request("lost-reply"))
                assert proxy.commits_lost == 1
                assert reply.answer.member.active_after == 900 and reply.purchase_id
                assert stored(url, "lost-reply") == (1, 900)                 # written once, charged once
                again = client.confirm_purchase(confirm_request("lost-reply"))
                assert again.replayed and again.purchase_id == reply.purchase_id
                # the till's next calculation sees the purchase (no context cached from before it)
                calc = client.calculate_receipt(confirm_request("next"))
                assert calc.answer.member.active_before == 900

                proxy.lose_commit_reply()
                refund = client.refund_purchase({"refund_id": "lost-refund", "all_remaining": True, "reason": "r",
                                                 "purchase": {"store": "msk-01", "terminal": "pos-1",
                                                              "number": "lost-reply"}})
                assert proxy.commits_lost == 2 and refund.returned_points == 100
                assert stored(url, "lost-reply")[1] == 1000
                assert client.calculate_receipt(confirm_request("next")).answer.member.active_before == 1000

                proxy.lose_commit_reply()
                adjust = client.adjust_points({"member": {"card": "7000001"}, "kind": "credit", "points": 5,
                                               "reason": "goodwill", "operation_id": "lost-adjust"})
                assert proxy.commits_lost == 3 and adjust.active_points == 1005
                assert count(url, "SELECT count(*) FROM operations WHERE operation_id = 'lost-adjust'") == 1

                proxy.lose_commit_reply()
                member = client.enroll_member({"card": "8300001", "request_id": "lost-enroll"})
                assert proxy.commits_lost == 4 and member.card == "8300001"
                assert count(url, "SELECT count(*) FROM cards WHERE number = '8300001'") == 1
            result = cli("ledger", "check", "--database-url", url)
            assert result.returncode == 0, result.stdout + result.stderr
        finally:
            srv.stop()
            proxy.close()


def test_a_lost_commit_reply_with_storage_gone_says_the_outcome_is_unknown(tmp_path):
    with fresh_postgres_database() as url:
        proxy = TcpProxy("127.0.0.1", 5432)
        srv = start_server(tmp_path, database_url=pg_url_through(url, proxy))
        try:
            with srv.client(retries=0, timeout=3) as client:
                proxy.lose_commit_reply(then_cut=True)
                with pytest.raises(LoyaltyError) as err:
                    client.confirm_purchase(confirm_request("unknown"))
                assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value.message
                assert "outcome is unknown" in err.value.message and "same key is safe" in err.value.message
                assert "nothing was written" not in err.value.message
                assert stored(url, "unknown") == (1, 900)       # it was written: the server did not claim otherwise
                proxy.restore()
                assert wait_health(client, "SERVING", 8) == "SERVING"
                again = client.confirm_purchase(confirm_request("unknown"))
                assert again.replayed and again.answer.member.active_after == 900
                assert stored(url, "unknown") == (1, 900)
        finally:
            srv.stop()
            proxy.close()


def test_a_hung_database_holds_no_call_past_its_deadline_and_commits_nothing_later(tmp_path):
    with fresh_postgres_database() as url:
        proxy = TcpProxy("127.0.0.1", 5432)
        srv = start_server(tmp_path, database_url=pg_url_through(url, proxy))
        try:
            with srv.client(retries=0, timeout=3) as client:
                client.confirm_purchase(confirm_request("before-hang"))
                proxy.hang()
                started = time.monotonic()
                with pytest.raises(LoyaltyError) as err:
                    client.confirm_purchase(confirm_request("during-hang"))
                assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                assert time.monotonic() - started < 4.5
                assert wait_health(client, "NOT_SERVING", 10) == "NOT_SERVING"
                # the server gave the call up by its deadline: nothing of it may commit once the database answers
                proxy.restore()
                assert wait_health(client, "SERVING", 10) == "SERVING"
                time.sleep(1.0)
                assert stored(url, "during-hang") == (0, 900)
                again = client.confirm_purchase(confirm_request("during-hang"))
                assert not again.replayed and again.answer.member.active_after == 800
        finally:
            srv.stop()
            proxy.close()
