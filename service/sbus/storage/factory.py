"""Choose a Store backend from an ``SBUS_STORE`` URL."""

from __future__ import annotations

from sbus.core.store import Store
from sbus.core.types import Limits
from sbus.storage.urls import redact_url


class UnknownStore(ValueError):
    pass


def open_store(
    url: str, limits: Limits, namespace: str = "sbus", *, pool_size: int | None = None
) -> Store:
    """The store ``url`` names. ``pool_size``: connections per process, PostgreSQL only
    (its own default when None)."""
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
    if url.startswith("redis://"):
        from sbus.storage.redis import RedisStore

        return RedisStore(url, limits, namespace=namespace)
    raise UnknownStore(
        f"unsupported SBUS_STORE {redact_url(url)!r}: use memory://, sqlite:///PATH, "
        "postgresql+asyncpg://USER@HOST:PORT/DB or redis://HOST:PORT/DB"
    )
