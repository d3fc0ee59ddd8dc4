"""The Redis store (``SBUS_STORE=redis://host:port/db``): see :mod:`.store`."""

from sbus.storage.redis.store import RedisStore

__all__ = ["RedisStore"]
