"""Alembic environment: one chain of migrations for SQLite (batch mode, which rebuilds tables for ALTERs
SQLite cannot do) and PostgreSQL. The configuration is built in code by ``loyalty.server.db.alembic_config``;
a caller may hand over an open connection in ``config.attributes["connection"]``."""
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from loyalty.server.models import Base
import loyalty.server.segments.models  # noqa: F401
import loyalty.server.scenarios.models  # noqa: F401
import loyalty.server.security.models  # noqa: F401

config = context.config
target_metadata = Base.metadata


def _configure(connection):
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
