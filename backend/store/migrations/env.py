"""Alembic environment for the yolodex metadata database.

`backend.store.db.init_db` passes an open connection in `config.attributes["connection"]`; the Alembic command
line (with an alembic.ini whose `sqlalchemy.url` is set) works too. SQLite cannot ALTER most things, so
migrations run in batch mode there (copy-and-move tables), which Alembic does when `render_as_batch` is on.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from backend.store.db import make_engine
from backend.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url in alembic.ini, or call backend.store.db.init_db(url)")
    engine = make_engine(url)
    try:
        with engine.begin() as new_connection:
            _run(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
