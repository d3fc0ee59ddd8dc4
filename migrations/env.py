"""Alembic environment. The bus passes an open connection in
``config.attributes["connection"]``; the ``alembic`` command line builds one from
``sqlalchemy.url`` or ``SBUS_STORE``."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from sbus.storage.sql.schema import metadata

config = context.config


def _sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(
        "SBUS_STORE", "sqlite:///./sbus.db"
    )
    engine = create_engine(_sync_url(url), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `sbus migrate`")
run_migrations_online()
