"""POST /shard, GET /shard/{key}, GET /shards and DELETE /shard/{key} (protocol.md §§2, 3)."""

from __future__ import annotations

import httpx
import pytest
from asgi_lifespan import LifespanManager

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.core.engine import new_commit_id
from sbus.core.types import CreateOp
from tests.api.helpers import (
    SHARD_FIELDS,
    TIMESTAMP,
    commit,
    committed,
    create,
    delete,
    dl_entries,
    ok,
    problem,
    read,
    sha256_hex,
    stats,
)
from tests.conftest import AppFactory

# -- create ------------------------------------------------------------------------------


async def test_create_returns_shard_and_etag(client: httpx.AsyncClient) -> None:
    r = await client.post("/shard", json={"key": "plan/a", "content": "v0", "goal_tag": "g"})
    body = ok(r, 201)
    assert r.headers["etag"] == '"0"'
    assert set(body) == SHARD_FIELDS
    assert body["key"] == "plan/a"
    assert body["version"] == 0
    assert body["content"] == "v0"
    assert body["goal_tag"] == "g"
    assert body["owner"] is None
    assert body["id"] == sha256_hex("v0")
    assert body["attempt_count"] == 0
    assert body["conflict_count"] == 0
    assert body["delta_log_depth"] == 0
    assert body["policy"] == {"require_mandate": False}
    assert TIMESTAMP.match(body["created_at"])
    assert body["created_at"] == body["updated_at"]


async def test_create_defaults_goal_tag(client: httpx.AsyncClient) -> None:
    body = await create(client, "k")
    assert body["goal_tag"] == ""
    assert body["content"] == ""


async def test_create_policy_is_echoed(client: httpx.AsyncClient) -> None:
    body = await create(client, "k", "x", policy={"require_mandate": True})
    assert body["policy"] == {"require_mandate": True}
    assert (await read(client, "k"))["policy"] == {"require_mandate": True}


async def test_create_twice_is_conflict(client: httpx.AsyncClient) -> None:
    await create(client, "k", "one")
    before = await stats(client)
    body = problem(
        await client.post("/shard", json={"key": "k", "content": "two"}), 409, "ShardAlreadyExists"
    )
    assert body["key"] == "k"
    assert (await read(client, "k"))["content"] == "one"
    assert await stats(client) == before


