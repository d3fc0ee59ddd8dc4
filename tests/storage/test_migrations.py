"""The Alembic migrations and the declared schema in sbus.storage.sql.schema must agree,
on SQLite and on a real PostgreSQL (tables, columns, indexes and the PL/pgSQL functions
the store calls), and every migration must downgrade: down to nothing, then up again to
the same schema."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine, inspect
from sqlalchemy.ext.asyncio import create_async_engine

import sbus.storage.sql.postgres
from sbus.storage.sql.migrate import alembic_config, head_revision, upgrade_to_head
from sbus.storage.sql.postgres import asyncpg_dsn
from sbus.storage.sql.schema import POSTGRES_FUNCTIONS, metadata, postgres_metadata
from tests import backends

HEAD = "0006"
FUNCTIONS_SQL = """
SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public' AND p.proname LIKE 'sbus\\_%'
"""


def revisions_newest_first() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in script.walk_revisions()]


def migrate(connection: Any, verb: Callable[..., None], target: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    verb(config, target)


def schema_diff(connection: Any, declared: MetaData) -> list[Any]:
    context = MigrationContext.configure(connection)
    return list(compare_metadata(context, declared))


def sbus_tables(connection: Any) -> set[str]:
    return {t for t in inspect(connection).get_table_names() if t.startswith("sbus_")}


def revision(connection: Any) -> str | None:
    rev: str | None = MigrationContext.configure(connection).get_current_revision()
    return rev


# -- SQLite ---------------------------------------------------------------------------


def test_migrations_produce_the_declared_schema(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.begin() as conn:
        upgrade_to_head(conn)
    with engine.connect() as conn:
        assert revision(conn) == head_revision() == HEAD
        assert schema_diff(conn, metadata) == []
        meta: dict[str, int] = dict(
            conn.exec_driver_sql("SELECT name, value FROM sbus_meta").fetchall()
        )
        assert meta == {"ori_enabled": 1, "clock_offset_ms": 0}


def test_sqlite_downgrades_step_by_step_to_nothing_and_back(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.begin() as conn:
        upgrade_to_head(conn)
    for older in [*revisions_newest_first()[1:], "base"]:
        with engine.begin() as conn:
            migrate(conn, command.downgrade, older)
        with engine.connect() as conn:
            assert revision(conn) == (None if older == "base" else older)
    with engine.connect() as conn:
        assert sbus_tables(conn) == set()
    with engine.begin() as conn:
        upgrade_to_head(conn)
    with engine.connect() as conn:
        assert revision(conn) == HEAD
        assert schema_diff(conn, metadata) == []


# -- PostgreSQL -----------------------------------------------------------------------


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A database of its own on the test server, dropped afterwards."""
    await backends.require("postgres")
    name = f"sbus_migrations_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield re.sub(r"/[^/?]*(\?|$)", rf"/{name}\1", backends.POSTGRES_URL, count=1)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def run(url: str, fn: Callable[[Any], Any]) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def functions(connection: Any) -> set[tuple[str, str, str]]:
    rows = connection.exec_driver_sql(FUNCTIONS_SQL).fetchall()
    return {(name, args, result) for name, args, result in rows}


async def test_postgres_migrations_produce_the_declared_schema(pg_url: str) -> None:
    await run(pg_url, upgrade_to_head)
    assert await run(pg_url, revision) == HEAD
    assert await run(pg_url, lambda c: schema_diff(c, postgres_metadata)) == []
    assert await run(pg_url, functions) == POSTGRES_FUNCTIONS


def test_the_store_calls_only_declared_functions() -> None:
    source = Path(sbus.storage.sql.postgres.__file__).read_text()
    called = set(re.findall(r"\b(sbus_[a-z_]+)\(", source))
    declared = {name for name, _, _ in POSTGRES_FUNCTIONS}
    # every declared function but the lock helper, which only the functions call
    assert called == declared - {"sbus_lock_run"}


async def test_postgres_downgrades_step_by_step_to_nothing_and_back(pg_url: str) -> None:
    await run(pg_url, upgrade_to_head)
    for older in [*revisions_newest_first()[1:], "base"]:
        await run(pg_url, partial(migrate, verb=command.downgrade, target=older))
        assert await run(pg_url, revision) == (None if older == "base" else older)
    assert await run(pg_url, sbus_tables) == set()
    assert await run(pg_url, functions) == set()
    await run(pg_url, upgrade_to_head)
    assert await run(pg_url, lambda c: schema_diff(c, postgres_metadata)) == []
    assert await run(pg_url, functions) == POSTGRES_FUNCTIONS
