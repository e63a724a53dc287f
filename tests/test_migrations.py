"""The Alembic chain: one head, and ``upgrade`` from an empty database gives exactly the models (Alembic's
autogenerate comparison finds nothing to do), on SQLite always and on PostgreSQL when it is reachable."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from loyalty.server import db
from loyalty.server.models import Base
from test_storage_fixtures import pg_url  # noqa: F401 - fixture




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
def test_upgrade_from_empty_matches_the_models_on_postgresql(pg_url):
    db.upgrade(pg_url)
    diff, tables = _diff(pg_url)
    assert diff == []
    assert set(Base.metadata.tables) <= tables


def test_upgrade_twice_is_harmless(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    db.upgrade(url)
    assert _diff(url)[0] == []
