"""SBusStore inside real LangGraph graphs (in process): parallel branches racing on the
store end with every update, a conflict re-runs the node through RetryPolicy, and a
write skew across two items is refused. The same graphs on InMemoryStore show what the
bus prevents."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.store.memory import InMemoryStore

from sbus_client import Bus
from sbus_client.langgraph import SBusStore
from sbus_client.testing import AsyncLocalBus, LocalBus
from tests.api.auth_helpers import SECRET, token
from tests.integrations.langgraph_graphs import (
    NS,
    Journal,
    State,
    acounter_graph,
    counter_graph,
    rota_graph,
    seed_rota,
)


@pytest.fixture
def local() -> Iterator[LocalBus]:
    with LocalBus() as bus:
        yield bus


@pytest.fixture
async def alocal() -> AsyncIterator[AsyncLocalBus]:
    async with AsyncLocalBus() as bus:
        yield bus


def last_writer(bus: Bus, key: str) -> str:
    with bus.session("auditor") as s:
        return s.history(key)[0].agent_id


def test_parallel_read_modify_write_keeps_both_updates(local: LocalBus) -> None:
    store = SBusStore(local.bus)
    journal = Journal()
    counter_graph(store, journal).invoke({})
    item = store.bind("checker").get(NS, "counter")
    assert item is not None
    assert sorted(item.value["log"]) == ["left", "right"]
    # Exactly one branch lost (the barrier made both read the same version) and was
    # re-run by RetryPolicy once.
    assert sorted(journal.attempts.values()) == [1, 2]
    [(loser, code)] = journal.conflicts
    assert code == "ShardAlreadyExists"  # both saw the item absent: a create race
    assert journal.attempts[loser] == 2 and item.value["log"][-1] == loser
    assert last_writer(local.bus, "lg/shared/counter") == loser  # agent = node name


def test_parallel_updates_of_an_existing_item(local: LocalBus) -> None:
    store = SBusStore(local.bus)
    store.bind("seed").put(NS, "counter", {"log": ["seed"]})
    journal = Journal()
    counter_graph(store, journal).invoke({})
    item = store.bind("checker").get(NS, "counter")
    assert item is not None
    assert item.value["log"][0] == "seed" and sorted(item.value["log"][1:]) == ["left", "right"]
    assert [code for _, code in journal.conflicts] == ["VersionMismatch"]
    assert sorted(journal.attempts.values()) == [1, 2]


def test_in_memory_store_loses_one_of_the_updates() -> None:
    """The same graph on LangGraph's own store: the second write overwrites the first."""
    store = InMemoryStore()
    journal = Journal()
    counter_graph(store, journal).invoke({})
    item = store.get(NS, "counter")
    assert item is not None and len(item.value["log"]) == 1
    assert journal.attempts == {"left": 1, "right": 1} and journal.conflicts == []


def test_write_skew_between_branches_is_refused(local: LocalBus) -> None:
    store = SBusStore(local.bus)
    seed_rota(store.bind("seed"))
    journal = Journal()
    rota_graph(store, journal).invoke({})
    checker = store.bind("checker")
    on_call = {name: checker.get(NS, name) for name in ("alice", "bob")}
    states = {name: item.value["on_call"] for name, item in on_call.items() if item}
    # One went off call; the other's commit was refused (its read of the first moved),
    # and its re-run saw that and stayed on call.
    assert sorted(states.values()) == [False, True]
    [(refused, code)] = journal.conflicts
    assert code == "CrossShardStale" and states[refused] is True
    assert journal.attempts[refused] == 2


