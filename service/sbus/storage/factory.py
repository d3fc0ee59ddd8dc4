"""Choose a Store backend from an ``SBUS_STORE`` URL."""

from __future__ import annotations

from sbus.core.store import Store
from sbus.core.types import Limits
from sbus.storage.urls import CLUSTER_SCHEME, redact_url


class UnknownStore(ValueError):
    pass


def open_store(
    url: str,
    limits: Limits,
    namespace: str = "sbus",
    *,
    pool_size: int | None = None,
    redis_wait: tuple[int, int] = (0, 1000),
) -> Store:
    """The store ``url`` names. ``pool_size``: connections per process, PostgreSQL only
    (its own default when None). ``redis_wait``: (replicas, timeout ms) every Redis
    write waits for (0 replicas: none)."""
    if url.startswith("memory://") or url == "memory":
        from sbus.storage.memory import MemoryStore

        return MemoryStore(limits)
    if url.startswith("sqlite"):
        from sbus.storage.sql.sqlite import SQLiteStore

        return SQLiteStore(url, limits)
    if url.startswith(("postgresql", "postgres://")):
        from sbus.storage.sql.postgres import PostgresStore

        url = url.replace("postgres://", "postgresql://", 1)
        if pool_size is None:
            return PostgresStore(url, limits)
        return PostgresStore(url, limits, pool_size=pool_size)
    if url.startswith(("redis://", CLUSTER_SCHEME)):
        from sbus.storage.redis import RedisStore

        replicas, timeout_ms = redis_wait
        return RedisStore(
            url, limits, namespace=namespace, wait_replicas=replicas, wait_timeout_ms=timeout_ms
        )
    raise UnknownStore(
        f"unsupported SBUS_STORE {redact_url(url)!r}: use memory://, sqlite:///PATH, "
        "postgresql+asyncpg://USER@HOST:PORT/DB, redis://HOST:PORT/DB or "
        "redis+cluster://HOST:PORT,HOST:PORT,..."
    )
