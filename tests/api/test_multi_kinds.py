"""Creates and deletes inside POST /commit/multi (protocol.md §3.1): the wire shape of
each kind, its checks in the order of section 4, its right, its mandate rules, and the
whole request's atomicity and idempotency, on every store."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.auth_helpers import auth, root_token, token, token_app
from tests.api.helpers import create, dl_entries, ok, problem, read, snapshot, stats
from tests.conftest import AppFactory

A = {"agent_id": "a"}


def put(key: str, expected: int, delta: str) -> dict[str, Any]:
    return {"key": key, "expected_version": expected, "delta": delta}


def new(key: str, delta: str, **extra: Any) -> dict[str, Any]:
    return {"key": key, "create": True, "delta": delta, **extra}


def gone(key: str, expected: int) -> dict[str, Any]:
    return {"key": key, "delete": True, "expected_version": expected}


def multi(*writes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**A, "writes": list(writes), **extra}


async def history(c: httpx.AsyncClient, key: str) -> Any:
    r = await c.get(f"/history/{key}")
    return r.json() if r.status_code == 200 else (r.status_code, r.json()["error"])


async def everything(c: httpx.AsyncClient, *keys: str) -> dict[str, Any]:
    """What a refused multi must leave exactly as it was: shards, DL, counters, and
    every key's history."""
    seen = await snapshot(c, *keys)
    seen["history"] = {key: await history(c, key) for key in keys}
    seen["list"] = ok(await c.get("/shards"))["shards"]
    return seen


async def test_new_item_and_index_update_in_one_commit(client: httpx.AsyncClient) -> None:
    await create(client, "index", "[]")
    await create(client, "items/old", "old")
    r = await client.post(
        "/commit/multi",
        json=multi(
            new("items/1", "first", goal_tag="notes", policy={"require_mandate": False}),
            gone("items/old", 0),
            put("index", 0, '["items/1"]'),
            rationale="add item 1",
        ),
    )
    body = ok(r)
    assert body["results"] == [
        {"key": "items/1", "new_version": 0, "op": "create"},
        {"key": "items/old", "new_version": 1, "op": "delete"},
        {"key": "index", "new_version": 1, "op": "commit"},
    ]
    assert "etag" not in r.headers
    item = await read(client, "items/1")
    assert (item["version"], item["content"], item["goal_tag"], item["policy"]) == (
        0,
        "first",
        "notes",
        {"require_mandate": False},
    )
    assert (item["attempt_count"], item["conflict_count"], item["delta_log_depth"]) == (0, 0, 0)
    body_old = problem(await client.get("/shard/items/old"), 404, "ShardDeleted")
    assert body_old["version"] == 1
    assert ok(await client.get("/shards"))["shards"] == ["index", "items/1"]
    entries = {
        k: (await history(client, k))["entries"][0] for k in ("items/1", "items/old", "index")
    }
    assert {e["commit_id"] for e in entries.values()} == {body["commit_id"]}
    assert [(e["rationale"], e["deleted"]) for e in entries.values()] == [
        ("create", False),
        ("delete", True),
        ("add item 1", False),
    ]
    s = await stats(client)
    assert (s["total_commits"], s["total_shards"]) == (1, 2)
    assert await dl_entries(client, "a") == {"items/1": 0, "items/old": 1, "index": 1}


async def test_recreate_over_a_tombstone(client: httpx.AsyncClient) -> None:
    await create(client, "k", "v0")
    tomb = ok(await client.post("/commit/multi", json=multi(gone("k", 0))))
    assert tomb["results"] == [{"key": "k", "new_version": 1, "op": "delete"}]
    again = ok(await client.post("/commit/multi", json=multi(new("k", "v2"))))
    assert again["results"] == [{"key": "k", "new_version": 2, "op": "create"}]
    entries = (await history(client, "k"))["entries"]
    assert [(e["version"], e["rationale"]) for e in entries] == [
        (2, "create"),
        (1, "delete"),
        (0, "create"),
    ]
    assert entries[0]["prev_hash"] == entries[1]["hash"]
    shard = await read(client, "k")
    assert (shard["version"], shard["content"], shard["delta_log_depth"]) == (2, "v2", 2)


