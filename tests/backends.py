"""Where the test suite finds its real PostgreSQL and Redis servers, and how it wipes
them between tests.

``make test`` starts throwaway servers and exports ``SBUS_TEST_POSTGRES_URL``,
``SBUS_TEST_REDIS_URL`` and ``SBUS_TEST_REDIS_CLUSTER_URL`` (a Redis Cluster of 3
masters with a replica each). Without them the defaults point at the ports the services
script uses. A test whose backend (or other outside tool: Java, the PostgreSQL
binaries) cannot be reached FAILS, on every machine, so a missing server can never pass
silently; only an explicit ``SBUS_TEST_ALLOW_SKIP=1`` turns those failures into skips.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster

POSTGRES_URL = os.environ.get(
    "SBUS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:55432/postgres"
)
REDIS_URL = os.environ.get("SBUS_TEST_REDIS_URL", "redis://127.0.0.1:56379/0")
REDIS_CLUSTER_URL = os.environ.get(
    "SBUS_TEST_REDIS_CLUSTER_URL",
    "redis+cluster://127.0.0.1:57001,127.0.0.1:57002,127.0.0.1:57003",
)
# The one way to let tests skip for want of a server or tool; CI and developers alike
# fail without it.
ALLOW_SKIP = os.environ.get("SBUS_TEST_ALLOW_SKIP", "") == "1"

TABLES = (
    "sbus_shards, sbus_history, sbus_dl_entries, sbus_dl_sessions, sbus_counters, "
    "sbus_idempotency, sbus_consumed_mandates, sbus_revocations, sbus_rate_buckets, "
    "sbus_secrets, sbus_audit, sbus_changes, sbus_conflicts"
)


def redis_store_built() -> bool:
    return importlib.util.find_spec("sbus.storage.redis") is not None


async def _postgres_ready() -> str | None:
    import asyncpg

    from sbus.storage.sql.postgres import PostgresStore, asyncpg_dsn

    try:
        conn = await asyncpg.connect(asyncpg_dsn(POSTGRES_URL), timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {POSTGRES_URL} unreachable: {exc}"
    await conn.close()
    await PostgresStore(POSTGRES_URL).migrate()
    return None


async def _redis_ready() -> str | None:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, RedisError) as exc:
        return f"Redis at {REDIS_URL} unreachable: {exc}"
    finally:
        await client.aclose()
    return None


def redis_cluster_client() -> RedisCluster:
    """redis-py's cluster client over the test cluster's startup nodes."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    from sbus.storage.urls import cluster_nodes

    nodes, _, _ = cluster_nodes(REDIS_CLUSTER_URL)
    (host, port), rest = nodes[0], nodes[1:]
    return RedisCluster(
        host=host,
        port=port,
        startup_nodes=[ClusterNode(h, p) for h, p in rest],
        decode_responses=True,
    )


async def _redis_cluster_ready() -> str | None:
    from redis.exceptions import RedisClusterException, RedisError

    client = redis_cluster_client()
    try:
        info = await client.cluster_info()
    except (OSError, RedisError, RedisClusterException) as exc:
        return f"Redis Cluster at {REDIS_CLUSTER_URL} unreachable: {exc}"
    finally:
        await client.aclose()
    if info.get("cluster_state") != "ok":
        return f"Redis Cluster at {REDIS_CLUSTER_URL} is not ok: {info.get('cluster_state')}"
    return None


_checked: dict[str, str | None] = {}


async def unavailable(kind: str) -> str | None:
    """Why ``kind``'s server cannot be used, or None (checked once per run)."""
    if kind not in _checked:
        if kind == "postgres":
            _checked[kind] = await _postgres_ready()
        elif kind == "redis":
            built = redis_store_built()
            _checked[kind] = await _redis_ready() if built else "the Redis store is not built"
        elif kind == "redis-cluster":
            _checked[kind] = await _redis_cluster_ready()
        else:
            _checked[kind] = None
    return _checked[kind]


def missing(reason: str) -> NoReturn:
    """The test cannot run for want of ``reason``: fail, or skip under SBUS_TEST_ALLOW_SKIP=1."""
    if ALLOW_SKIP:
        pytest.skip(f"{reason} (skipped: SBUS_TEST_ALLOW_SKIP=1)")
    pytest.fail(
        f"{reason} (a test that cannot reach what it needs fails; "
        "set SBUS_TEST_ALLOW_SKIP=1 to skip it instead)",
        pytrace=False,
    )


async def require(kind: str) -> None:
    reason = await unavailable(kind)
    if reason is not None:
        missing(reason)


async def wipe(kind: str) -> None:
    """Empty a shared server so each test starts from a fresh store."""
    if kind == "postgres":
        import asyncpg

        from sbus.storage.sql.postgres import asyncpg_dsn

        conn = await asyncpg.connect(asyncpg_dsn(POSTGRES_URL))
        try:
            await conn.execute(f"TRUNCATE {TABLES}")
            await conn.execute(
                "UPDATE sbus_meta SET value = CASE name WHEN 'ori_enabled' THEN 1 ELSE 0 END"
            )
        finally:
            await conn.close()
    elif kind == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        try:
            await client.flushdb()
        finally:
            await client.aclose()
    elif kind == "redis-cluster":
        from redis.asyncio.cluster import RedisCluster

        cluster = redis_cluster_client()
        try:
            await cluster.flushall(target_nodes=RedisCluster.PRIMARIES)
        finally:
            await cluster.aclose()
