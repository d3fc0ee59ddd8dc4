"""Shared fixtures: an in-process app over each store, driven through httpx's
ASGITransport with the lifespan running, so requests take the real middleware path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from tests import backends
from tests.model.seeding import SEED, SEED_ENV

STORES = ["memory", "sqlite", "postgres", "redis"]
# The store conformance suite and the lockstep model also run on a Redis Cluster; the
# API tests do not (the cluster store is the Redis store routed by slot).
STORES_AND_CLUSTER = [*STORES, "redis-cluster"]
JSON = {"Content-Type": "application/json"}

AppFactory = Callable[..., Awaitable[tuple[FastAPI, httpx.AsyncClient]]]


def pytest_report_header() -> str:
    return f"lockstep model seed: {SEED} (repeat with {SEED_ENV}={SEED})"


def store_url(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'sbus.db'}"
    if kind == "postgres":
        return backends.POSTGRES_URL
    if kind == "redis":
        return backends.REDIS_URL
    if kind == "redis-cluster":
        return backends.REDIS_CLUSTER_URL
    raise ValueError(kind)


@pytest.fixture(params=STORES)
async def store_kind(request: pytest.FixtureRequest) -> str:
    """Every store backend; the shared servers are wiped before each test."""
    kind: str = request.param
    await backends.require(kind)
    await backends.wipe(kind)
    return kind


@pytest.fixture
async def make_client(tmp_path: Path, store_kind: str) -> AsyncIterator[AppFactory]:
    """Build apps on demand: ``app, client = await make_client(admin_enabled=True)``."""
    managers: list[LifespanManager] = []
    clients: list[httpx.AsyncClient] = []

    async def build(**overrides: Any) -> tuple[FastAPI, httpx.AsyncClient]:
        options: dict[str, Any] = {
            "store": store_url(store_kind, tmp_path),
            "admin_enabled": True,
            "test_hooks": True,
        }
        options.update(overrides)
        app = create_app(Settings(**options))
        manager = LifespanManager(app)
        await manager.__aenter__()
        managers.append(manager)
        for _ in range(500):
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        assert runtime_of(app).ready, runtime_of(app).not_ready_reason
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app),
            base_url="http://localhost",
            headers=JSON,
        )
        clients.append(client)
        return app, client

    yield build
    for client in clients:
        await client.aclose()
    for manager in reversed(managers):
        await manager.__aexit__(None, None, None)


@pytest.fixture
async def client(make_client: AppFactory) -> httpx.AsyncClient:
    _, c = await make_client()
    return c
