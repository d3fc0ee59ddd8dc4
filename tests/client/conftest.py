"""In-process buses for the SDK behaviour tests: the real server app over the memory
store, the sync client through Starlette's TestClient (which runs the app's lifespan in
a portal thread), the async client through httpx's ASGITransport under a lifespan
manager. Admin and test hooks are on so the tests can move the store clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from sbus.api.app import create_app
from sbus.config import Settings
from sbus_client import AsyncBus, Bus
from tests.api.helpers import running_app
from tests.client.behaviour import AsyncBusFactory, BusFactory

SETTINGS: dict[str, Any] = {"store": "memory://", "admin_enabled": True, "test_hooks": True}
URL = "http://localhost"  # a name open mode's Host check accepts


@pytest.fixture
def make_bus() -> Iterator[BusFactory]:
    app = create_app(Settings(**SETTINGS))
    with TestClient(app, base_url=URL) as client:
        deadline = time.monotonic() + 10
        while not app.state.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.ready, app.state.not_ready_reason

        def make(agent_id: str | None = "a", **options: Any) -> Bus:
            return Bus(URL, agent_id=agent_id, http_client=client, **options)

        yield make


@pytest.fixture
async def make_async_bus() -> AsyncIterator[AsyncBusFactory]:
    async with running_app(**SETTINGS) as (_, client):

        def make(agent_id: str | None = "a", **options: Any) -> AsyncBus:
            return AsyncBus(URL, agent_id=agent_id, http_client=client, **options)

        yield make
