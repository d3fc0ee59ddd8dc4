"""Choose a Store backend from an ``SBUS_STORE`` URL."""

from __future__ import annotations

from sbus.core.types import Limits
from sbus.storage.protocol import Store


class UnknownStore(ValueError):
    pass


def open_store(url: str, limits: Limits, namespace: str = "sbus") -> Store:
    if url.startswith("memory://") or url == "memory":
        from sbus.storage.memory import MemoryStore

        return MemoryStore(limits)
    if url.startswith("sqlite"):
        from sbus.storage.sql.sqlite import SQLiteStore

        return SQLiteStore(url, limits)
    if url.startswith(("postgresql", "postgres://")):
        from sbus.storage.sql.postgres import PostgresStore

        return PostgresStore(url.replace("postgres://", "postgresql://", 1), limits)
    if url.startswith("redis://"):
        from sbus.storage.redis import RedisStore

        return RedisStore(url, limits, namespace=namespace)
    raise UnknownStore(
        f"unsupported SBUS_STORE {url!r}: use memory://, sqlite:///PATH, "
        "postgresql+asyncpg://USER@HOST:PORT/DB or redis://HOST:PORT/DB"
    )
