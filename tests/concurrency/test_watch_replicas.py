"""The change stream across real ``sbus serve`` processes (protocol.md section 3.11).

- Replicas A and B over one shared store (PostgreSQL, Redis): a watcher on B receives
  the versions of 200 commits made concurrently through A, per key in version order and
  each exactly once, across a forced disconnect and a resume with Last-Event-ID on the
  other replica.
- SIGTERM: an open stream ends at once with its cursor, and the process exits without
  waiting for the graceful-shutdown timeout to cancel the stream.
"""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from tests.concurrency.conftest import (
    SHARED_TOPOLOGIES,
    ServerGroup,
    Topology,
    prepare_store,
    sqlite_url,
)
from tests.sse import Message, open_stream

pytestmark = pytest.mark.concurrency

KEYS = 8
VERSIONS = 25  # commits per key: 200 in all
DISCONNECT_AFTER = 70  # events read before the watcher's connection is dropped


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, trust_env=False, timeout=30, headers={"Content-Type": "application/json"}
    )


async def commit_all(a: httpx.AsyncClient, key: str) -> None:
    r = await a.post("/shard", json={"key": key, "content": "", "agent_id": "w"})
    assert r.status_code == 201, r.text
    for v in range(VERSIONS):
        r = await a.post(
            "/commit",
            json={"key": key, "expected_version": v, "delta": str(v + 1), "agent_id": "w"},
        )
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("topology", SHARED_TOPOLOGIES, ids=str)
def test_a_watcher_on_one_replica_sees_every_commit_of_the_other(
    topology: Topology, tmp_path: Path
) -> None:
    group = ServerGroup(tmp_path / "logs")
    try:
        store = prepare_store(topology, tmp_path)
        a, b = group.start_replicas(store, 2)
        asyncio.run(_watch_while_committing(a.base_url, b.base_url))
    finally:
        group.fail_on(group.stop_all())


async def _watch_while_committing(url_a: str, url_b: str) -> None:
    keys = [f"w/{i}" for i in range(KEYS)]
    got: list[Message] = []
    async with client(url_a) as a, client(url_b) as b:
        async with open_stream(b, "w/") as stream:
            await stream.subscribed()
            writers = asyncio.gather(*(commit_all(a, key) for key in keys))
            got += await stream.events(DISCONNECT_AFTER)
        # the connection is gone; the writers go on meanwhile
        await writers
        # resume on the other replica: the cursor is the store's, not the process's
        async with open_stream(a, "w/", last_event_id=got[-1].id) as stream:
            assert await stream.subscribed() == got[-1].id
            got += await stream.events(KEYS * (VERSIONS + 1) - DISCONNECT_AFTER)
            # nothing beyond: a commit made now is the next event, not a repeat
            r = await a.post(
                "/commit",
                json={"key": keys[0], "expected_version": VERSIONS, "delta": "x", "agent_id": "w"},
            )
            assert r.status_code == 200, r.text
            (last,) = await stream.events(1)
    assert (last.json()["key"], last.json()["version"]) == (keys[0], VERSIONS + 1)
    by_key: dict[str, list[int]] = defaultdict(list)
    for message in got:
        data = message.json()
        by_key[data["key"]].append(data["version"])
    assert dict(by_key) == {key: list(range(VERSIONS + 1)) for key in keys}
    assert len({m.id for m in got}) == len(got)


def test_sigterm_ends_the_stream_with_its_cursor(tmp_path: Path) -> None:
    group = ServerGroup(tmp_path / "logs")
    server = group.start(sqlite_url(tmp_path), workers=1)
    try:
        asyncio.run(_stream_until_sigterm(server.base_url, server.process.send_signal))
        code = server.process.wait(timeout=30)
    finally:
        problems = group.stop_all()
    assert not server.killed
    assert code == 0, code
    group.fail_on(problems)
    assert "timeout graceful shutdown exceeded" not in server.log_text()


async def _stream_until_sigterm(url: str, send_signal: object) -> None:
    async with client(url) as c, open_stream(c, "t/") as stream:
        await stream.subscribed()
        r = await c.post("/shard", json={"key": "t/k", "content": ""})
        assert r.status_code == 201, r.text
        (event,) = await stream.events(1)
        send_signal(signal.SIGTERM)  # type: ignore[operator]
        last = await stream.next()
        assert last is not None
        assert last.comments == ["shutting down"]
        assert (last.id, last.data) == (event.id, None)
        assert await stream.next() is None
