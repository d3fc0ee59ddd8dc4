"""``bus.watch(prefix)`` in the SDK, against a real HTTP server (tests/sse.py): the
events, resuming across a restart of the server, WatchReset, errors, the parser."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import sbus_client
from sbus.config import Settings
from sbus_client import AsyncBus, Bus, WatchEvent, WatchReset
from sbus_client._watch import EventParser
from tests.sse import open_stream, serve


def settings(store: str) -> Settings:
    return Settings(store=store, admin_enabled=True)


async def take(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    async with asyncio.timeout(30):
        async for event in events:
            out.append(event)
            if len(out) == count:
                break
    return out


async def test_async_watch_resumes_across_a_server_restart(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'sbus.db'}"
    async with serve(settings(store)) as first:
        url = f"http://127.0.0.1:{first.port}"
        bus = AsyncBus(url, agent_id="a")
        await bus.session().create("w/k", "")
        events = bus.watch("w/", after=await _head(url, "w/")).__aiter__()
        await bus.session().commit("w/k", "1", expected=0)
        got = await take(events, 1)
        port = first.port
    # the server is gone (its stream ended with its cursor); another takes its place on
    # the same file and port, and commits happen before the watcher is back
    async with serve(settings(store), port=port) as second:
        writer = AsyncBus(f"http://127.0.0.1:{second.port}", agent_id="b")
        for version in (1, 2):
            await writer.session().commit("w/k", str(version + 1), expected=version)
        got += await take(events, 2)
    assert [(e.key, e.version, e.op) for e in got] == [
        ("w/k", 1, "commit"),
        ("w/k", 2, "commit"),
        ("w/k", 3, "commit"),
    ]
    assert got[1].agent_id == "b" and got[2].cursor


async def test_watch_reset_when_the_log_is_gone() -> None:
    """A memory store's log dies with its process: the cursor cannot resume."""
    async with serve(settings("memory://")) as first:
        url = f"http://127.0.0.1:{first.port}"
        bus = AsyncBus(url, agent_id="a")
        events = bus.watch("m/", after=await _head(url, "m/")).__aiter__()
        await bus.session().create("m/k", "")
        (seen,) = await take(events, 1)
        port = first.port
    async with serve(settings("memory://"), port=port):
        with pytest.raises(WatchReset) as info:
            await take(events, 1)
    assert info.value.reason == "cursor_expired"
    assert info.value.cursor and info.value.cursor != seen.cursor


async def test_sync_watch_and_conflicts(tmp_path: Path) -> None:
    async with serve(settings(f"sqlite:///{tmp_path / 's.db'}")) as served:
        url = f"http://127.0.0.1:{served.port}"
        writer = AsyncBus(url, agent_id="w")
        await writer.session().create("s/k", "")
        head = await _head(url, "s/", include="conflicts")

        def watch() -> list[WatchEvent]:
            with Bus(url, agent_id="r") as bus:
                out: list[WatchEvent] = []
                for event in bus.watch("s/", after=head, conflicts=True):
                    out.append(event)
                    if len(out) == 2:
                        return out
            raise AssertionError("the watch ended")

        await writer.session().commit("s/k", "1", expected=0)
        with pytest.raises(sbus_client.VersionMismatch):
            await writer.session().commit("s/k", "2", expected=0)
        got = await asyncio.to_thread(watch)
    commit, conflict = sorted(got, key=lambda e: e.op)
    assert (commit.op, commit.version, commit.agent_id) == ("commit", 1, "w")
    assert (conflict.op, conflict.error, conflict.stale_keys) == (
        "conflict",
        "VersionMismatch",
        ("s/k",),
    )


async def _head(url: str, prefix: str, include: str | None = None) -> str:
    """The live edge, from a stream's ``: subscribed`` comment: a watch from it misses
    nothing committed after this returns."""
    async with (
        httpx.AsyncClient(base_url=url, trust_env=False) as client,
        open_stream(client, prefix, include=include) as stream,
    ):
        return await stream.subscribed()


async def test_an_error_answer_raises_its_class(tmp_path: Path) -> None:
    async with serve(settings("memory://")) as served:
        bus = AsyncBus(f"http://127.0.0.1:{served.port}")
        with pytest.raises(sbus_client.ValidationError):
            await take(bus.watch("/bad"), 1)
        with pytest.raises(sbus_client.InvalidCursor):
            await take(bus.watch("ok", after="nonsense"), 1)


def test_the_parser() -> None:
    parser = EventParser(None)
    lines: list[Any] = [": subscribed c0", ""]
    lines += ["id: c1", 'data: {"key": "k", "version": 1, "op": "commit", "agent_id": "a"}', ""]
    lines += [": shutting down", "id: c2", ""]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert [(e.key, e.version, e.cursor) for e in events] == [("k", 1, "c1")]
    assert parser.cursor == "c2"  # an id-only block moves the resume point
    with pytest.raises(WatchReset) as info:
        for line in ["event: reset", "id: c9", 'data: {"reason": "cursor_expired"}', ""]:
            parser.feed(line)
    assert (info.value.reason, info.value.cursor) == ("cursor_expired", "c9")
