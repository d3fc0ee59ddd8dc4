"""PostgreSQL's real durability in ``/stats`` ``wal_enabled``, on a private server this
test may reconfigure: true with fsync, synchronous_commit and full_page_writes on; false
as soon as a reload turns synchronous_commit off (seen by the running bus's periodic
check), true again once it is back. The shared test server runs fsync=off, where it is
false (tests/api/test_upkeep.py)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from sbus.bootstrap import upkeep
from sbus.storage.sql.postgres import asyncpg_dsn
from tests.api.helpers import running_app
from tests.faults.conftest import Postgres, unavailable

pytestmark = pytest.mark.faults
DEADLINE_S = 30.0


async def wal_becomes(client: httpx.AsyncClient, expected: bool) -> None:
    deadline = time.monotonic() + DEADLINE_S
    seen = None
    while time.monotonic() < deadline:
        resp = await client.get("/stats")
        assert resp.status_code == 200, resp.text
        seen = resp.json()["wal_enabled"]
        if seen is expected:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"wal_enabled stayed {seen} for {DEADLINE_S}s, expected {expected}")


async def reload_with(url: str, statement: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(statement)
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def test_wal_enabled_follows_postgres_durability(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upkeep, "CHECK_INTERVAL_S", 0.02)
    try:
        # synchronous_commit not on the command line, so a reload can change it
        postgres.start("-c fsync=on -c full_page_writes=on")
    except RuntimeError as exc:
        unavailable(f"PostgreSQL did not start: {exc}")
    postgres.migrate()
    async with running_app(store=postgres.url) as (_, client):
        await wal_becomes(client, True)
        await reload_with(postgres.url, "ALTER SYSTEM SET synchronous_commit = off")
        await wal_becomes(client, False)
        await reload_with(postgres.url, "ALTER SYSTEM RESET synchronous_commit")
        await wal_becomes(client, True)
