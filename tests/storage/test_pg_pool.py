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