@pytest.mark.parametrize(
    ("write", "field", "kind"),
    [
        (new("b", "x", expected_version=0), "expected_version", "value_error"),
        ({"key": "b", "create": True}, "delta", "missing"),
        ({"key": "b", "delete": True}, "expected_version", "missing"),
        ({**gone("b", 0), "delta": ""}, "delta", "value_error"),
        ({**gone("b", 0), "content": "x"}, "delta", "value_error"),
        ({**new("b", "x"), "delete": True}, "delete", "value_error"),
        ({**put("b", 0, "x"), "goal_tag": "g"}, "goal_tag", "value_error"),
        ({**gone("b", 0), "policy": {"require_mandate": True}}, "policy", "value_error"),
        ({**put("b", 0, "x"), "create": None}, "create", "bool_type"),
        ({**gone("b", 0), "delete": 1}, "delete", "bool_type"),
        ({"key": "b", "delta": "x"}, "expected_version", "missing"),
        (new("b//c", "x"), "key", "invalid_key"),
    ],
    ids=[
        "create-with-expected",
        "create-without-delta",
        "delete-without-expected",
        "delete-with-delta",
        "delete-with-content-alias",
        "create-and-delete",
        "commit-with-goal-tag",
        "delete-with-policy",
        "create-null",
        "delete-not-bool",
        "commit-without-expected",
        "create-bad-key",
    ],
)
async def test_a_write_of_the_wrong_shape_is_422_and_changes_nothing(
    client: httpx.AsyncClient, write: dict[str, Any], field: str, kind: str
) -> None:
    await create(client, "a", "A0")
    await create(client, "b", "B0")
    before = await everything(client, "a", "b")
    body = problem(
        await client.post("/commit/multi", json=multi(put("a", 0, "A1"), write)),
        422,
        "ValidationError",
    )
    assert [(e["loc"], e["type"]) for e in body["errors"]] == [(["body", "writes", 1, field], kind)]
    assert await everything(client, "a", "b") == before


