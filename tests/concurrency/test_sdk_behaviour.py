"""The SDK behaviour class (tests/client/behaviour.py) against real ``sbus serve``
processes: one over SQLite and two replicas over PostgreSQL, emptied by
``POST /admin/reset`` before each test. The buses a test makes alternate between the
replicas, so what one agent's client did through one process is what another's sees
through the other (protocol.md section 7: nothing that matters lives in a bus process).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from sbus_client import AsyncBus, Bus
from tests.client.behaviour import AsyncBusFactory, BusFactory, SDKBehaviour
from tests.concurrency.conftest import POSTGRES_2, SQLITE_1
from tests.concurrency.conftest import Bus as Topology

pytestmark = pytest.mark.concurrency


# The contention tests (test_sdk_contention.py) run on every topology; the behaviour
# class, some 20 tests, on one process over SQLite and two replicas over PostgreSQL.
@pytest.mark.parametrize("module_bus", [SQLITE_1, POSTGRES_2], indirect=True, ids=str)
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