async def test_create_counts_shards(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    s = await stats(client)
    assert s["total_shards"] == 2
    assert s["total_commits"] == 0


async def test_recreate_over_tombstone_continues_version(client: httpx.AsyncClient) -> None:
    await create(client, "k", "v0")
    await committed(client, "k", 0, "v1")
    assert (await delete(client, "k", 1)).status_code == 204
    r = await client.post("/shard", json={"key": "k", "content": "again", "goal_tag": "t2"})
    body = ok(r, 201)
    assert r.headers["etag"] == '"3"'
    assert body["version"] == 3
    assert body["content"] == "again"
    assert body["goal_tag"] == "t2"
    assert body["id"] == sha256_hex("again")
    assert body["attempt_count"] == 0
    assert body["delta_log_depth"] == 3
    # the history chain continues through the tombstone
    entries = ok(await client.get("/history/k"))["entries"]
    assert [e["version"] for e in entries] == [3, 2, 1, 0]
    assert entries[0]["prev_hash"] == entries[1]["hash"]
    assert entries[1]["deleted"] is True
    assert entries[0]["deleted"] is False
    # and the next commit goes on from there
    await committed(client, "k", 3, "v4")


async def test_create_over_tombstone_twice_conflicts(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    assert (await delete(client, "k", 0)).status_code == 204
    await create(client, "k")
    problem(
        await client.post("/shard", json={"key": "k", "content": ""}), 409, "ShardAlreadyExists"
    )


# -- read --------------------------------------------------------------------------------


async def test_get_with_agent_records_delivery(client: httpx.AsyncClient) -> None:
    await create(client, "k", "c")
    await committed(client, "k", 0, "c1", agent="writer")
    r = await client.get("/shard/k", params={"agent_id": "a"})
    body = ok(r)
    assert r.headers["etag"] == '"1"'
    assert set(body) == SHARD_FIELDS
    assert body["version"] == 1
    assert body["content"] == "c1"
    assert body["attempt_count"] == 1
    assert body["delta_log_depth"] == 1
    assert await dl_entries(client, "a") == {"k": 1}
    s = await stats(client)
    assert s["delivery_log"]["deliveries"] == 2  # a's read, the writer's read-your-write
    assert s["delivery_log"]["agents"] == 2


async def test_get_with_session_records_in_that_session(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    ok(await client.get("/shard/k", params={"agent_id": "a", "session_id": "s1"}))
    assert await dl_entries(client, "a", "s1") == {"k": 0}
    assert await dl_entries(client, "a") == {}


async def test_get_with_agent_header_records(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    ok(await client.get("/shard/k", headers={"X-Agent-Id": "h"}))
    ok(await client.get("/shard/k", headers={"X-SBus-Agent-Id": "h2", "X-SBus-Session-Id": "s"}))
    assert await dl_entries(client, "h") == {"k": 0}
    assert await dl_entries(client, "h2", "s") == {"k": 0}


async def test_get_without_agent_records_nothing(client: httpx.AsyncClient) -> None:
    await create(client, "k", "c")
    r = await client.get("/shard/k")
    assert ok(r)["content"] == "c"
    assert r.headers["etag"] == '"0"'
    assert (await stats(client))["delivery_log"] == {"agents": 0, "deliveries": 0}


async def test_get_record_false_records_nothing(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    ok(await client.get("/shard/k", params={"agent_id": "a", "record": "false"}))
    assert await dl_entries(client, "a") == {}
    # and so a later commit by a is not constrained by what it browsed
    await create(client, "other")
    await committed(client, "k", 0, "x", agent="b")
    await committed(client, "other", 0, "y", agent="a")


async def test_get_record_false_does_not_refresh_entry(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    await create(client, "w")
    ok(await client.get("/shard/k", params={"agent_id": "a"}))
    await committed(client, "k", 0, "x", agent="b")
    ok(await client.get("/shard/k", params={"agent_id": "a", "record": "false"}))
    assert await dl_entries(client, "a") == {"k": 0}
    problem(await commit(client, "w", 0, "z", agent="a"), 409, "CrossShardStale")


async def test_get_missing_is_shard_not_found(client: httpx.AsyncClient) -> None:
    body = problem(await client.get("/shard/nope", params={"agent_id": "a"}), 404, "ShardNotFound")
    assert body["key"] == "nope"
    assert await dl_entries(client, "a") == {}


async def test_get_deleted_is_shard_deleted_and_records_tombstone(
    client: httpx.AsyncClient,
) -> None:
    await create(client, "k")
    await committed(client, "k", 0, "x")
    assert (await delete(client, "k", 1, agent="d")).status_code == 204
    body = problem(await client.get("/shard/k", params={"agent_id": "r"}), 404, "ShardDeleted")
    assert body["key"] == "k"
    assert body["version"] == 2
    assert await dl_entries(client, "r") == {"k": 2}


async def test_get_deleted_then_recreate_is_stale_for_reader(client: httpx.AsyncClient) -> None:
    """No ABA: a reader who saw the tombstone is stale once the key is re-created."""
    await create(client, "k")
    await create(client, "w")
    assert (await delete(client, "k", 0, agent="d")).status_code == 204
    problem(await client.get("/shard/k", params={"agent_id": "r"}), 404, "ShardDeleted")
    body = await create(client, "k", "new")
    assert body["version"] == 2
    assert (await read(client, "k"))["version"] == 2
    stale = problem(await commit(client, "w", 0, "z", agent="r"), 409, "CrossShardStale")
    assert stale["key"] == "k"
    assert stale["version_at_read"] == 1
    assert stale["current_version"] == 2


async def test_get_key_with_slashes(client: httpx.AsyncClient) -> None:
    await create(client, "a/b/c:d@e-f_g.h", "deep")
    assert (await read(client, "a/b/c:d@e-f_g.h"))["content"] == "deep"


async def test_require_agent_id_makes_anonymous_get_400(make_client: AppFactory) -> None:
    _, c = await make_client(require_agent_id=True)
    await create(c, "k")
    problem(await c.get("/shard/k"), 400, "AgentRequired")
    ok(await c.get("/shard/k", params={"agent_id": "a"}))
    ok(await c.get("/shard/k", headers={"X-Agent-Id": "a"}))


async def test_get_agent_mismatch(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.get("/shard/k", params={"agent_id": "a"}, headers={"X-Agent-Id": "b"})
    problem(r, 403, "AgentMismatch")
    r = await client.get("/shard/k", headers={"X-Agent-Id": "a", "X-SBus-Agent-Id": "b"})
    problem(r, 403, "AgentMismatch")
    r = await client.get(
        "/shard/k",
        params={"agent_id": "a", "session_id": "s1"},
        headers={"X-SBus-Session-Id": "s2"},
    )
    problem(r, 403, "AgentMismatch")
    assert (await stats(client))["delivery_log"]["deliveries"] == 0
    # agreeing sources are fine
    r = await client.get("/shard/k", params={"agent_id": "a"}, headers={"X-Agent-Id": "a"})
    ok(r)


# -- list --------------------------------------------------------------------------------


async def test_list_sorted_with_count(client: httpx.AsyncClient) -> None:
    for key in ("b", "a/2", "a/1", "c"):
        await create(client, key)
    body = ok(await client.get("/shards"))
    assert body == {"shards": ["a/1", "a/2", "b", "c"], "count": 4, "next_after": None}


async def test_list_empty(client: httpx.AsyncClient) -> None:
    assert ok(await client.get("/shards")) == {"shards": [], "count": 0, "next_after": None}


async def test_list_prefix(client: httpx.AsyncClient) -> None:
    for key in ("plan/a", "plan/b", "planx", "notes/a"):
        await create(client, key)
    body = ok(await client.get("/shards", params={"prefix": "plan/"}))
    assert body == {"shards": ["plan/a", "plan/b"], "count": 2, "next_after": None}
    body = ok(await client.get("/shards", params={"prefix": "zzz"}))
    assert body == {"shards": [], "count": 0, "next_after": None}


async def test_list_paging(client: httpx.AsyncClient) -> None:
    for key in ("e", "d", "c", "b", "a"):
        await create(client, key)
    page = ok(await client.get("/shards", params={"limit": 2}))
    assert page == {"shards": ["a", "b"], "count": 2, "next_after": "b"}
    page = ok(await client.get("/shards", params={"limit": 2, "after": "b"}))
    assert page == {"shards": ["c", "d"], "count": 2, "next_after": "d"}
    page = ok(await client.get("/shards", params={"limit": 2, "after": "d"}))
    assert page == {"shards": ["e"], "count": 1, "next_after": None}
    # exactly filling the page leaves no cursor
    page = ok(await client.get("/shards", params={"limit": 3, "after": "b"}))
    assert page == {"shards": ["c", "d", "e"], "count": 3, "next_after": None}


async def test_list_prefix_and_after(client: httpx.AsyncClient) -> None:
    for key in ("p/a", "p/b", "p/c", "q"):
        await create(client, key)
    page = ok(await client.get("/shards", params={"prefix": "p/", "after": "p/a", "limit": 1}))
    assert page == {"shards": ["p/b"], "count": 1, "next_after": "p/b"}


async def test_list_excludes_tombstones(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    assert (await delete(client, "a", 0)).status_code == 204
    assert ok(await client.get("/shards"))["shards"] == ["b"]
    assert (await stats(client))["total_shards"] == 1
    await create(client, "a")
    assert ok(await client.get("/shards"))["shards"] == ["a", "b"]


async def test_list_capped_by_list_max(make_client: AppFactory) -> None:
    _, c = await make_client(list_max=2)
    for key in ("a", "b", "c"):
        await create(c, key)
    assert ok(await c.get("/shards")) == {"shards": ["a", "b"], "count": 2, "next_after": "b"}
    page = ok(await c.get("/shards", params={"limit": 100}))
    assert page == {"shards": ["a", "b"], "count": 2, "next_after": "b"}


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "-1"}, {"limit": "x"}])
async def test_list_bad_limit(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    problem(await client.get("/shards", params=params), 422, "ValidationError")


# -- delete ------------------------------------------------------------------------------


async def test_delete_with_expected_version(client: httpx.AsyncClient) -> None:
    await create(client, "k", "c")
    r = await delete(client, "k", 0)
    assert r.status_code == 204
    assert r.content == b""
    assert r.headers["etag"] == '"1"'
    s = await stats(client)
    assert s["total_commits"] == 1
    assert s["total_shards"] == 0
    entries = ok(await client.get("/history/k"))["entries"]
    assert entries[0]["version"] == 1
    assert entries[0]["deleted"] is True
    assert entries[0]["content"] == ""
    assert entries[0]["agent_id"] == "a"


async def test_delete_with_if_match(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    await committed(client, "k", 0, "x")
    r = await client.delete("/shard/k", params={"agent_id": "a"}, headers={"If-Match": '"1"'})
    assert r.status_code == 204
    problem(await client.get("/shard/k"), 404, "ShardDeleted")


async def test_delete_without_precondition_is_428(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    body = problem(
        await client.delete("/shard/k", params={"agent_id": "a"}), 428, "PreconditionRequired"
    )
    assert body["key"] == "k"
    assert (await read(client, "k"))["version"] == 0


async def test_delete_needs_agent(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.delete("/shard/k", params={"expected_version": "0"})
    problem(r, 422, "ValidationError")
    assert (await read(client, "k"))["version"] == 0
    r = await client.delete(
        "/shard/k", params={"expected_version": "0"}, headers={"X-Agent-Id": "h"}
    )
    assert r.status_code == 204


async def test_delete_version_mismatch(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    body = problem(await delete(client, "k", 5), 409, "VersionMismatch")
    assert (body["key"], body["expected"], body["found"]) == ("k", 5, 0)
    shard = await read(client, "k")
    assert (shard["version"], shard["attempt_count"], shard["conflict_count"]) == (0, 1, 1)
    assert (await stats(client))["total_conflicts"] == 1


async def test_delete_if_match_mismatch_is_409(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.delete("/shard/k", params={"agent_id": "a"}, headers={"If-Match": '"3"'})
    body = problem(r, 409, "VersionMismatch")
    assert (body["expected"], body["found"]) == (3, 0)


async def test_delete_precondition_conflict(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.delete(
        "/shard/k", params={"agent_id": "a", "expected_version": "0"}, headers={"If-Match": '"1"'}
    )
    problem(r, 422, "PreconditionConflict")
    r = await client.delete(
        "/shard/k", params={"agent_id": "a", "expected_version": "0"}, headers={"If-Match": '"0"'}
    )
    assert r.status_code == 204


async def test_delete_missing_and_deleted(client: httpx.AsyncClient) -> None:
    body = problem(await delete(client, "nope", 0), 404, "ShardNotFound")
    assert body["key"] == "nope"
    await create(client, "k")
    assert (await delete(client, "k", 0)).status_code == 204
    body = problem(await delete(client, "k", 1), 404, "ShardDeleted")
    assert (body["key"], body["version"]) == ("k", 1)


async def test_delete_then_commit_is_shard_deleted(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    assert (await delete(client, "k", 0)).status_code == 204
    body = problem(await commit(client, "k", 1, "x", agent="b"), 404, "ShardDeleted")
    assert (body["key"], body["version"]) == ("k", 1)


async def test_delete_reader_gets_cross_shard_stale_with_tombstone_version(
    client: httpx.AsyncClient,
) -> None:
    await create(client, "k")
    await create(client, "w")
    await committed(client, "k", 0, "x", agent="b")
    await read(client, "k", agent="r")
    assert (await delete(client, "k", 1, agent="d")).status_code == 204
    body = problem(await commit(client, "w", 0, "z", agent="r"), 409, "CrossShardStale")
    assert body["key"] == "k"
    assert body["version_at_read"] == 1
    assert body["current_version"] == 2
    assert body["stale_keys"] == [{"key": "k", "version_at_read": 1, "current_version": 2}]


async def test_delete_stale_session_of_deleter(client: httpx.AsyncClient) -> None:
    """A delete is a commit: the deleter's own stale reads refuse it."""
    await create(client, "k")
    await create(client, "o")
    await read(client, "o", agent="d")
    await committed(client, "o", 0, "x", agent="b")
    body = problem(await delete(client, "k", 0, agent="d"), 409, "CrossShardStale")
    assert body["key"] == "o"
    assert (await read(client, "k"))["version"] == 0


async def test_delete_with_session_query(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    assert (await delete(client, "k", 0, agent="d", session_id="s")).status_code == 204
    # read-your-writes records the tombstone version in that session
    assert await dl_entries(client, "d", "s") == {"k": 1}


async def test_list_max_default_caps_an_unlimited_listing() -> None:
    """protocol.md §2: ``/shards`` without ``limit`` returns at most SBUS_LIST_MAX keys,
    10000 by default. Memory store only: the per-store cap logic is covered above with a
    small SBUS_LIST_MAX; this pins the default itself."""
    settings = Settings(store="memory://")
    assert settings.list_max == 10_000
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        bus = runtime_of(app).bus
        keys = [f"k{i:05d}" for i in range(10_001)]
        for key in keys:
            await bus.store.create(CreateOp(key, "", "", False, "", new_commit_id()))
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            body = ok(await c.get("/shards"))
    assert (body["count"], body["shards"][-1], body["next_after"]) == (10_000, "k09999", "k09999")
    assert body["shards"] == keys[:10_000]
