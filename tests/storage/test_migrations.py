"""The Alembic chain: one head, and ``upgrade`` from an empty database gives exactly the models (Alembic's
autogenerate comparison finds nothing to do), on SQLite always and on PostgreSQL when it is reachable."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from loyalty.server import db
from loyalty.server.models import Base


def test_migrations_have_a_single_head():
    script = ScriptDirectory.from_config(db.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


def _diff(url):
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata), set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_the_models_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    diff, tables = _diff(url)
    assert diff == []
    assert set(Base.metadata.tables) <= tables


@pytest.mark.postgres
def test_upgrade_from_empty_matches_the_models_on_postgresql(pg_url_empty):
    db.upgrade(pg_url_empty)
    diff, tables = _diff(pg_url_empty)
    assert diff == []
    assert set(Base.metadata.tables) <= tables


def test_upgrade_twice_is_harmless(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    db.upgrade(url)
    assert _diff(url)[0] == []


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_0004_drops_the_purchase_lines_key_and_gives_it_back_on_downgrade(tmp_path, backend, request):
    """Data written at 0003 survives 0004 (SQLite rebuilds the table), and a downgrade restores the key."""
    from alembic import command
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url_empty")

    def keys():
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return [fk["referred_table"] for fk in inspect(conn).get_foreign_keys("purchase_lines")]
        finally:
            engine.dispose()

    db.upgrade(url, "0003")
    assert keys() == ["purchases"]
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO program_versions (version, name, yaml, checksum, published_at, comment) "
                          "VALUES (1, 'p', 'x', 'c', CURRENT_TIMESTAMP, '')"))
        conn.execute(text("INSERT INTO purchases (id, store, terminal, number, program_version, request_hash, "
                          "answer, receipt_at, amount, discount, payable, redeemed_points, redeemed_amount, "
                          "accrued_points, refunded_payable, refunded_amount, returned_points, taken_back_points, "
                          "status, created_at) VALUES (7, 's', 't', 'n', 1, 'h', '{}', '', 100, 0, 100, 0, 0, 0, "
                          "0, 0, 0, 0, 'confirmed', CURRENT_TIMESTAMP)"))
        conn.execute(text("INSERT INTO purchase_lines VALUES (7, 0, 'milk', 1000, 100, 100, 0, 0, 0, 0, 0, 0)"))
    engine.dispose()
    db.upgrade(url)
    assert keys() == []
    assert _diff(url)[0] == []
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT purchase_id, sku, amount FROM purchase_lines")).all() == [(7, "milk", 100)]
    engine.dispose()
    command.downgrade(db.alembic_config(url), "0003")
    assert keys() == ["purchases"]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_0005_dates_stored_purchases_by_their_receipts(tmp_path, backend, request):
    """Purchases stored before 0005 get their receipt's moment (UTC) and local date from the text the POS sent;
    one without a readable time gets its confirmation time; a downgrade drops the columns again."""
    import datetime as dt

    from alembic import command
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url_empty")
    db.upgrade(url, "0004")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO program_versions (version, name, yaml, checksum, published_at, comment) "
                          "VALUES (1, 'p', 'x', 'c', CURRENT_TIMESTAMP, '')"))
        for pid, at in ((1, "2026-01-01T01:00:00+03:00"), (2, "2026-02-10T20:30:00-0500"), (3, "2026-03-02T12:30"),
                        (4, "")):
            conn.execute(text(
                "INSERT INTO purchases (id, store, terminal, number, program_version, request_hash, answer, "
                "receipt_at, amount, discount, payable, redeemed_points, redeemed_amount, accrued_points, "
                "refunded_payable, refunded_amount, returned_points, taken_back_points, status, created_at) "
                "VALUES (:id, 's', 't', :n, 1, 'h', '{}', :at, 100, 0, 100, 0, 0, 0, 0, 0, 0, 0, 'confirmed', "
                "'2026-12-03 10:00:00')"), {"id": pid, "n": f"n{pid}", "at": at})
    engine.dispose()
    db.upgrade(url)
    assert _diff(url)[0] == []
    from loyalty.server.models import purchases
    from sqlalchemy import select
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(purchases.c.id, purchases.c.receipt_time, purchases.c.receipt_date)
                            .order_by(purchases.c.id)).all()
    engine.dispose()
    utc = dt.timezone.utc
    assert [(r.id, r.receipt_time, r.receipt_date) for r in rows] == [
        (1, dt.datetime(2025, 12, 31, 22, 0, tzinfo=utc), dt.date(2026, 1, 1)),      # local date, not UTC's
        (2, dt.datetime(2026, 2, 11, 1, 30, tzinfo=utc), dt.date(2026, 2, 10)),
        (3, dt.datetime(2026, 3, 2, 12, 30, tzinfo=utc), dt.date(2026, 3, 2)),       # no offset: UTC
        (4, dt.datetime(2026, 12, 3, 10, 0, tzinfo=utc), dt.date(2026, 12, 3)),      # unreadable: confirmed at
    ]
    command.downgrade(db.alembic_config(url), "0004")
    engine = create_engine(url)
    with engine.connect() as conn:
        assert "receipt_date" not in {c["name"] for c in inspect(conn).get_columns("purchases")}
    engine.dispose()
