"""The Alembic migrations and the declared schema in sbus.storage.sql.schema must agree,
on SQLite and on a real PostgreSQL (tables, columns, indexes and the PL/pgSQL functions
the store calls), and every migration must downgrade: down to nothing, then up again to
the same schema. On PostgreSQL, after every step up or down, the deployed functions are
exactly the versioned files (migrations/sql) the migrations applied so far name, and a
released file never changes."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sbus_migrations
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sbus_migrations.functions import SQL_DIR, deployed_versions, function_sql
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

import sbus.storage.sql.postgres
from sbus.storage.sql.migrate import alembic_config, head_revision, upgrade_to_head
from sbus.storage.sql.postgres import asyncpg_dsn
from sbus.storage.sql.schema import POSTGRES_FUNCTIONS, metadata, postgres_metadata
from tests import backends

HEAD = "0009"
FUNCTIONS_SQL = """
SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public' AND p.proname LIKE 'sbus\\_%'
"""


# The statement of every released function file (leading comment lines excluded), by
# SHA-256 (first 128 bits). A released file never changes: a database migrated before the
# edit would keep the old body while a fresh one got the new. Change a function by adding
# <name>.v<N+1>.sql and a migration that installs it (see sbus_migrations.functions), then
# add the new file here.
RELEASED = {
    "sbus_lock_run.v1.sql": "1cc013a6ec7dc81af3ab9dc2bac6167d",
    "sbus_mandate_consumed.v1.sql": "3940f026b09556d44156ce71c6e67eab",
    "sbus_now_ms.v1.sql": "193f065e272188555cb7d0a342c05c41",
    "sbus_now_ms.v2.sql": "caaf774cefe825a64fce6f21aa08f0b3",
    "sbus_read.v1.sql": "3257ba106d9a1e743e9542ee1c6edfa9",
    "sbus_txn_apply.v1.sql": "b3ad4b3840e664db3b8b32a66642f002",
    "sbus_txn_apply.v2.sql": "747ac423dcf52cde12779f73400f0d45",
    "sbus_txn_load.v1.sql": "cda92b491920d4693de7734e0677ed0f",
    "sbus_txn_load.v2.sql": "292df03673b8852336ce329e5a2f388c",
}
DEFINITIONS_SQL = """
SELECT p.proname, pg_get_functiondef(p.oid)
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


def installed_functions(target: str) -> dict[str, int]:
    """The version of each function the migrations from base up to ``target`` leave
    deployed: each migration's ``FUNCTIONS`` (name -> version) over those before it, less
    those it ``DROPPED``."""
    script = ScriptDirectory.from_config(alembic_config())
    steps = reversed(list(script.iterate_revisions(target, "base")))
    versions: dict[str, int] = deployed_versions(step.module for step in steps)
    return versions


def statement_digest(sql: str) -> str:
    lines = sql.splitlines()
    while lines and lines[0].startswith("--"):
        lines.pop(0)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def sql_files() -> dict[str, str]:
    folder = Path(sbus_migrations.__file__).parent / SQL_DIR
    return {path.name: path.read_text(encoding="utf-8") for path in folder.glob("*.sql")}


def test_released_function_files_never_change() -> None:
    digests = {name: statement_digest(sql) for name, sql in sql_files().items()}
    assert digests == RELEASED


def test_every_function_file_is_installed_by_a_migration() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    installs: list[tuple[str, int]] = [
        (name, version)
        for step in script.walk_revisions()
        for name, version in getattr(step.module, "FUNCTIONS", {}).items()
    ]
    assert {f"{name}.v{version}.sql" for name, version in installs} == set(sql_files())
    # a migration that installs version N > 1 downgrades to N - 1, so that one must exist
    assert {(name, version - 1) for name, version in installs if version > 1} <= set(installs)


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
    assert await run(pg_url, partial(deployed_as_files, target=HEAD)) == {}


def definitions(connection: Any) -> dict[str, str]:
    rows = connection.exec_driver_sql(DEFINITIONS_SQL).fetchall()
    return {name: definition for name, definition in rows}


def deployed_as_files(connection: Any, target: str) -> dict[str, str]:
    """Each deployed function whose definition differs from the file the migrations up to
    ``target`` name, or that they do not name: empty when the database is exactly those
    files. Replays the files inside a savepoint that is rolled back: a file equal to what
    is deployed changes no definition."""
    expected = installed_functions(target)
    before = definitions(connection)
    savepoint = connection.begin_nested()
    try:
        for name, version in expected.items():
            connection.execute(text(function_sql(name, version)))
        after = definitions(connection)
    finally:
        savepoint.rollback()
    names = set(before) | set(after)
    return {
        name: before.get(name, "(not deployed)")
        for name in names
        if name not in expected or before.get(name) != after.get(name)
    }


def test_the_store_calls_only_declared_functions() -> None:
    source = Path(sbus.storage.sql.postgres.__file__).read_text()
    called = set(re.findall(r"\b(sbus_[a-z_]+)\(", source))
    declared = {name for name, _, _ in POSTGRES_FUNCTIONS}
    assert called == declared


async def test_postgres_downgrades_step_by_step_to_nothing_and_back(pg_url: str) -> None:
    await run(pg_url, upgrade_to_head)
    for older in [*revisions_newest_first()[1:], "base"]:
        await run(pg_url, partial(migrate, verb=command.downgrade, target=older))
        assert await run(pg_url, revision) == (None if older == "base" else older)
        assert await run(pg_url, partial(deployed_as_files, target=older)) == {}, older
    assert await run(pg_url, sbus_tables) == set()
    assert await run(pg_url, functions) == set()
    await run(pg_url, upgrade_to_head)
    assert await run(pg_url, lambda c: schema_diff(c, postgres_metadata)) == []
    assert await run(pg_url, functions) == POSTGRES_FUNCTIONS
    assert await run(pg_url, partial(deployed_as_files, target=HEAD)) == {}


async def test_postgres_upgrades_step_by_step_to_the_files_each_revision_names(
    pg_url: str,
) -> None:
    for newer in reversed(revisions_newest_first()):
        await run(pg_url, partial(migrate, verb=command.upgrade, target=newer))
        assert await run(pg_url, revision) == newer
        assert await run(pg_url, partial(deployed_as_files, target=newer)) == {}, newer
    assert installed_functions("0004")["sbus_txn_apply"] == 1
    assert installed_functions(HEAD)["sbus_txn_apply"] == 2
    assert installed_functions("0007")["sbus_lock_run"] == 1
    assert "sbus_lock_run" not in installed_functions("0008")
