"""Choose a Store backend from an ``SBUS_STORE`` URL."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from sbus.core.store import Store
from sbus.core.types import Limits

# Query parameters the drivers accept a password in (asyncpg and redis-py read
# ``password``; libpq-style URLs may say ``passwd``).
_SECRET_PARAMS = frozenset({"password", "passwd", "pass"})
MASK = "***"


class UnknownStore(ValueError):
    pass


def redact_url(url: str) -> str:
    """``url`` fit to print: the password in the userinfo and in any ``password=``
    query parameter replaced by ``***``, everything else as given. The one place that
    decides how a store URL is shown (the serve banner, ``sbus migrate``, errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable store URL>"
    redacted = url
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        redacted = redacted.replace(f"//{parts.netloc}", f"//{user}:{MASK}@{host}", 1)
    if any(k.lower() in _SECRET_PARAMS for k, _ in parse_qsl(parts.query)):
        head, _, rest = redacted.partition("?")
        query, hash_, fragment = rest.partition("#")
        fields = [
            f"{field.split('=', 1)[0]}={MASK}"
            if field.split("=", 1)[0].lower() in _SECRET_PARAMS
            else field
            for field in query.split("&")
        ]
        redacted = f"{head}?{'&'.join(fields)}{hash_}{fragment}"
    return redacted


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
