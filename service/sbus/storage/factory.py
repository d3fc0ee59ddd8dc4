"""Choose a Store backend from an ``SBUS_STORE`` URL."""

from __future__ import annotations

from sbus.core.types import Limits
from sbus.storage.protocol import Store


class UnknownStore(ValueError):
    pass


def open_store(url: str, limits: Limits) -> Store:
    if url.startswith("memory://") or url == "memory":
        from sbus.storage.memory import MemoryStore

        return MemoryStore(limits)
    if url.startswith("sqlite"):
        from sbus.storage.sql.sqlite import SQLiteStore

        return SQLiteStore(url, limits)
    raise UnknownStore(
        f"unsupported SBUS_STORE {url!r}: use memory://, sqlite:///PATH "
        "(postgresql+asyncpg:// and redis:// arrive in a later release)"
    )
