"""GET /history/{key}: order, paging, retention and the hash chain (protocol.md §3)."""

from __future__ import annotations

import httpx
import pytest

from tests.api.helpers import (
    GENESIS,
    TIMESTAMP,
    committed,
    create,
    delete,
    entry_hash,
    history,
    ok,
    problem,
    read,
    verify_chain,
)
from tests.conftest import AppFactory

ENTRY_FIELDS = {
    "version",
    "agent_id",
    "committed_at",
    "content",
    "deleted",
    "rationale",
    "commit_id",
    "prev_hash",
    "hash",
}


async def test_history_newest_first_with_genesis(client: httpx.AsyncClient) -> None:
    await create(client, "k", "c0", agent_id="creator")
    first = await committed(client, "k", 0, "c1", agent="a", rationale="because")
    second = await committed(client, "k", 1, "c2", agent="b")
    entries = await history(client, "k")
    assert [e["version"] for e in entries] == [2, 1, 0]
    for entry in entries:
        assert set(entry) == ENTRY_FIELDS
        assert TIMESTAMP.match(entry["committed_at"])
        assert entry["deleted"] is False
    assert [e["content"] for e in entries] == ["c2", "c1", "c0"]
    assert [e["agent_id"] for e in entries] == ["b", "a", "creator"]
    assert [e["rationale"] for e in entries] == [None, "because", "create"]
    assert entries[0]["commit_id"] == second["commit_id"]
    assert entries[1]["commit_id"] == first["commit_id"]
    assert entries[2]["prev_hash"] == GENESIS
    verify_chain(entries, from_genesis=True)
    assert (await read(client, "k"))["delta_log_depth"] == 2


async def test_history_chain_with_unicode_and_delete(client: httpx.AsyncClient) -> None:
    await create(client, "k", "héllo ☃ \U0001f600")
    await committed(client, "k", 0, 'quote " and \\ and \n newline', rationale="ünïcode ✓")
    assert (await delete(client, "k", 1)).status_code == 204
    await create(client, "k", "reborn")
    await committed(client, "k", 3, "")
    r = await client.post("/rollback", json={"key": "k", "target_version": 0, "agent_id": "r"})
    assert ok(r)["version"] == 5
    entries = await history(client, "k")
    assert [e["version"] for e in entries] == [5, 4, 3, 2, 1, 0]
    assert [e["deleted"] for e in entries] == [False, False, False, True, False, False]
    assert entries[0]["rationale"] == "rollback to 0"
    assert entries[3]["rationale"] == "delete"
    assert entries[2]["rationale"] == "create"
    verify_chain(entries, from_genesis=True)


async def test_history_tampering_would_show(client: httpx.AsyncClient) -> None:
    """The recomputation is sensitive to every hashed field."""
    await create(client, "k", "c0")
    entry = (await history(client, "k"))[0]
    assert entry_hash(entry) == entry["hash"]
    for field, value in (
        ("content", "x"),
        ("agent_id", "z"),
        ("rationale", None),
        ("deleted", True),
        ("version", 1),
    ):
        assert entry_hash({**entry, field: value}) != entry["hash"]


async def test_history_before_and_limit(client: httpx.AsyncClient) -> None:
    await create(client, "k", "c0")
    for v in range(5):
        await committed(client, "k", v, f"c{v + 1}")
    assert [e["version"] for e in await history(client, "k", limit=2)] == [5, 4]
    assert [e["version"] for e in await history(client, "k", before=3)] == [2, 1, 0]
    assert [e["version"] for e in await history(client, "k", before=3, limit=2)] == [2, 1]
    assert [e["version"] for e in await history(client, "k", before=1)] == [0]
    assert await history(client, "k", before=0) == []
    assert [e["version"] for e in await history(client, "k", before=99)] == [5, 4, 3, 2, 1, 0]
    # pages stitch into one verifiable chain
    page1 = await history(client, "k", limit=3)
    page2 = await history(client, "k", before=page1[-1]["version"], limit=3)
    verify_chain(page1 + page2, from_genesis=True)


async def test_history_missing_key(client: httpx.AsyncClient) -> None:
    body = problem(await client.get("/history/nope"), 404, "ShardNotFound")
    assert body["key"] == "nope"


async def test_history_of_deleted_key_is_kept(client: httpx.AsyncClient) -> None:
    await create(client, "k", "c0")
    assert (await delete(client, "k", 0, agent="d")).status_code == 204
    entries = await history(client, "k")
    assert [(e["version"], e["deleted"], e["agent_id"]) for e in entries] == [
        (1, True, "d"),
        (0, False, ""),
    ]


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "1001"}, {"before": "-1"}, {"limit": "x"}, {"before": str(2**53)}],
)
async def test_history_bad_params(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    await create(client, "k")
    problem(await client.get("/history/k", params=params), 422, "ValidationError")


async def test_history_limit_max(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    assert len(await history(client, "k", limit=1000)) == 1


async def test_history_depth_trims_oldest(make_client: AppFactory) -> None:
    _, c = await make_client(history_depth=3)
    await create(c, "k", "c0")
    for v in range(4):
        await committed(c, "k", v, f"c{v + 1}")
    entries = await history(c, "k")
    assert [e["version"] for e in entries] == [4, 3, 2]
    verify_chain(entries, from_genesis=False)
    assert entries[-1]["prev_hash"] != GENESIS
    assert (await read(c, "k"))["delta_log_depth"] == 3


async def test_history_depth_counts_genesis(make_client: AppFactory) -> None:
    _, c = await make_client(history_depth=3)
    await create(c, "k", "c0")
    await committed(c, "k", 0, "c1")
    await committed(c, "k", 1, "c2")
    assert [e["version"] for e in await history(c, "k")] == [2, 1, 0]
    assert (await read(c, "k"))["delta_log_depth"] == 2


async def test_history_max_bytes(make_client: AppFactory) -> None:
    _, c = await make_client(history_max_bytes=10)
    await create(c, "k", "aaaaaa")
    await committed(c, "k", 0, "bbbbbb")
    entries = await history(c, "k")
    assert [e["version"] for e in entries] == [1]
    assert (await read(c, "k"))["delta_log_depth"] == 1
    r = await c.post("/rollback", json={"key": "k", "target_version": 0, "agent_id": "r"})
    problem(r, 404, "VersionNotFound")


async def test_history_max_bytes_counts_every_byte_of_an_entry(make_client: AppFactory) -> None:
    """Rationales count against SBUS_HISTORY_MAX_BYTES like content: each commit below
    retains about 1080 bytes (900 of rationale, the hashes, ids and one of content), so a
    3000-byte budget keeps the newest two and trims the older ones."""
    _, c = await make_client(history_max_bytes=3000)
    await create(c, "k", "c0")
    for version in range(5):
        await committed(c, "k", version, "c", rationale="r" * 900)
    assert [e["version"] for e in await history(c, "k")] == [5, 4]
    assert (await read(c, "k"))["delta_log_depth"] == 2


async def test_history_default_limit_is_100(client: httpx.AsyncClient) -> None:
    """protocol.md §2: without ``limit`` a page holds the newest 100 entries; ``before``
    pages on to the rest."""
    await create(client, "k", "c0")
    for version in range(120):
        await committed(client, "k", version, f"c{version + 1}")
    page = await history(client, "k")
    assert [e["version"] for e in page] == list(range(120, 20, -1))
    rest = await history(client, "k", before=21)
    assert [e["version"] for e in rest] == list(range(20, -1, -1))
