"""The change log and the conflict ring of the Store Protocol (sbus.core.changes), on
every store: what the atomic steps append, in what order, what a cursor resumes, when
it expires, and what the ring keeps. Two SQLite stores over one file stand for two
worker processes sharing it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sbus.core import errors as e
from sbus.core.changes import Change, Conflict, CursorExpired
from sbus.core.engine import commit_txn, new_commit_id
from sbus.core.store import Store
from sbus.core.types import CreateOp, Limits, WriteOp
from sbus.storage.factory import open_store
from tests.conftest import store_url

LIMITS = Limits(change_max=3, conflict_ring=2)


@pytest.fixture
async def store(store_kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    s = open_store(store_url(store_kind, tmp_path), LIMITS)
    await s.start()
    yield s
    await s.close()


def create(key: str) -> CreateOp:
    return CreateOp(key, "", "", False, "A", new_commit_id())


async def write(store: Store, *writes: WriteOp, agent: str = "A") -> str:
    txn = commit_txn(
        op="multi" if len(writes) > 1 else writes[0].kind,  # type: ignore[arg-type]
        agent_id=agent,
        session_id="",
        writes=list(writes),
        read_set=[],
        rationale=None,
        idem=None,
    )
    await store.apply(txn)
    return txn.commit_id


async def everything(store: Store, cursor: str, prefix: str = "") -> list[Change]:
    out: list[Change] = []
    while True:
        page = await store.changes_after(cursor, prefix, 2)  # small pages: paging too
        out += [ev.change for ev in page.events]
        if page.cursor == cursor and not page.events:
            return out
        cursor = page.cursor


async def test_one_change_per_version_in_the_atomic_step(store: Store) -> None:
    head = await store.change_head()
    await store.create(create("a"))
    cid = await write(store, WriteOp("a", 0, "commit", "x"), agent="B")
    with pytest.raises(e.VersionMismatch):
        await write(store, WriteOp("a", 0, "commit", "y"))  # refused: no change
    await store.admin_create(create("b"))
    await write(store, WriteOp("b", 0, "commit", "z"), WriteOp("c", None, "create", "w"))
    await write(store, WriteOp("a", 1, "rollback", target_version=0))
    await write(store, WriteOp("a", 2, "delete"))
    changes = await everything(store, head)
    assert [(c.key, c.version, c.op) for c in changes if c.key == "a"] == [
        ("a", 0, "create"),
        ("a", 1, "commit"),
        ("a", 2, "rollback"),
        ("a", 3, "delete"),
    ]
    assert sorted((c.key, c.version, c.op) for c in changes if c.key != "a") == [
        ("b", 0, "create"),
        ("b", 1, "commit"),
        ("c", 0, "create"),
    ]
    second = next(c for c in changes if (c.key, c.version) == ("a", 1))
    assert (second.agent_id, second.commit_id) == ("B", cid)
    assert second.committed_ms > 0
    # the prefix keeps what it names, and the cursor still moves past the rest
    assert [(c.key, c.version) for c in await everything(store, head, "b")] == [
        ("b", 0),
        ("b", 1),
    ]
    assert await everything(store, await store.change_head()) == []


async def test_a_cursor_resumes_right_after_its_change(store: Store) -> None:
    await store.create(create("k"))
    head = await store.change_head()
    for v in range(3):
        await write(store, WriteOp("k", v, "commit", str(v)))
    page = await store.changes_after(head, "", 10)
    middle = page.events[0].cursor
    rest = await everything(store, middle)
    assert [c.version for c in rest] == [2, 3]


async def test_bad_and_expired_cursors(store: Store) -> None:
    with pytest.raises(e.InvalidCursor):
        await store.changes_after("not a cursor", "", 1)
    head = await store.change_head()
    await store.create(create("k"))
    for v in range(4):
        await write(store, WriteOp("k", v, "commit", str(v)))
    assert len(await everything(store, head)) == 5
    await store.purge()  # keeps the newest 3 (change_max)
    with pytest.raises(CursorExpired):
        await store.changes_after(head, "", 1)
    latest = await store.change_head()
    await write(store, WriteOp("k", 4, "commit", "5"))
    assert [c.version for c in await everything(store, latest)] == [5]


async def test_the_conflict_ring_keeps_the_newest(store: Store) -> None:
    head = await store.conflict_head()
    for i in range(3):
        await store.record_conflict(Conflict(f"k{i}", "A", "VersionMismatch", (f"k{i}",)))
    page = await store.conflicts_after(head, 10)
    assert [ev.conflict.key for ev in page.events] == ["k1", "k2"]  # ring of 2
    assert page.events[0].conflict == Conflict("k1", "A", "VersionMismatch", ("k1",))
    again = await store.conflicts_after(page.cursor, 10)
    assert (again.events, again.cursor) == ([], page.cursor)
    with pytest.raises(e.InvalidCursor):
        await store.conflicts_after("bogus", 1)


async def test_sqlite_workers_share_one_log(tmp_path: Path) -> None:
    url = store_url("sqlite", tmp_path)
    one, two = open_store(url, LIMITS), open_store(url, LIMITS)
    await one.start()
    await two.start()
    try:
        head = await two.change_head()
        await one.create(create("k"))
        await two.apply(
            commit_txn(
                op="commit",
                agent_id="B",
                session_id="",
                writes=[WriteOp("k", 0, "commit", "x")],
                read_set=[],
                rationale=None,
                idem=None,
            )
        )
        for reader in (one, two):
            assert [(c.key, c.version) for c in await everything(reader, head)] == [
                ("k", 0),
                ("k", 1),
            ]
    finally:
        await one.close()
        await two.close()
