"""POST /read, the bulk read (protocol.md section 3.10): one request for many shards whose
recorded reads enter the DeliveryLog exactly as the same GETs would, on every store; and
GET /shards?include=content (section 2.4), listing with the shards, never recorded."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.auth_helpers import auth, root_token, token, token_app
from tests.api.helpers import (
    SHARD_FIELDS,
    advance,
    commit,
    committed,
    create,
    delete,
    dl,
    dl_entries,
    ok,
    problem,
    read,
    snapshot,
)
from tests.conftest import AppFactory


async def bulk(c: httpx.AsyncClient, keys: list[str], **fields: Any) -> dict[str, Any]:
    return ok(await c.post("/read", json={"keys": keys, **fields}))


async def seed(c: httpx.AsyncClient) -> None:
    """a and b at version 0, c at version 1, d a tombstone at version 1."""
    for key in ("a", "b", "c", "d"):
        await create(c, key, f"{key}0")
    await committed(c, "c", 0, "c1", agent="w")
    assert (await delete(c, "d", 0, agent="w")).status_code == 204


async def test_answers_in_request_order_as_get_does(client: httpx.AsyncClient) -> None:
    await seed(client)
    body = await bulk(client, ["c", "nope", "a", "d"], agent_id="A")
    assert set(body) == {"shards", "missing"}
    # Each shard object is exactly what GET /shard/{key} answers.
    assert body["shards"] == [await read(client, "c"), await read(client, "a")]
    assert all(set(s) == SHARD_FIELDS for s in body["shards"])
    assert [(s["key"], s["version"], s["content"]) for s in body["shards"]] == [
        ("c", 1, "c1"),
        ("a", 0, "a0"),
    ]
    assert body["missing"] == [
        {"key": "nope", "error": "ShardNotFound"},
        {"key": "d", "error": "ShardDeleted", "version": 1},
    ]


async def test_records_what_the_same_gets_record(client: httpx.AsyncClient) -> None:
    """The tombstone's version is recorded (a GET of it records it too), a key that
    never existed is not."""
    await seed(client)
    await bulk(client, ["c", "nope", "a", "d"], agent_id="A", session_id="bulk")
    for key in ("c", "nope", "a", "d"):
        await client.get(f"/shard/{key}", params={"agent_id": "A", "session_id": "gets"})
    assert await dl_entries(client, "A", "bulk") == {"c": 1, "a": 0, "d": 1}
    assert await dl_entries(client, "A", "gets") == {"c": 1, "a": 0, "d": 1}


async def test_only_missing_keys_records_nothing(client: httpx.AsyncClient) -> None:
    body = await bulk(client, ["x", "y"], agent_id="A")
    assert body == {
        "shards": [],
        "missing": [
            {"key": "x", "error": "ShardNotFound"},
            {"key": "y", "error": "ShardNotFound"},
        ],
    }
    assert (await dl(client))["sessions"] == {}


async def test_a_recorded_bulk_read_makes_a_later_commit_stale(client: httpx.AsyncClient) -> None:
    await create(client, "a", "a0")
    await create(client, "b", "b0")
    await bulk(client, ["a", "b"], agent_id="A", session_id="s")
    await committed(client, "b", 0, "b1", agent="B")
    r = await commit(client, "a", 0, "a1", agent="A", session_id="s")
    body = problem(r, 409, "CrossShardStale")
    assert body["stale_keys"] == [{"key": "b", "version_at_read": 0, "current_version": 1}]
    assert (await read(client, "a"))["version"] == 0


async def test_record_false_leaves_the_read_set_alone(client: httpx.AsyncClient) -> None:
    await create(client, "a", "a0")
    await create(client, "b", "b0")
    body = await bulk(client, ["a", "b"], agent_id="A", session_id="s", record=False)
    assert [s["key"] for s in body["shards"]] == ["a", "b"]
    assert await dl_entries(client, "A", "s") == {}
    await committed(client, "b", 0, "b1", agent="B")
    assert ok(await commit(client, "a", 0, "a1", agent="A", session_id="s"))["new_version"] == 1


async def test_without_an_agent_nothing_is_recorded(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    assert [s["key"] for s in (await bulk(client, ["a"]))["shards"]] == ["a"]
    assert (await dl(client))["sessions"] == {}


async def test_identity_from_headers(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    headers = {"X-Agent-Id": "A", "X-SBus-Session-Id": "s"}
    ok(await client.post("/read", json={"keys": ["a"]}, headers=headers))
    assert await dl_entries(client, "A", "s") == {"a": 0}


@pytest.mark.parametrize(
    ("fields", "headers"),
    [
        ({"agent_id": "A"}, {"X-Agent-Id": "B"}),
        ({"agent_id": "A", "session_id": "s"}, {"X-SBus-Session-Id": "t"}),
    ],
    ids=["agent", "session"],
)
async def test_disagreeing_identity_is_refused(
    client: httpx.AsyncClient, fields: dict[str, str], headers: dict[str, str]
) -> None:
    await create(client, "a")
    before = await snapshot(client, "a")
    r = await client.post("/read", json={"keys": ["a"], **fields}, headers=headers)
    problem(r, 403, "AgentMismatch")
    assert await snapshot(client, "a") == before


async def test_required_agent(make_client: AppFactory) -> None:
    _, c = await make_client(require_agent_id=True)
    await create(c, "a")
    problem(await c.post("/read", json={"keys": ["a"]}), 400, "AgentRequired")
    assert ok(await c.post("/read", json={"keys": ["a"], "agent_id": "A"}))["missing"] == []


async def test_the_key_cap_is_the_setting(make_client: AppFactory) -> None:
    _, c = await make_client(max_read_keys=2)
    await create(c, "a")
    await create(c, "b")
    await create(c, "c")
    before = await snapshot(c, "a", "b", "c")
    r = await c.post("/read", json={"keys": ["a", "b", "c"], "agent_id": "A"})
    body = problem(r, 422, "ValidationError")
    assert body["max"] == 2
    assert "SBUS_MAX_READ_KEYS" in body["detail"]
    assert await snapshot(c, "a", "b", "c") == before
    assert len((await bulk(c, ["a", "b"], agent_id="A"))["shards"]) == 2


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "at least 1"),
        (["a", "b", "a"], "'a' more than once"),
        (["a", "x//y"], "empty"),
        ("a", "list"),
        ([1], "string"),
    ],
    ids=["empty", "duplicate", "bad-key", "not-a-list", "not-a-string"],
)
async def test_bad_keys_are_refused_and_record_nothing(
    client: httpx.AsyncClient, keys: Any, message: str
) -> None:
    await create(client, "a")
    await create(client, "b")
    before = await snapshot(client, "a", "b")
    body = problem(
        await client.post("/read", json={"keys": keys, "agent_id": "A"}), 422, "ValidationError"
    )
    assert message in str(body["errors"]), body
    assert await snapshot(client, "a", "b") == before


async def test_bulk_overflow_matches_single_reads(make_client: AppFactory) -> None:
    """Past SBUS_MAX_DL_ENTRIES the session overflows at the first key that does not
    fit and records nothing after it, as the same GETs one by one would."""
    _, c = await make_client(max_dl_entries=2)
    for key in ("x", "a", "b", "c"):
        await create(c, key)
    for session in ("bulk", "gets"):
        await read(c, "x", agent="A", session=session)
    await bulk(c, ["a", "b", "c"], agent_id="A", session_id="bulk")
    for key in ("a", "b", "c"):
        await read(c, key, agent="A", session="gets")
    assert await dl_entries(c, "A", "bulk") == {"x": 0, "a": 0}
    assert await dl_entries(c, "A", "gets") == {"x": 0, "a": 0}
    for session in ("bulk", "gets"):
        r = await commit(c, "a", 0, "a1", agent="A", session_id=session)
        assert problem(r, 410, "SessionExpired")["reason"] == "overflow"


async def test_an_expired_session_restarts(make_client: AppFactory) -> None:
    _, c = await make_client(session_ttl=60)
    await create(c, "a")
    await create(c, "b")
    await read(c, "a", agent="A", session="s")
    await advance(c, 61_000)
    await bulk(c, ["b"], agent_id="A", session_id="s")
    assert await dl_entries(c, "A", "s") == {"b": 0}
    # Restarted, not expired: the session's commit goes through.
    assert ok(await commit(c, "b", 0, "b1", agent="A", session_id="s"))["new_version"] == 1


async def test_unknown_fields_are_named(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    r = await client.post("/read", json={"keys": ["a"], "agent_id": "A", "recrod": False})
    ok(r)
    assert r.headers["sbus-ignored-fields"] == "recrod"
    assert await dl_entries(client, "A") == {"a": 0}


# -- token mode ---------------------------------------------------------------------------------


async def test_token_mode_needs_read_on_every_key(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    for key in ("plan/a", "plan/b", "secret/s"):
        ok(await c.post("/shard", json={"key": key, "content": ""}, headers=root), 201)
    a = auth(token(app, "A", ("plan/*", "read")))
    r = await c.post("/read", json={"keys": ["plan/a", "secret/s", "plan/b"]}, headers=a)
    body = problem(r, 403, "CapabilityDenied")
    assert (body["key"], body["right"]) == ("secret/s", "read")
    # A key the token may not read is refused even when it does not exist (as GET).
    r = await c.post("/read", json={"keys": ["plan/a", "zzz/none"]}, headers=a)
    assert problem(r, 403, "CapabilityDenied")["key"] == "zzz/none"
    assert ok(await c.get("/admin/delivery-log", headers=root))["sessions"] == {}
    # The token's own agent only.
    r = await c.post("/read", json={"keys": ["plan/a"], "agent_id": "B"}, headers=a)
    problem(r, 403, "AgentMismatch")
    body = ok(await c.post("/read", json={"keys": ["plan/b", "plan/a", "plan/c"]}, headers=a))
    assert [s["key"] for s in body["shards"]] == ["plan/b", "plan/a"]
    assert body["missing"] == [{"key": "plan/c", "error": "ShardNotFound"}]
    log = ok(await c.get("/admin/delivery-log", headers=root))["sessions"]
    assert {k: e["version"] for k, e in log["A"][""].items()} == {"plan/a": 0, "plan/b": 0}


async def test_token_mode_bulk_reads_are_not_rate_limited(make_client: AppFactory) -> None:
    """As GETs: the bucket (one token, a slow refill) holds only state changes back."""
    app, c = await token_app(make_client, rate_limit="1/m,1")
    root = auth(root_token(app))
    ok(await c.post("/shard", json={"key": "k", "content": ""}, headers=root), 201)
    a = auth(token(app, "A", ("**", "read,write")))
    for _ in range(5):
        assert len(ok(await c.post("/read", json={"keys": ["k"]}, headers=a))["shards"]) == 1
    body = {"key": "k", "expected_version": 0, "delta": "x"}
    assert ok(await c.post("/commit", json=body, headers=a))["new_version"] == 1
    problem(
        await c.post("/commit", json={**body, "expected_version": 1}, headers=a), 429, "RateLimited"
    )


# -- GET /shards?include=content ------------------------------------------------------------


async def test_listing_with_content(client: httpx.AsyncClient) -> None:
    await seed(client)
    await create(client, "e/x", "ex")
    headers = {"X-Agent-Id": "A"}
    r = await client.get("/shards", params={"include": "content"}, headers=headers)
    body = ok(r)
    assert body["shards"] == ["a", "b", "c", "e/x"]  # the tombstone d is not listed
    assert body["items"] == [await read(client, k) for k in body["shards"]]
    assert (body["count"], body["next_after"]) == (4, None)
    assert "A" not in (await dl(client))["sessions"]  # never recorded, whoever asks
    page = ok(await client.get("/shards", params={"include": "content", "limit": 2}))
    assert (page["shards"], page["count"], page["next_after"]) == (["a", "b"], 2, "b")
    assert [i["content"] for i in page["items"]] == ["a0", "b0"]
    rest = ok(await client.get("/shards", params={"include": "content", "after": "b"}))
    assert [i["key"] for i in rest["items"]] == rest["shards"] == ["c", "e/x"]
    prefixed = ok(await client.get("/shards", params={"include": "content", "prefix": "e/"}))
    assert [(i["key"], i["content"]) for i in prefixed["items"]] == [("e/x", "ex")]
    # Without include the answer is unchanged (compat): no items.
    assert ok(await client.get("/shards")) == {
        "shards": ["a", "b", "c", "e/x"],
        "count": 4,
        "next_after": None,
    }
    empty = ok(await client.get("/shards", params={"include": "content", "prefix": "zz"}))
    assert empty == {"shards": [], "count": 0, "next_after": None, "items": []}


@pytest.mark.parametrize("value", ["", "contents", "CONTENT", "keys"])
async def test_other_include_values_are_refused(client: httpx.AsyncClient, value: str) -> None:
    await create(client, "a")
    body = problem(await client.get("/shards", params={"include": value}), 422, "ValidationError")
    assert body["errors"][0]["loc"] == ["query", "include"]


async def test_a_content_page_is_capped_like_a_bulk_read(make_client: AppFactory) -> None:
    _, c = await make_client(max_read_keys=2)
    for key in ("a", "b", "c"):
        await create(c, key)
    page = ok(await c.get("/shards", params={"include": "content", "limit": 10}))
    assert (page["shards"], page["next_after"]) == (["a", "b"], "b")
    assert len(page["items"]) == 2
    assert ok(await c.get("/shards", params={"limit": 10}))["shards"] == ["a", "b", "c"]


async def test_token_mode_lists_content_only_of_readable_keys(make_client: AppFactory) -> None:
    app, c = await token_app(make_client)
    root = auth(root_token(app))
    for key in ("code/x", "plan/a", "plan/b", "secret/s"):
        ok(await c.post("/shard", json={"key": key, "content": key}, headers=root), 201)
    a = auth(token(app, "A", ("plan/*", "read"), ("code/*", "write")))
    params = {"include": "content"}
    body = ok(await c.get("/shards", params=params, headers=a))
    assert body["shards"] == ["plan/a", "plan/b"]
    assert [(i["key"], i["content"]) for i in body["items"]] == [
        ("plan/a", "plan/a"),
        ("plan/b", "plan/b"),
    ]
    assert ok(await c.get("/shards", headers=a))["shards"] == body["shards"]
    everything = ok(await c.get("/shards", params=params, headers=root))
    assert [i["key"] for i in everything["items"]] == ["code/x", "plan/a", "plan/b", "secret/s"]
    assert ok(await c.get("/admin/delivery-log", headers=root))["sessions"] == {}


@pytest.mark.parametrize("field", ["agent_id", "session_id"])
async def test_a_too_long_identifier_is_named_by_its_field(
    client: httpx.AsyncClient, field: str
) -> None:
    await create(client, "a")
    before = await snapshot(client, "a")
    body = problem(
        await client.post("/read", json={"keys": ["a"], "agent_id": "A", field: "s" * 257}),
        422,
        "ValidationError",
    )
    assert body["detail"] == f"body.{field}: {field} must be at most 256 characters", body
    assert body["errors"][0]["type"] == f"invalid_{field.removesuffix('_id')}"
    assert await snapshot(client, "a") == before
