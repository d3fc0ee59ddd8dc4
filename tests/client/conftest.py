"""In-process buses for the SDK behaviour tests: ``sbus_client.testing`` runs the real
server app over the memory store; admin and test hooks are on so the behaviour tests
can move the store clock through the admin route, as they would on a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sbus_client import AsyncBus, Bus
from sbus_client.testing import AsyncLocalBus, LocalBus
from tests.client.behaviour import AsyncBusFactory, BusFactory

SETTINGS: dict[str, Any] = {"admin_enabled": True, "test_hooks": True}


@pytest.fixture
def make_bus() -> Iterator[BusFactory]:
    with LocalBus(**SETTINGS) as local:

        def make(agent_id: str | None = "a", **options: Any) -> Bus:
            return Bus(local.url, agent_id=agent_id, http_client=local.http, **options)

        yield make


@pytest.fixture
async def make_async_bus() -> AsyncIterator[AsyncBusFactory]:
    async with AsyncLocalBus(**SETTINGS) as local:

        def make(agent_id: str | None = "a", **options: Any) -> AsyncBus:
            return AsyncBus(local.url, agent_id=agent_id, http_client=local.http, **options)

        yield make
