"""The ledger proves itself: ``check`` finds any disagreement between entries, lots and balances, and a
refund that takes back points the member already spent leaves a debt that the next credit pays first."""
from __future__ import annotations

import pytest
from sqlalchemy import update

from helpers.purchases import coffee, confirm, enroll, member
from loyalty.server import jobs, ledger
from loyalty.server.models import balances
from loyalty.v1 import processing_pb2 as P
from loyalty.v1 import receipt_pb2 as R


def test_check_reports_a_tampered_balance(service):
    enroll(service, "7300001", points=100)
    assert ledger.check(service.db) == []
    with service.db.write() as conn:
        conn.execute(update(balances).values(active=balances.c.active + 1))
    problems = ledger.check(service.db)
    assert any("ledger says 100 / 0" in p for p in problems)
    assert any("lots hold 100 / 0" in p for p in problems)


def test_take_back_beyond_the_balance_is_a_debt_the_next_credit_pays(service, clock):
    enroll(service, "7300002")
    confirm(service, "7300002", coffee("d-1"))          # earns floor(89900 x 3% / 100) = floor(26.97) = 26
    clock.advance(days=15)
    jobs.run_once(service.runtime)
    ref = R.MemberRef(card="7300002")
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="debit", points=20, operation_id="d-spend",
                                                reason="x"))
    r = service.refund_purchase(P.RefundPurchaseRequest(refund_id="d-r", purchase=P.PurchaseKey(
        store="msk-01", terminal="pos-3", number="d-1"), all_remaining=True))
    # 26 - 20 = 6 left; taking back 26 leaves a debt of 20.
    assert (r.taken_back_points, r.active_points) == (26, -20)
    assert ledger.check(service.db) == []
    assert ledger.liability(service.runtime)["debt_points"] == 20
    service.adjust_points(P.AdjustPointsRequest(member=ref, kind="top_up", points=50, operation_id="d-top",
                                                reason="x"))
    assert member(service, "7300002").active_points == 30            # 50 - 20 of debt
    assert ledger.check(service.db) == []


def test_ledger_check_reports_purchase_lines_without_their_purchase(service):
    """purchase_lines has no foreign key (migration 0004): the check stands in for it."""
    from sqlalchemy import insert

    from loyalty.server.models import purchase_lines

    assert ledger.check(service.db) == []
    with service.db.write() as conn:
        conn.execute(insert(purchase_lines).values(
            purchase_id=987654, line=0, sku="ghost", quantity=1000, amount=100, payable=100, redeemed=0, points=0,
            refunded_quantity=0, refunded_payable=0, refunded_redeemed=0, refunded_points=0))
    assert ledger.check(service.db) == ["1 purchase lines without their purchase"]


def test_a_statement_storage_refuses_is_a_defect_not_retry_later(database_url):
    """A syntax error is no passing failure: INTERNAL with a plain sentence (no SQL), never "retry later"; a
    lost or refused connection stays UNAVAILABLE "retry later"."""
    from loyalty.server import db as storage
    from loyalty.server.errors import ServiceError, Unavailable

    storage.upgrade(database_url)
    database = storage.Database(database_url)
    def read_bad():
        with database.read() as conn:
            conn.exec_driver_sql("SELECT CASE ELSE 1 END")

    try:
        for run in (lambda: database.run_write(lambda conn: conn.exec_driver_sql("SELEC 1")), read_bad):
            with pytest.raises(ServiceError) as err:
                run()
            assert err.value.code == "INTERNAL" and not isinstance(err.value, Unavailable)
            assert "retry later" not in err.value.message and "SELEC" not in err.value.message
            assert "retrying will not fix" in err.value.message
    finally:
        database.dispose()
    gone = storage.Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(Unavailable) as err:
        gone.run_write(lambda conn: conn.exec_driver_sql("SELECT 1"))
    assert "retry later" in err.value.message and err.value.details["outcome"] == "not_written"