def test_in_token_mode_nodes_speak_as_the_subject_each_run_in_its_own_session() -> None:
    # A token names one agent: a node name as agent would be AgentMismatch on every call.
    # Each node run must still have its own session, or one branch's write refreshes the
    # read the other branch made (one shared session) and the write skew gets through.
    with LocalBus(auth="token", secret=SECRET) as local:
        tok = token(local.app, "rota-bot", ("lg/**", "read,write,create,delete"))
        store = SBusStore(Bus(local.url, token=tok, http_client=local.http))
        seed_rota(store.bind("rota-bot"))
        journal = Journal()
        rota_graph(store, journal).invoke({})
        checker = store.bind("rota-bot")
        on_call = {name: checker.get(NS, name) for name in ("alice", "bob")}
        states = {name: item.value["on_call"] for name, item in on_call.items() if item}
        assert sorted(states.values()) == [False, True]
        [(refused, code)] = journal.conflicts
        assert code == "CrossShardStale" and journal.attempts[refused] == 2
        assert store.bus is not None
        with store.bus.session() as auditor:
            assert auditor.history(f"lg/shared/{refused}")[0].agent_id == "rota-bot"


def test_in_memory_store_lets_the_write_skew_through() -> None:
    store = InMemoryStore()
    seed_rota(store)
    rota_graph(store, Journal()).invoke({})
    items = [store.get(NS, name) for name in ("alice", "bob")]
    assert [item.value["on_call"] for item in items if item] == [False, False]


async def test_async_graph_keeps_both_updates(alocal: AsyncLocalBus) -> None:
    store = SBusStore(abus=alocal.bus)
    await store.bind("seed").aput(NS, "counter", {"log": []})
    journal = Journal()
    await acounter_graph(store, journal).ainvoke({})
    item = await store.bind("checker").aget(NS, "counter")
    assert item is not None and sorted(item.value["log"]) == ["left", "right"]
    assert [code for _, code in journal.conflicts] == ["VersionMismatch"]
    assert sorted(journal.attempts.values()) == [1, 2]


def test_each_node_run_is_its_own_session(local: LocalBus) -> None:
    """One node runs twice in one thread: its first run reads item a, which then moves;
    its second run writes item b. The runs are different sessions (the checkpoint
    namespace names the task), so the first run's read does not constrain the second;
    one session per thread would refuse it (CrossShardStale)."""
    store = SBusStore(local.bus)
    seed = store.bind("seed")
    seed.put(NS, "a", {"v": 0})
    seed.put(NS, "b", {"v": 0})

    def worker(state: State) -> State:
        if not state.get("done"):
            assert store.get(NS, "a") is not None
            seed.put(NS, "a", {"v": 1})  # moves what this run read
        else:
            store.put(NS, "b", {"v": 1})
        return {"done": ["worker"]}

    def again(state: State) -> str:
        return "worker" if len(state.get("done", [])) < 2 else END

    builder: StateGraph[State, None, State, State] = StateGraph(State)
    builder.add_node("worker", worker)
    builder.add_edge(START, "worker")
    builder.add_conditional_edges("worker", again)
    final = builder.compile(store=store).invoke({})
    assert final["done"] == ["worker", "worker"]
    b = seed.get(NS, "b")
    assert b is not None and b.value == {"v": 1}
    assert last_writer(local.bus, "lg/shared/b") == "worker"


def test_a_node_name_that_cannot_be_a_header_is_hashed(local: LocalBus) -> None:
    store = SBusStore(local.bus)

    def node(state: State) -> State:
        store.put(NS, "x", {"v": 1})
        return {"done": ["node"]}

    builder: StateGraph[State, None, State, State] = StateGraph(State)
    builder.add_node("écrivain", node)
    builder.add_edge(START, "écrivain")
    builder.add_edge("écrivain", END)
    builder.compile(store=store).invoke({})
    agent = last_writer(local.bus, "lg/shared/x")
    assert agent.startswith("h-") and len(agent) == 42


def test_outside_a_node_the_graph_store_names_bind(local: LocalBus) -> None:
    store = SBusStore(local.bus)

    def node(state: State) -> State:
        store.put(NS, "x", {"v": 1})
        return {"done": ["node"]}

    builder: StateGraph[State, None, State, State] = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    builder.add_edge("node", END)
    builder.compile(store=store).invoke({})  # inside: fine
    with pytest.raises(RuntimeError, match=r"bind\(\)|store\.bind"):
        store.get(NS, "x")  # outside: no node to speak for
