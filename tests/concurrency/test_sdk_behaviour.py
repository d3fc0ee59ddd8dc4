"""The SDK behaviour class (tests/client/behaviour.py) against a real ``sbus serve``
process over SQLite, emptied by ``POST /admin/reset`` before each test. The fixtures work
for any topology (the buses a test makes alternate between the replicas): parametrize
``module_bus`` with more of tests/concurrency/conftest.py's TOPOLOGIES to run it there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from sbus_client import AsyncBus, Bus
from tests.client.behaviour import AsyncBusFactory, BusFactory, SDKBehaviour
from tests.concurrency.conftest import SQLITE_1
from tests.concurrency.conftest import Bus as Topology

pytestmark = pytest.mark.concurrency


# The contention and lost-answer tests run on every topology; the behaviour class, some
# 20 short tests, on one process over SQLite to stay inside the suite's time budget.
@pytest.mark.parametrize("module_bus", [SQLITE_1], indirect=True, ids=str)
class TestSDKRealProcess(SDKBehaviour):
    pass


@pytest.fixture
def make_bus(fresh_bus: Topology) -> Iterator[BusFactory]:
    clients: list[httpx.Client] = []

    def make(agent_id: str | None = "a", **options: Any) -> Bus:
        url = fresh_bus.url(len(clients))
        http = httpx.Client(timeout=30.0, trust_env=False)
        clients.append(http)
        return Bus(url, agent_id=agent_id, http_client=http, **options)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
async def make_async_bus(fresh_bus: Topology) -> AsyncIterator[AsyncBusFactory]:
    clients: list[httpx.AsyncClient] = []

    def make(agent_id: str | None = "a", **options: Any) -> AsyncBus:
        url = fresh_bus.url(len(clients))
        http = httpx.AsyncClient(timeout=30.0, trust_env=False)
        clients.append(http)
        return AsyncBus(url, agent_id=agent_id, http_client=http, **options)

    yield make
    for client in clients:
        await client.aclose()
