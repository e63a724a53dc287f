"""ConfirmPurchase through the gRPC edge on PostgreSQL, where it is decoded by the wire codec on the event loop
and waits for its group-commit batch without a thread: every outcome a POS can see, with the status code and
the field or figure it names, and the raw bytes of a malformed request."""
from __future__ import annotations

import grpc
import pytest

from loyalty.clients.client import LoyaltyError
from serverutil import fresh_postgres_database, now_at, start_server

POSTGRES = pytest.mark.postgres

AT = now_at()       # printed now: its points wait out the return window


def confirm(number: str, *, card="7000002", redeem=0, price=89900, **receipt) -> dict:
    return {"member": {"card": card} if card else {},
            "receipt": {"store": "msk-01", "terminal": "pos-9", "number": number, "at": AT, "redeem_points": redeem,
                        "lines": [{"sku": "coffee-beans-1kg", "categories": ["coffee"], "quantity": 1000,
                                   "price": price}], **receipt}}


def check_receipt_strings(client, prefix: str) -> None:
    """Strings the decoder cannot vouch for (its ``fits`` is False) still get the service's check: a NUL or an
    over-long value is INVALID_ARGUMENT naming the field and writes nothing; 40 Cyrillic characters (80 UTF-8
    bytes, over the decoder's byte limit) are a valid sku."""
    coffee = {"categories": ["coffee"], "quantity": 1000, "price": 89900}
    bad = [({"lines": [dict(coffee, sku="a\x00b")]}, "receipt.lines[0].sku"),
           ({"lines": [dict(coffee, sku="x" * 65)]}, "receipt.lines[0].sku"),
           ({"lines": [dict(coffee, sku="c", categories=["co\x00ffee"])]}, "receipt.lines[0].categories[0]"),
           ({"store": "m" * 65}, "receipt.store"),
           ({"coupons": ["W\x00"]}, "receipt.coupons[0]")]
    for i, (receipt, field) in enumerate(bad):
        for call in (client.calculate_receipt, client.confirm_purchase):
            with pytest.raises(LoyaltyError) as e:
                call(confirm(f"{prefix}-{i}", **receipt))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == field, (call, receipt)
    before = client.get_member({"member": {"card": "7000002"}})
    long_sku = {"lines": [dict(coffee, sku="кофе" * 10)]}
    assert client.calculate_receipt(confirm(f"{prefix}-ok", **long_sku)).answer.lines[0].sku == "кофе" * 10
    done = client.confirm_purchase(confirm(f"{prefix}-ok", **long_sku))
    assert done.answer.lines[0].sku == "кофе" * 10 and not done.replayed
    after = client.get_member({"member": {"card": "7000002"}})
    # only the valid one was written: its points, pending
    assert after.pending_points == before.pending_points + done.answer.totals.accrued_points > before.pending_points


def test_receipt_strings_through_the_edge_on_sqlite(tmp_path):
    server = start_server(tmp_path)
    try:
        with server.client(retries=0) as client:
            check_receipt_strings(client, "lite-s")
    finally:
        server.stop()


@POSTGRES
def test_confirm_outcomes_through_the_edge_on_postgresql(tmp_path):
    with fresh_postgres_database() as url:
        server = start_server(tmp_path, database_url=url)
        try:
            with server.client(retries=0) as client:
                first = client.confirm_purchase(confirm("edge-1"))
                assert first.purchase_id and not first.replayed
                assert first.answer.totals.amount == 89900 and first.answer.program_version >= 1
                again = client.confirm_purchase(confirm("edge-1"))
                assert again.replayed and again.purchase_id == first.purchase_id and again.answer == first.answer

                with pytest.raises(LoyaltyError) as e:
                    client.confirm_purchase(confirm("edge-1", price=1))
                assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
                with pytest.raises(LoyaltyError) as e:
                    client.confirm_purchase(confirm("edge-2", card="7999999"))
                assert e.value.code == grpc.StatusCode.NOT_FOUND
                with pytest.raises(LoyaltyError) as e:
                    client.confirm_purchase(confirm(""))
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "receipt.number"
                with pytest.raises(LoyaltyError) as e:
                    client.confirm_purchase(confirm("edge-3", at="2026-02-30T10:00:00+03:00"))
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "receipt.at"

                active = client.get_member({"member": {"card": "7000002"}}).active_points
                with pytest.raises(LoyaltyError) as e:
                    client.confirm_purchase(confirm("edge-4", redeem=active + 1))
                assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert e.value.available_points == active

                anonymous = client.confirm_purchase(confirm("edge-5", card=""))
                assert not anonymous.replayed and anonymous.answer.member.anonymous

                check_receipt_strings(client, "edge-s")

            channel = grpc.insecure_channel(server.target)
            call = channel.unary_unary("/loyalty.v1.Processing/ConfirmPurchase")
            with pytest.raises(grpc.RpcError) as e:
                call(b"\x12\xff\xff", timeout=10)        # a length running past the end
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ConfirmPurchaseRequest" in e.value.details()
            channel.close()
        finally:
            server.stop()
