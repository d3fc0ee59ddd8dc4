"""What SQLite's writer thread runs per request, counted with sqlite3's trace callback:
the statements of a recorded GET and of a commit (a new one fails here until it is
justified and counted), the cached ``sbus_meta`` that another process's change still
reaches, and one hand-off to the event loop per batch (docs/performance.md, "What the
hot path does today")."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from sbus.core.clock import wall_ms
from sbus.core.errors import CrossShardStale
from sbus.storage.sql.sqlite import SQLiteStore
from sbus.storage.sql.writer import Writer
from tests.storage.test_conformance import LIMITS, commit, create

BEGIN, DATA_VERSION, COMMIT = "BEGIN IMMEDIATE", "PRAGMA data_version", "COMMIT"
META = "SELECT name, value FROM sbus_meta"
LOAD = "SELECT key, id, content"
SESSION = "SELECT s.overflowed"
PUT_ENTRY = "INSERT OR REPLACE INTO sbus_dl_entries"
PUT_SESSION = "INSERT OR REPLACE INTO sbus_dl_sessions"
KINDS = (
    BEGIN,
    DATA_VERSION,
    COMMIT,
    META,
    LOAD,
    SESSION,
    PUT_ENTRY,
    PUT_SESSION,
    "INSERT INTO sbus_counters",
    "INSERT INTO sbus_history",
    "INSERT OR REPLACE INTO sbus_shards",
    "INSERT INTO sbus_changes",
)


def kind(sql: str) -> str:
    return next((k for k in KINDS if sql.startswith(k)), sql)


@pytest.fixture
def traced() -> Iterator[list[str]]:
    """Every statement run on an SQLite connection opened while the fixture is active."""
    log: list[str] = []

    def trace(dbapi_conn: Any, _: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            dbapi_conn.set_trace_callback(log.append)

    event.listen(Engine, "connect", trace)
    yield log
    event.remove(Engine, "connect", trace)


@pytest.fixture
async def store(tmp_path: Path, traced: list[str]) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(f"sqlite:///{tmp_path / 'sbus.db'}", LIMITS)
    await s.start()
    yield s
    await s.close()


async def counted(log: list[str], request: Any) -> list[str]:
    log.clear()
    await request
    return [kind(sql) for sql in log]


async def test_a_recorded_get_and_a_commit_run_these_statements(
    store: SQLiteStore, traced: list[str]
) -> None:
    await store.create(create("k"))
    # The first request after start reads sbus_meta; later ones find it cached.
    assert await counted(traced, store.read("k", "A", "", True)) == [
        BEGIN,
        LOAD,
        DATA_VERSION,
        SESSION,
        PUT_ENTRY,
        PUT_SESSION,
        COMMIT,
    ]
    assert await counted(traced, store.apply(commit("k", 0, "v1"))) == [
        BEGIN,
        DATA_VERSION,
        SESSION,  # the session's row and its entries in one statement
        LOAD,
        "INSERT INTO sbus_counters",
        # no look-up of the row's history bookkeeping: LOAD read it
        "INSERT INTO sbus_history",
        "INSERT OR REPLACE INTO sbus_shards",
        "INSERT INTO sbus_changes",  # GET /watch's change log
        PUT_ENTRY,
        PUT_SESSION,
        COMMIT,
    ]


async def test_meta_is_read_again_after_another_connection_changes_it(
    store: SQLiteStore, tmp_path: Path, traced: list[str]
) -> None:
    await store.now_ms()
    assert META not in await counted(traced, store.now_ms())
    other = sqlite3.connect(tmp_path / "sbus.db", isolation_level=None)
    try:
        other.execute("UPDATE sbus_meta SET value = 3600000 WHERE name = 'clock_offset_ms'")
    finally:
        other.close()
    traced.clear()
    now = await store.now_ms()
    assert META in [kind(sql) for sql in traced]
    assert now >= wall_ms() + 3_500_000
    assert META not in await counted(traced, store.now_ms())


async def test_meta_is_read_again_after_this_store_writes_it(store: SQLiteStore) -> None:
    before = await store.now_ms()
    await store.advance_clock(3_600_000)
    assert await store.now_ms() >= before + 3_600_000
    await store.create(create("k"))
    await store.create(create("j"))

    async def stale_commit(agent: str) -> None:
        """``agent`` reads k, another agent changes k, then ``agent`` commits j."""
        read = await store.read("k", agent, "", True)
        await store.apply(commit("k", read.version, "changed", agent="other"))
        await store.apply(commit("j", (await store.read("j", None, "", False)).version, agent))

    await store.set_ori(False)
    await stale_commit("A")  # ORI off: the stale read of k is not checked
    await store.set_ori(True)
    with pytest.raises(CrossShardStale):
        await stale_commit("B")


async def test_a_batch_goes_back_to_the_loop_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    handoffs: list[int] = []
    plain = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> Any:
        handoffs.append(len(args[0]))
        return plain(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    started, release = threading.Event(), threading.Event()

    def answer(i: int, _: Any) -> int:
        return i

    def hold(_: Any) -> bool:
        started.set()
        return release.wait(10)

    class Conn:
        def begin(self, write: bool) -> None: ...
        def commit(self) -> None: ...
        def rollback(self) -> None: ...
        def close(self) -> None: ...

    writer = Writer(Conn, is_store_error=lambda _: False)
    writer.start()
    try:
        first = asyncio.ensure_future(writer.call(hold))
        for _ in range(10_000):  # until the thread holds the first operation (10 s at most)
            if started.is_set():
                break
            await asyncio.sleep(0.001)
        assert started.is_set()
        rest = [asyncio.ensure_future(writer.call(functools.partial(answer, i))) for i in range(5)]
        await asyncio.sleep(0)  # all five queued while the thread holds the first
        release.set()
        assert await first is True
        assert await asyncio.gather(*rest) == [0, 1, 2, 3, 4]
    finally:
        writer.stop()
    assert handoffs == [1, 5]
