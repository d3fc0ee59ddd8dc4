"""The racing graphs of test_langgraph_graph against real ``sbus serve`` processes: one
over SQLite, and two replicas over the one PostgreSQL server, where the items are
seeded and checked through one replica and the graph runs on the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sbus_client import Bus
from sbus_client.langgraph import SBusStore
from tests.concurrency.conftest import (
    POSTGRES_2,
    SQLITE_1,
    ServerGroup,
    Topology,
    prepare_store,
)
from tests.integrations.langgraph_graphs import NS, Journal, counter_graph, rota_graph, seed_rota

pytestmark = pytest.mark.concurrency


@pytest.fixture(params=[SQLITE_1, POSTGRES_2], ids=str)
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    topology: Topology = request.param
    group = ServerGroup(tmp_path / "logs")
    try:
        servers = group.start_replicas(prepare_store(topology, tmp_path), topology.replicas)
    except BaseException:
        group.stop_all()
        raise
    yield [s.base_url for s in servers]
    group.fail_on(group.stop_all())


def bus_at(url: str) -> Bus:
    return Bus(url, http_client=httpx.Client(timeout=30.0, trust_env=False))


def test_racing_branches_on_a_served_bus(urls: list[str]) -> None:
    graph_bus, check_bus = bus_at(urls[-1]), bus_at(urls[0])
    try:
        store, checker = SBusStore(graph_bus), SBusStore(check_bus).bind("checker")
        checker.put(NS, "counter", {"log": []})
        journal = Journal()
        counter_graph(store, journal).invoke({})
        item = checker.get(NS, "counter")
        assert item is not None and sorted(item.value["log"]) == ["left", "right"]
        assert [code for _, code in journal.conflicts] == ["VersionMismatch"]
        assert sorted(journal.attempts.values()) == [1, 2]

        seed_rota(SBusStore(check_bus).bind("seed"))
        journal = Journal()
        rota_graph(store, journal).invoke({})
        states = {name: checker.get(NS, name) for name in ("alice", "bob")}
        assert sorted(i.value["on_call"] for i in states.values() if i) == [False, True]
        assert [code for _, code in journal.conflicts] == ["CrossShardStale"]
    finally:
        graph_bus.close()
        check_bus.close()
