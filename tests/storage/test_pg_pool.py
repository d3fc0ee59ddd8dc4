"""The PostgreSQL pool size per worker (SBUS_PG_POOL_SIZE): by default an even share of
80 connections over the workers, so one `sbus serve` stays under PostgreSQL's default
max_connections=100 whatever the core count; a set value is what the pool gets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from pydantic import ValidationError

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import PG_CONNECTION_BUDGET, Settings
from sbus.core import errors as e
from sbus.storage.sql.postgres import PostgresStore
from tests import backends

PG = "postgresql+asyncpg://bus@db:5432/sbus"


@pytest.mark.parametrize(
    ("workers", "pool"), [(1, 32), (2, 32), (3, 26), (4, 20), (8, 10), (16, 5), (64, 1), (200, 1)]
)
def test_default_pool_shares_the_budget(workers: int, pool: int) -> None:
    settings = Settings(store=PG, workers=workers)
    assert settings.pg_pool() == pool
    if workers <= PG_CONNECTION_BUDGET:
        assert workers * pool <= PG_CONNECTION_BUDGET < 100


def test_set_pool_size_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBUS_PG_POOL_SIZE", "7")
    assert Settings(store=PG, workers=16).pg_pool() == 7
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv("SBUS_PG_POOL_SIZE", bad)
        with pytest.raises(ValidationError):
            Settings()


@pytest.fixture
async def pg_ready() -> AsyncIterator[None]:
    await backends.require("postgres")
    await backends.wipe("postgres")
    yield


@pytest.mark.parametrize(("options", "size"), [({"pg_pool_size": 3}, 3), ({"workers": 8}, 10)])
async def test_the_app_pool_has_the_configured_size(
    pg_ready: None, options: dict[str, Any], size: int
) -> None:
    app = create_app(Settings(store=backends.POSTGRES_URL, **options))
    async with LifespanManager(app):
        for _ in range(500):
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        store = runtime_of(app).bus.store
        assert isinstance(store, PostgresStore)
        assert store._pool is not None
        assert store._pool.size == size


async def test_a_request_that_finds_the_pool_busy_waits_then_is_not_applied(
    pg_ready: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A use that finds every connection taken waits for one up to the pool's timeout
    (shortened here), then fails as 503 not_applied."""
    monkeypatch.setattr("sbus.storage.sql.postgres.POOL_TIMEOUT_S", 0.2)
    store = PostgresStore(backends.POSTGRES_URL, pool_size=1)
    await store.start()
    try:
        async with store._conn():
            with pytest.raises(e.StoreUnavailable) as info:
                await store.ping()
        assert info.value.fields["outcome"] == "not_applied"
        assert "pool of 1" in info.value.detail
        await store.ping()  # the connection came back
    finally:
        await store.close()


async def test_a_waiting_request_gets_the_connection_given_back(pg_ready: None) -> None:
    """A use waiting for a connection takes the one given back (within the default
    timeout): the pool reuses it rather than opening another."""
    store = PostgresStore(backends.POSTGRES_URL, pool_size=1)
    await store.start()
    try:
        async with store._conn() as held:
            pid = held.get_server_pid()
            waiting = asyncio.create_task(store.ping())
            await asyncio.sleep(0)
            assert not waiting.done()
        await asyncio.wait_for(waiting, 30)
        async with store._conn() as again:
            assert again.get_server_pid() == pid
    finally:
        await store.close()


async def test_a_connection_in_use_when_the_server_turns_read_only_is_not_kept(
    pg_ready: None,
) -> None:
    """A write that meets a read-only server (25006: a standby, a fenced old primary)
    drops the pool's connections so that the next use connects again and finds the
    primary. A connection in use at that moment (a read in flight on the same server)
    must go too when it is given back: kept, it would go on serving reads from the
    read-only server, stale once the new primary takes writes, until the next write
    happened to draw it."""
    store = PostgresStore(backends.POSTGRES_URL, pool_size=2)
    await store.start()
    try:
        async with store._conn() as in_flight:
            old_pid = in_flight.get_server_pid()
            with pytest.raises(e.StoreUnavailable, match="read-only"):
                async with store._conn() as writer:
                    # This session stands for a server set read-only under the bus.
                    await writer.execute("SET default_transaction_read_only = on")
                    await writer.execute("UPDATE sbus_meta SET value = value WHERE false")
            await in_flight.fetchval("SELECT 1")  # the read in flight succeeds
        assert in_flight.is_closed()
        async with store._conn() as fresh:
            assert fresh.get_server_pid() != old_pid
    finally:
        await store.close()


async def test_the_periodic_check_drops_connections_to_a_read_only_server(
    pg_ready: None,
) -> None:
    """A worker that only reads never meets 25006, so its connections to a server set
    read-only under it (a fenced old primary) would serve reads from there for ever,
    stale once the new primary takes writes. The store's periodic check (every 5 s,
    sbus.bootstrap.upkeep) notices and drops them, so the next use connects again."""
    store = PostgresStore(backends.POSTGRES_URL, pool_size=2)
    await store.start()
    try:
        async with store._conn() as conn:
            # This session stands for a server set read-only under the bus.
            await conn.execute("SET default_transaction_read_only = on")
            old_pid = conn.get_server_pid()
        with pytest.raises(e.StoreUnavailable, match="read-only"):
            await store.check()
        assert conn.is_closed()
        async with store._conn() as fresh:
            assert fresh.get_server_pid() != old_pid
        await store.check()  # a writable server passes
    finally:
        await store.close()
