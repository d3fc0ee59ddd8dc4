"""SBusSession against real ``sbus serve`` processes (one over SQLite, two replicas over
PostgreSQL, two over Redis; tests.concurrency's servers): a conversation larger than
SBUS_MAX_DELTA and SBUS_MAX_BODY round-trips, and two writers appending 50 items each
at once, through different replicas, lose nothing and keep each writer's order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from agents.items import TResponseInputItem

from sbus_client import AsyncBus
from sbus_client.openai_agents import Head, SBusSession
from tests.concurrency.conftest import (
    TOPOLOGIES,
    Bus,
    ServerGroup,
    prepare_store,
)

pytestmark = pytest.mark.concurrency

MAX_DELTA = 262_144  # the bus's default SBUS_MAX_DELTA
MAX_BODY = 1_048_576  # and SBUS_MAX_BODY


@pytest.fixture(scope="module", params=TOPOLOGIES, ids=str)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bus]:
    """The bus processes of one topology, shared by this module's tests (each test uses
    its own conversation ids)."""
    tmp: Path = tmp_path_factory.mktemp(f"oai-{request.param}")
    group = ServerGroup(tmp / "logs")
    try:
        servers = group.start_replicas(prepare_store(request.param, tmp), request.param.replicas)
    except BaseException:
        group.stop_all()
        raise
    yield Bus(request.param, servers)
    group.fail_on(group.stop_all())


@asynccontextmanager
async def session_on(url: str, conversation: str, agent: str) -> AsyncIterator[SBusSession]:
    # Loopback only, never through a proxy from the environment.
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
        yield SBusSession(conversation, AsyncBus(url, agent_id=agent, http_client=http))


def item(role: str, text: str) -> TResponseInputItem:
    return cast(TResponseInputItem, {"role": role, "content": text})


async def test_a_conversation_over_the_content_and_body_limits_round_trips(served: Bus) -> None:
    items = [item("user" if i % 2 else "assistant", f"{i}:" + "x" * 30_000) for i in range(40)]
    total = sum(len(json.dumps(i)) for i in items)
    assert total > MAX_BODY > MAX_DELTA
    async with (
        session_on(served.url(0), "long", "writer") as writer,
        session_on(served.url(1), "long", "reader") as reader,
    ):
        await writer.add_items(items[:1])
        await writer.add_items(items[1:])  # one call: split into bodies the bus accepts
        assert await reader.get_items() == items
        assert await reader.get_items(3) == items[-3:]
        assert await reader.pop_item() == items[-1]
        await reader.clear_session()
        assert await writer.get_items() == []
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
        listing = AsyncBus(served.url(0), http_client=http).session()
        assert await listing.list("oai/long/") == ["oai/long/head"]


async def test_two_writers_lose_nothing_and_keep_their_order(served: Bus) -> None:
    per_writer = 50
    start = asyncio.Barrier(2)

    def meet_after_first_read(session: SBusSession) -> None:
        """Both writers read the (absent) head before either commits, so the first
        appends collide for sure; after that they run freely."""
        original = session._read_head
        first = True

        async def read_head() -> Head:
            nonlocal first
            head = await original()
            if first:
                first = False
                await start.wait()
            return head

        session._read_head = read_head  # type: ignore[method-assign]

    async def write(session: SBusSession, name: str) -> None:
        for i in range(per_writer):
            await session.add_items([item("user", f"{name}-{i}")])

    async with (
        session_on(served.url(0), "shared", "a") as a,
        session_on(served.url(1), "shared", "b") as b,
    ):
        meet_after_first_read(a)
        meet_after_first_read(b)
        await asyncio.gather(write(a, "a"), write(b, "b"))
        texts = [cast(dict[str, Any], i)["content"] for i in await a.get_items()]
        assert await b.get_items(limit=None) == await a.get_items()
        print(f"\nconflicts redone: a={a.conflicts} b={b.conflicts}")
    assert len(texts) == 2 * per_writer
    for name in ("a", "b"):
        assert [t for t in texts if t.startswith(f"{name}-")] == [
            f"{name}-{i}" for i in range(per_writer)
        ]
    assert a.conflicts + b.conflicts >= 1  # they really collided (the first appends at least)