async def test_false_kinds_are_a_plain_commit(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    write = {**put("a", 0, "x"), "create": False, "delete": False}
    body = ok(await client.post("/commit/multi", json=multi(write)))
    assert body["results"] == [{"key": "a", "new_version": 1, "op": "commit"}]


async def test_a_key_at_most_once_whatever_the_kind(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    before = await everything(client, "a")
    for writes in ([gone("a", 0), new("a", "x")], [put("a", 0, "x"), gone("a", 0)]):
        r = await client.post("/commit/multi", json=multi(*writes))
        assert problem(r, 422, "ValidationError")["errors"][0]["type"] == "duplicate_key"
    assert await everything(client, "a") == before


async def test_create_of_a_live_key_is_409_and_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    for key in ("a", "live", "z"):
        await create(client, key, key)
    before = await everything(client, "a", "live", "n", "z")
    r = await client.post(
        "/commit/multi",
        json=multi(new("n", "n0"), gone("z", 0), new("live", "x"), put("a", 0, "A")),
    )
    body = problem(r, 409, "ShardAlreadyExists")
    assert body["key"] == "live"
    after = await everything(client, "a", "live", "n", "z")
    # "a" sorts first: its attempt was counted (protocol.md §6.2); nothing else moved
    before["shards"]["a"][1]["attempt_count"] = 1
    assert after == before
    problem(await client.get("/shard/n"), 404, "ShardNotFound")


async def test_one_stale_write_undoes_the_create_and_the_delete(
    client: httpx.AsyncClient,
) -> None:
    await create(client, "a")
    await create(client, "d")
    ok(await client.post("/commit/v2", json={**A, **put("a", 0, "a1"), "agent_id": "b"}))
    before = await everything(client, "a", "d", "n")
    r = await client.post(
        "/commit/multi", json=multi(new("n", "n0"), gone("d", 0), put("a", 0, "x"))
    )
    body = problem(r, 409, "VersionMismatch")
    assert (body["key"], body["expected"], body["found"]) == ("a", 0, 1)
    after = await everything(client, "a", "d", "n")
    before["shards"]["a"][1].update(attempt_count=2, conflict_count=1)
    before["stats"].update(total_conflicts=1, total_attempts=2, scr=0.5)
    assert after == before


async def test_a_stale_read_comes_before_any_write_conflict(client: httpx.AsyncClient) -> None:
    for key in ("live", "o", "z"):
        await create(client, key)
    await read(client, "o", agent="a")
    ok(await client.post("/commit/v2", json={**put("o", 0, "o1"), "agent_id": "b"}))
    ok(await client.post("/commit/v2", json={**put("z", 0, "z1"), "agent_id": "b"}))
    r = await client.post("/commit/multi", json=multi(new("live", "x"), gone("z", 0)))
    body = problem(r, 409, "CrossShardStale")
    assert body["stale_keys"] == [{"key": "o", "version_at_read": 0, "current_version": 1}]


async def test_limits_of_a_create(make_client: AppFactory) -> None:
    _, c = await make_client(max_delta=8, max_goal_tag=4)
    await create(c, "a")
    before = await everything(c, "a", "n")
    big = problem(
        await c.post("/commit/multi", json=multi(put("a", 0, "x"), new("n", "123456789"))),
        413,
        "DeltaTooLarge",
    )
    assert (big["key"], big["max"]) == ("n", 8)
    tag = problem(
        await c.post("/commit/multi", json=multi(new("n", "x", goal_tag="12345"))),
        413,
        "FieldTooLarge",
    )
    assert (tag["field"], tag["max"]) == ("goal_tag", 4)
    assert await everything(c, "a", "n") == before


async def test_idempotent_replay_of_a_mixed_multi(client: httpx.AsyncClient) -> None:
    await create(client, "d")
    headers = {"Idempotency-Key": "mixed-1"}
    body = multi(new("n", "n0"), gone("d", 0))
    first = await client.post("/commit/multi", json=body, headers=headers)
    # the same request, the create's default goal_tag and policy spelled out
    spelled = multi(new("n", "n0", goal_tag="", policy={"require_mandate": False}), gone("d", 0))
    again = await client.post("/commit/multi", json=spelled, headers=headers)
    assert again.headers.get("idempotent-replayed") == "true"
    assert (again.status_code, again.json()) == (200, ok(first))
    assert len((await history(client, "n"))["entries"]) == 1
    assert (await stats(client))["total_commits"] == 1
    other = multi(new("n", "n1"), gone("d", 0))
    problem(
        await client.post("/commit/multi", json=other, headers=headers),
        422,
        "IdempotencyKeyReused",
    )


async def test_token_mode_needs_create_and_delete_rights(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    for key in ("a", "d"):
        ok(await c.post("/shard", json={"key": key, "content": ""}, headers=root), 201)
    writer = auth(token(app, "w", ("**", "read,write")))
    creator = auth(token(app, "w", ("**", "read,write,create")))
    everyone = auth(token(app, "w", ("**", "read,write,create,delete")))
    body = {"writes": [new("n", "x"), gone("d", 0), put("a", 0, "y")]}
    before = await snapshot_as(c, root, "a", "d", "n")
    denied = problem(
        await c.post("/commit/multi", json=body, headers=writer), 403, "CapabilityDenied"
    )
    assert (denied["key"], denied["right"]) == ("d", "delete")  # sorted: (d, delete) first
    denied = problem(
        await c.post("/commit/multi", json=body, headers=creator), 403, "CapabilityDenied"
    )
    assert (denied["key"], denied["right"]) == ("d", "delete")
    only_create = {"writes": [new("n", "x"), put("a", 0, "y")]}
    denied = problem(
        await c.post("/commit/multi", json=only_create, headers=writer), 403, "CapabilityDenied"
    )
    assert (denied["key"], denied["right"]) == ("n", "create")
    assert await snapshot_as(c, root, "a", "d", "n") == before
    results = ok(await c.post("/commit/multi", json=body, headers=everyone))["results"]
    assert [r["new_version"] for r in results] == [0, 1, 1]


async def snapshot_as(c: httpx.AsyncClient, headers: dict[str, str], *keys: str) -> Any:
    shards = {}
    for key in keys:
        r = await c.get(f"/shard/{key}", params={"record": "false"}, headers=headers)
        shards[key] = (r.status_code, r.json())
    return shards, ok(await c.get("/stats", headers=headers))


async def test_mandates_as_for_single_creates_and_deletes(make_client: AppFactory) -> None:
    """A delete of a shard that requires a mandate needs one; a create needs none (as
    POST /shard) but the re-created shard keeps the requirement; a mandate presented
    must cover every written key, created ones included."""
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    body = {"key": "pay/1", "content": "v0", "policy": {"require_mandate": True}}
    ok(await c.post("/shard", json=body, headers=root), 201)
    g = auth(token(app, "G", ("pay/*", "mandate")))
    a = auth(token(app, "A", ("**", "read,write,create,delete")))

    async def mandate() -> str:
        issued = {"holder": "A", "keys": ["pay/*"], "context": {"o": 1}, "ttl_s": 60}
        value: str = ok(await c.post("/mandates", json=issued, headers=g), 201)["mandate"]
        return value

    problem(
        await c.post("/commit/multi", json={"writes": [gone("pay/1", 0)]}, headers=a),
        403,
        "MandateRequired",
    )
    m = await mandate()
    scoped = {"writes": [gone("pay/1", 0), new("notes/1", "x")], "mandate": m, "context": {"o": 1}}
    body_scope = problem(
        await c.post("/commit/multi", json=scoped, headers=a), 403, "MandateScopeMismatch"
    )
    assert body_scope["key"] == "notes/1"
    deleted = {"writes": [gone("pay/1", 0)], "mandate": m, "context": {"o": 1}}
    assert ok(await c.post("/commit/multi", json=deleted, headers=a))["results"][0] == {
        "key": "pay/1",
        "new_version": 1,
        "op": "delete",
    }
    # a create needs no mandate; the shard keeps the tombstone's requirement
    ok(await c.post("/commit/multi", json={"writes": [new("pay/1", "again")]}, headers=a))
    shard = ok(await c.get("/shard/pay/1", headers=a))
    assert (shard["version"], shard["policy"]) == (2, {"require_mandate": True})
    problem(
        await c.post("/commit/multi", json={"writes": [put("pay/1", 2, "x")]}, headers=a),
        403,
        "MandateRequired",
    )
