"""Many terminals at once, over gRPC, on SQLite and on PostgreSQL (SPEC section 5, Concurrency and
Idempotency): spending one card from 50 confirms never takes more than the balance, and one receipt confirmed
20 times at once is one purchase with 20 identical answers. ``loyalty ledger check`` must pass afterwards.
"""
from __future__ import annotations

import concurrent.futures

import grpc
import pytest

from loyalty.clients.client import LoyaltyError
from serverutil import BACKENDS, cli, now_at, server_on

AT = now_at()       # printed now: its points wait out the return window


def coffee_receipt(number: str, redeem: int) -> dict:
    return {"store": "msk-01", "terminal": "pos-9", "number": number, "channel": "pos", "at": AT,
            "redeem_points": redeem,
            "lines": [{"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000, "price": 89900}]}


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory):
    with server_on(request.param, tmp_path_factory.mktemp(f"concurrency-{request.param}")) as srv:
        yield srv


def test_fifty_concurrent_confirms_never_spend_more_than_the_balance(server):
    # Card 7000001 holds 1000 points. Each receipt (coffee 899.00) asks for 100 points, within its cap:
    # floor(89900 x 20 / 100) = 17980 -> 179 points. So exactly 1000 / 100 = 10 confirms can succeed; the
    # other 40 must fail with FAILED_PRECONDITION and write nothing.
    # Each success earns 3% (Basic) of the money part 89900 - 10000 = 79900: 79900 x 3 / 100 / 100 = 23.97
    # -> 23 points pending.
    with server.client(timeout=30) as client:
        def confirm(i):
            try:
                return client.confirm_purchase({"member": {"card": "7000001"},
                                                "receipt": coffee_receipt(f"spend-{i:03d}", 100)})
            except LoyaltyError as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(confirm, range(50)))
        ok = [r for r in results if not isinstance(r, LoyaltyError)]
        failed = [r for r in results if isinstance(r, LoyaltyError)]
        assert {f.code for f in failed} <= {grpc.StatusCode.FAILED_PRECONDITION}, [f.one_line() for f in failed]
        assert len(ok) == 10 and len(failed) == 40
        assert all(r.answer.totals.redeemed_points == 100 for r in ok)
        assert all(f.available_points is not None and f.available_points < 100 for f in failed)
        member = client.get_member({"member": {"card": "7000001"}})
        assert (member.active_points, member.pending_points) == (0, 10 * 23)
    result = cli("ledger", "check", "--database-url", server.database_url)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_receipt_confirmed_twenty_times_at_once_is_one_purchase(server):
    # Card 7000005 (Gold, 3000 points) confirms the same receipt from 20 threads: one purchase, charged once
    # (3000 - 50 = 2950), and all 20 answers identical; exactly one of them is the original.
    with server.client(timeout=30) as client:
        request = {"member": {"card": "7000005"}, "receipt": coffee_receipt("same-receipt", 50)}
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda _: client.confirm_purchase(request), range(20)))
        assert len({r.purchase_id for r in results}) == 1
        assert all(r.answer == results[0].answer for r in results)
        assert sum(1 for r in results if not r.replayed) == 1
        assert client.get_member({"member": {"card": "7000005"}}).active_points == 2950
    result = cli("ledger", "check", "--database-url", server.database_url)
    assert result.returncode == 0, result.stdout + result.stderr
