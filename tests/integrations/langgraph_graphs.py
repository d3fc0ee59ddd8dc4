"""Graphs whose branches race on a store, for the LangGraph tests (in process and
against real ``sbus serve`` processes).

Both graphs run two branches in parallel under a ``RetryPolicy``. A barrier holds each
branch's FIRST attempt between its reads and its write, so both branches read the same
state before either writes: the worst interleaving, forced without timing. A retry
(attempt 2 on) skips the barrier. Each graph records every attempt and every store
error it saw, so a test can check what happened, not only how it ended.
"""

from __future__ import annotations

import asyncio
import operator
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore
from langgraph.types import RetryPolicy

from sbus_client import ConflictError

NS = ("shared",)
BRANCHES = ("left", "right")
DOCTORS = ("alice", "bob")
BARRIER_TIMEOUT_S = 60.0
# Retries right away: nothing here waits for anything but the other branch.
RETRY = RetryPolicy(max_attempts=5, initial_interval=0.0, backoff_factor=1.0, jitter=False)


class State(TypedDict, total=False):
    done: Annotated[list[str], operator.add]  # the branches that finished


@dataclass
class Journal:
    """What the branches did: attempts per branch, and the conflict codes they hit."""

    attempts: dict[str, int] = field(default_factory=dict)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, runtime: Runtime[Any], name: str) -> int:
        info = runtime.execution_info
        attempt = info.node_attempt if info is not None else 1
        with self.lock:
            self.attempts[name] = self.attempts.get(name, 0) + 1
        return attempt

    def conflict(self, name: str, err: ConflictError) -> None:
        with self.lock:
            self.conflicts.append((name, err.code))


def _store(runtime: Runtime[Any]) -> BaseStore:
    assert runtime.store is not None, "the graph is compiled with a store"
    return runtime.store


def _graph(nodes: dict[str, Any], store: BaseStore) -> CompiledStateGraph[Any, Any, Any, Any]:
    builder: StateGraph[Any, Any, Any, Any] = StateGraph(State)
    for name, node in nodes.items():
        builder.add_node(name, node, retry_policy=RETRY)
        builder.add_edge(START, name)
        builder.add_edge(name, END)
    return builder.compile(store=store)


def appended(value: dict[str, Any] | None, name: str) -> dict[str, Any]:
    log = list(value["log"]) if value else []
    return {"log": [*log, name]}


def counter_graph(store: BaseStore, journal: Journal) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Each branch appends its name to the item ``counter`` (read, modify, write)."""
    barrier = threading.Barrier(len(BRANCHES), timeout=BARRIER_TIMEOUT_S)

    def branch(name: str) -> Any:
        def node(state: State, runtime: Runtime[Any]) -> State:
            attempt = journal.attempt(runtime, name)
            item = _store(runtime).get(NS, "counter")
            if attempt == 1:
                barrier.wait()
            try:
                _store(runtime).put(NS, "counter", appended(item.value if item else None, name))
            except ConflictError as err:
                journal.conflict(name, err)
                raise
            return {"done": [name]}

        return node

    return _graph({name: branch(name) for name in BRANCHES}, store)


def acounter_graph(store: BaseStore, journal: Journal) -> CompiledStateGraph[Any, Any, Any, Any]:
    """:func:`counter_graph` with async nodes (the store's ``abatch``)."""
    barrier = asyncio.Barrier(len(BRANCHES))

    def branch(name: str) -> Any:
        async def node(state: State, runtime: Runtime[Any]) -> State:
            attempt = journal.attempt(runtime, name)
            item = await _store(runtime).aget(NS, "counter")
            if attempt == 1:
                await asyncio.wait_for(barrier.wait(), BARRIER_TIMEOUT_S)
            try:
                await _store(runtime).aput(
                    NS, "counter", appended(item.value if item else None, name)
                )
            except ConflictError as err:
                journal.conflict(name, err)
                raise
            return {"done": [name]}

        return node

    return _graph({name: branch(name) for name in BRANCHES}, store)


def rota_graph(store: BaseStore, journal: Journal) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Write skew: each doctor goes off call if the other one is still on call. Each
    branch reads both items and writes only its own."""
    barrier = threading.Barrier(len(DOCTORS), timeout=BARRIER_TIMEOUT_S)

    def branch(me: str, other: str) -> Any:
        def node(state: State, runtime: Runtime[Any]) -> State:
            attempt = journal.attempt(runtime, me)
            mine = _store(runtime).get(NS, me)
            theirs = _store(runtime).get(NS, other)
            if attempt == 1:
                barrier.wait()
            assert mine is not None and theirs is not None
            if theirs.value["on_call"]:
                try:
                    _store(runtime).put(NS, me, {"on_call": False})
                except ConflictError as err:
                    journal.conflict(me, err)
                    raise
            return {"done": [me]}

        return node

    return _graph({"alice": branch("alice", "bob"), "bob": branch("bob", "alice")}, store)


def seed_rota(store: BaseStore) -> None:
    for name in DOCTORS:
        store.put(NS, name, {"on_call": True})
