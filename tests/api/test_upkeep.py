"""The bus watches its store's configuration while it runs (sbus.bootstrap.upkeep):
Redis switched to an evicting ``maxmemory-policy`` by ``CONFIG SET`` makes the bus
not-ready (503 at /admin/health with the reason, 503 StoreUnavailable on store routes)
until the policy is fixed, and ``wal_enabled`` follows the server's real durability
(PostgreSQL fsync / synchronous_commit, Redis appendonly / appendfsync). Against the
real servers of the test command, which run fsync=off and appendonly no."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from sbus import __version__
from sbus.api.runtime import runtime_of
from sbus.bootstrap import upkeep
from sbus.storage.sql.postgres import asyncpg_dsn
from tests import backends
from tests.api.helpers import problem, running_app

DEADLINE_S = 30.0


@pytest.fixture(autouse=True)
def fast_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upkeep, "CHECK_INTERVAL_S", 0.02)


async def until(probe: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if await probe():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not within {DEADLINE_S}s: {what}")


@pytest.fixture
async def redis_raw() -> AsyncIterator[aioredis.Redis]:
    await backends.require("redis")
    await backends.wipe("redis")
    client = aioredis.from_url(backends.REDIS_URL, decode_responses=True)
    before = await client.config_get("maxmemory-policy")
    before.update(await client.config_get("append*"))
    yield client
    for name in ("maxmemory-policy", "appendfsync", "appendonly"):
        await client.config_set(name, str(before[name]))
    await client.aclose()


async def health(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/admin/health")
    body: dict[str, Any] = resp.json()
    return resp.status_code, body


async def status_is(client: httpx.AsyncClient, status: int) -> bool:
    return (await health(client))[0] == status


async def wal_is(client: httpx.AsyncClient, expected: bool) -> bool:
    return bool((await client.get("/stats")).json()["wal_enabled"] is expected)


@pytest.mark.parametrize("auth", ["open", "token"])
async def test_redis_eviction_policy_changed_at_run_time(
    redis_raw: aioredis.Redis, auth: str
) -> None:
    options: dict[str, Any] = {"store": backends.REDIS_URL}
    if auth == "token":
        options.update(auth="token", secret="x" * 32)
    async with running_app(**options) as (_, client):
        assert (await health(client))[0] == 200
        await redis_raw.config_set("maxmemory-policy", "allkeys-lru")

        await until(lambda: status_is(client, 503), "health 503 after maxmemory-policy allkeys-lru")
        _, body = await health(client)
        if auth == "open":
            assert body["status"] == "not_ready"
            assert "maxmemory-policy is 'allkeys-lru'" in body["reason"], body
            assert "noeviction" in body["reason"], body
            resp = await client.get("/shards")
            problem(resp, 503, "StoreUnavailable")
            assert resp.json()["outcome"] == "not_applied"
            create = await client.post(
                "/shard",
                json={"key": "k", "content": "x"},
                headers={"Content-Type": "application/json"},
            )
            problem(create, 503, "StoreUnavailable")
        else:
            assert body == {
                "status": "not_ready",
                "version": __version__,
                "reason": "store misconfigured (the server log says how)",
            }

        await redis_raw.config_set("maxmemory-policy", "noeviction")

        await until(lambda: status_is(client, 200), "health 200 after noeviction again")
        if auth == "open":
            assert (await client.get("/shards")).status_code == 200
            # Nothing landed while refused: the only key is the open-mode signing key
            # the bus stored when it connected.
            assert await redis_raw.keys("*") == ["{sbus:sbus}:signing"]


async def test_redis_durability_followed_at_run_time(redis_raw: aioredis.Redis) -> None:
    await redis_raw.config_set("appendonly", "no")
    async with running_app(store=backends.REDIS_URL) as (_, client):
        await until(lambda: wal_is(client, False), "wal_enabled false with appendonly no")
        await redis_raw.config_set("appendfsync", "always")
        await redis_raw.config_set("appendonly", "yes")
        await until(lambda: wal_is(client, True), "wal_enabled true with appendonly yes, always")
        await redis_raw.config_set("appendfsync", "everysec")
        await until(lambda: wal_is(client, False), "wal_enabled false with everysec")


async def test_postgres_reports_its_real_durability() -> None:
    await backends.require("postgres")
    await backends.wipe("postgres")
    conn = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
    try:
        fsync = await conn.fetchval("SHOW fsync")
    finally:
        await conn.close()
    assert fsync == "off", "the test command runs PostgreSQL with fsync=off"
    async with running_app(store=backends.POSTGRES_URL) as (app, client):
        assert runtime_of(app).bus.store.durable is False
        resp = await client.get("/stats")
        assert resp.status_code == 200
        assert resp.json()["wal_enabled"] is False
        await upkeep.check_once(runtime_of(app), runtime_of(app).bus.store)
        assert runtime_of(app).ready is True  # not durable is reported, not refused
        assert (await client.get("/stats")).json()["wal_enabled"] is False
