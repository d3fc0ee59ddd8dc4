"""Admin endpoints, their gate, observability (/stats, /metrics, /livez, /admin/health)
and the open-mode Host check (protocol.md §§2, 4 step 1 and 6)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import time
from typing import Any

import httpx
import pytest

from sbus import __version__
from sbus.api.runtime import runtime_of
from sbus.core.rights import ALL_RIGHTS, Scope
from tests.api.auth_helpers import BAD_ADMIN_ROUTES, auth, issuer, root_token, token_app
from tests.api.helpers import (
    SHARD_FIELDS,
    STATS_FIELDS,
    commit,
    committed,
    create,
    delete,
    dl,
    dl_entries,
    ok,
    problem,
    read,
    sha256_hex,
    snapshot,
    stats,
)
from tests.conftest import AppFactory

ADMIN_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/admin/reset", None),
    ("POST", "/admin/config", {"ori_enabled": False}),
    ("GET", "/admin/delivery-log", None),
    ("POST", "/admin/inject-stale", {"agent_id": "a", "key": "k", "stale_version": 0}),
    ("POST", "/admin/shard", {"key": "k2", "content": "x"}),
    ("POST", "/admin/test/advance-clock", {"ms": 1000}),
]


# -- gate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_admin_disabled(
    make_client: AppFactory, method: str, path: str, body: dict[str, Any] | None
) -> None:
    _, c = await make_client(admin_enabled=False)
    await create(c, "k")
    before = await stats(c)
    problem(await c.request(method, path, json=body), 403, "AdminDisabled")
    after = await stats(c)
    assert after == before
    assert after["ori_enabled"] is True
    assert ok(await c.get("/shards"))["shards"] == ["k"]


async def test_admin_disabled_comes_before_the_body(make_client: AppFactory) -> None:
    _, c = await make_client(admin_enabled=False)
    for method, path, body in BAD_ADMIN_ROUTES:
        problem(await c.request(method, path, json=body), 403, "AdminDisabled")


async def test_admin_disabled_leaves_health_and_config_readable(make_client: AppFactory) -> None:
    _, c = await make_client(admin_enabled=False)
    assert ok(await c.get("/admin/health"))["status"] == "ok"
    assert ok(await c.get("/admin/config"))["ori_enabled"] is True
    ok(await c.get("/livez"))
    ok(await c.get("/stats"))
    assert (await c.get("/metrics")).status_code == 200


async def test_advance_clock_needs_test_hooks(make_client: AppFactory) -> None:
    _, c = await make_client(test_hooks=False)
    problem(await c.post("/admin/test/advance-clock", json={"ms": 1000}), 404, "NotFound")


@pytest.mark.parametrize("ms", [-1, 2**53, 1.5, "10", None])
async def test_advance_clock_bad_ms(client: httpx.AsyncClient, ms: object) -> None:
    problem(await client.post("/admin/test/advance-clock", json={"ms": ms}), 422, "ValidationError")


TEN_YEARS_MS = 10 * 365 * 86_400_000


async def advance(
    c: httpx.AsyncClient, ms: int, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await c.post("/admin/test/advance-clock", json={"ms": ms}, headers=headers)


async def test_advance_clock_offset_is_capped(client: httpx.AsyncClient) -> None:
    """The test offset adds up to ten years at most (past year 9999 the store could no
    longer be written); an advance past the cap is 422 and moves nothing."""
    await create(client, "k")
    assert ok(await advance(client, TEN_YEARS_MS - 1000))["offset_ms"] == TEN_YEARS_MS - 1000
    for ms in (1001, 2**53 - 1):
        body = problem(await advance(client, ms), 422, "ValidationError")
        assert body["errors"][0]["loc"] == ["body", "ms"]
        assert (body["offset_ms"], body["max_offset_ms"]) == (TEN_YEARS_MS - 1000, TEN_YEARS_MS)
    assert ok(await advance(client, 0))["offset_ms"] == TEN_YEARS_MS - 1000
    # exactly at the cap the store still takes writes
    assert ok(await advance(client, 1000))["offset_ms"] == TEN_YEARS_MS
    await committed(client, "k", 0, "v1")
    assert (await read(client, "k"))["updated_at"] > "2035"


async def test_concurrent_advances_cannot_pass_the_cap_together(
    client: httpx.AsyncClient,
) -> None:
    half = TEN_YEARS_MS // 2 + 1
    answers = await asyncio.gather(advance(client, half), advance(client, half))
    assert sorted(r.status_code for r in answers) == [200, 422], [r.text for r in answers]
    assert ok(await advance(client, 0))["offset_ms"] == half


async def test_token_mode_caps_the_offset_at_the_token_lifetime(make_client: AppFactory) -> None:
    """In token mode every token past exp by the store clock is refused, the admin token
    that /admin/reset needs included: an offset past SBUS_TOKEN_MAX_TTL would lock
    everyone out for good (the offset survives restarts). Past that cap: 422, nothing
    moves; within it a freshly issued admin token of maximum lifetime still works and
    /admin/reset brings the offset back to 0."""
    app, c = await token_app(make_client)
    max_ttl = runtime_of(app).settings.token_max_ttl
    cap = max_ttl * 1000
    root = auth(root_token(app))
    ok(await c.post("/shard", json={"key": "k", "content": ""}, headers=root), 201)
    for ms in (cap + 1, 25 * 3_600_000, TEN_YEARS_MS):
        body = problem(await advance(c, ms, headers=root), 422, "ValidationError")
        assert body["errors"][0]["loc"] == ["body", "ms"]
        assert (body["offset_ms"], body["max_offset_ms"]) == (0, cap)
    assert ok(await advance(c, 0, headers=root))["offset_ms"] == 0
    assert ok(await advance(c, cap - 1000, headers=root))["offset_ms"] == cap - 1000
    # The 600 s root token has now expired by the store clock; a new one of maximum
    # lifetime has not, and recovers the deployment.
    problem(await c.get("/stats", headers=root), 401, "Unauthorized")
    fresh = auth(issuer(app).issue("root", [Scope("**", ALL_RIGHTS)], max_ttl)[0])
    problem(await advance(c, 1001, headers=fresh), 422, "ValidationError")
    ok(await c.get("/shard/k", headers=fresh))
    ok(await c.post("/admin/reset", headers=fresh))
    assert ok(await advance(c, 0, headers=root))["offset_ms"] == 0
    ok(await c.get("/stats", headers=root))


async def test_reset_sets_the_clock_offset_back(client: httpx.AsyncClient) -> None:
    ok(await client.post("/admin/config", json={"ori_enabled": False}))
    ok(await advance(client, TEN_YEARS_MS))
    ok(await client.post("/admin/reset"))
    body = ok(await advance(client, 0))
    assert body["offset_ms"] == 0
    assert abs(body["now_ms"] - time.time() * 1000) < 3_600_000
    assert (await stats(client))["ori_enabled"] is False  # kept, as before


# -- health, livez, stats, metrics ----------------------------------------------------------------


async def test_livez(client: httpx.AsyncClient) -> None:
    r = await client.get("/livez")
    assert r.status_code == 200


async def test_version(client: httpx.AsyncClient) -> None:
    r = await client.get("/version")
    assert ok(r) == {"name": "sbus", "version": __version__, "api": 1}
    assert __version__ == importlib.metadata.version("sbus-server")  # the installed release


async def test_version_still_checks_the_host(client: httpx.AsyncClient) -> None:
    problem(await client.get("/version", headers={"Host": "evil.example"}), 403, "HostNotAllowed")


async def test_version_needs_no_admin_right(make_client: AppFactory) -> None:
    _, c = await make_client(admin_enabled=False)
    assert ok(await c.get("/version"))["name"] == "sbus"


async def test_health(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    await committed(client, "a", 0, "x", agent="p")
    problem(await commit(client, "a", 0, "y", agent="q"), 409, "VersionMismatch")
    await read(client, "b", agent="r")
    assert ok(await client.get("/admin/health")) == {
        "status": "ok",
        "version": __version__,
        "total_shards": 2,
        "total_commits": 1,
        "total_conflicts": 1,
        "delivery_agents": 2,
    }


async def test_stats_fresh(client: httpx.AsyncClient, store_kind: str) -> None:
    s = await stats(client)
    assert set(s) == STATS_FIELDS
    assert s == {
        "total_shards": 0,
        "total_commits": 0,
        "total_conflicts": 0,
        "cross_shard_stale": 0,
        "view_divergent_commits": 0,
        "view_checked_commits": 0,
        "view_divergence_rate": 0.0,
        "ori_enabled": True,
        "total_attempts": 0,
        "scr": 0.0,
        "wal_enabled": s["wal_enabled"],
        "delivery_log": {"agents": 0, "deliveries": 0},
        "backend": store_kind,
    }
    # wal_enabled (compat) is the store's real durability: the test command runs
    # PostgreSQL with fsync=off (tests/api/test_upkeep.py); Redis depends on its fsync policy
    durable = {"memory": False, "sqlite": True, "postgres": False}
    assert s["wal_enabled"] is durable.get(store_kind, s["wal_enabled"])
    assert isinstance(s["wal_enabled"], bool)


async def test_stats_values(client: httpx.AsyncClient) -> None:
    for key in ("a", "b", "c"):
        await create(client, key)
    await read(client, "a", agent="x")
    await read(client, "b", agent="x", session="s")
    await committed(client, "a", 0, "a1", agent="y")  # y: a@1
    problem(await commit(client, "c", 0, "c1", agent="x"), 409, "CrossShardStale")
    problem(await commit(client, "c", 5, "c1", agent="z"), 409, "VersionMismatch")
    problem(await commit(client, "c", 5, "c1", agent="z"), 409, "VersionMismatch")
    await committed(client, "c", 0, "c1", agent="z")
    assert (await delete(client, "b", 0, agent="w")).status_code == 204
    s = await stats(client)
    assert s["total_shards"] == 2
    assert s["total_commits"] == 3
    assert s["total_conflicts"] == 2
    assert s["total_attempts"] == 5
    assert s["scr"] == pytest.approx(0.4)
    assert s["cross_shard_stale"] == 1
    # checked: x's stale commit only (z and w had empty sessions; y's DL was empty)
    assert (s["view_checked_commits"], s["view_divergent_commits"]) == (1, 1)
    assert s["view_divergence_rate"] == 1.0
    # x: a@0 + (s) b@0; y: a@1; z: c@1; w: b@1
    assert s["delivery_log"] == {"agents": 4, "deliveries": 5}


async def test_metrics(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "o")
    await read(client, "o", agent="x")
    await committed(client, "o", 0, "o1", agent="y")
    problem(await commit(client, "a", 0, "a1", agent="x"), 409, "CrossShardStale")
    problem(await commit(client, "o", 0, "o2", agent="z"), 409, "VersionMismatch")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    lines = set(r.text.splitlines())
    assert "sbus_commits_total 1" in lines
    assert "sbus_conflicts_total 1" in lines
    assert "sbus_cross_stale_total 1" in lines
    assert "sbus_shards_total 2" in lines
    assert "# TYPE sbus_commits_total counter" in lines
    assert re.search(r"^sbus_request_duration_seconds_bucket\{", r.text, re.MULTILINE)


# -- config ---------------------------------------------------------------------------------------


async def test_config_roundtrip(client: httpx.AsyncClient) -> None:
    expected = {
        "ok": True,
        "ori_enabled": True,
        "view_checked_commits": 0,
        "view_divergent_commits": 0,
    }
    assert ok(await client.get("/admin/config")) == expected
    body = ok(await client.post("/admin/config", json={"ori_enabled": False}))
    assert body == {**expected, "ori_enabled": False}
    assert ok(await client.get("/admin/config"))["ori_enabled"] is False
    assert (await stats(client))["ori_enabled"] is False


@pytest.mark.parametrize(
    "body", [{}, {"ori_enabled": "false"}, {"ori_enabled": 0}, {"ori_enabled": None}]
)
async def test_config_bad_body(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    problem(await client.post("/admin/config", json=body), 422, "ValidationError")
    assert (await stats(client))["ori_enabled"] is True


# -- reset ----------------------------------------------------------------------------------------


async def test_reset_clears_everything_but_ori(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    await create(client, "gone")
    assert (await delete(client, "gone", 0)).status_code == 204
    await read(client, "a", agent="x")
    await committed(client, "b", 0, "b1", agent="y", rationale="r")
    r = await client.post(
        "/commit/v2",
        json={"key": "b", "expected_version": 1, "delta": "b2", "agent_id": "y"},
        headers={"Idempotency-Key": "k1"},
    )
    ok(r)
    ok(await client.post("/admin/config", json={"ori_enabled": False}))
    body = ok(await client.post("/admin/reset"))
    assert set(body) == {"cleared"}
    assert body["cleared"] >= 2
    s = await stats(client)
    assert s["ori_enabled"] is False
    assert (s["total_shards"], s["total_commits"], s["total_conflicts"]) == (0, 0, 0)
    assert s["delivery_log"] == {"agents": 0, "deliveries": 0}
    assert ok(await client.get("/shards"))["shards"] == []
    problem(await client.get("/shard/a"), 404, "ShardNotFound")
    problem(await client.get("/history/b"), 404, "ShardNotFound")
    # tombstones go too: versions restart at 0
    assert (await create(client, "gone"))["version"] == 0
    assert (await create(client, "b"))["version"] == 0
    # the idempotency record went: the same key and body is evaluated afresh
    r = await client.post(
        "/commit/v2",
        json={"key": "b", "expected_version": 1, "delta": "b2", "agent_id": "y"},
        headers={"Idempotency-Key": "k1"},
    )
    problem(r, 409, "VersionMismatch")
    assert ok(await client.get("/admin/delivery-log"))["total_deliveries"] == 0


async def test_reset_empty(client: httpx.AsyncClient) -> None:
    assert ok(await client.post("/admin/reset")) == {"cleared": 0}


# -- inject-stale ---------------------------------------------------------------------------------


async def test_inject_stale(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    await create(client, "w")
    await committed(client, "k", 0, "k1", agent="y")
    await committed(client, "k", 1, "k2", agent="y")
    r = await client.post(
        "/admin/inject-stale", json={"agent_id": "x", "key": "k", "stale_version": 1}
    )
    assert ok(r) == {"injected": True}
    assert await dl_entries(client, "x") == {"k": 1}
    body = problem(await commit(client, "w", 0, "w1", agent="x"), 409, "CrossShardStale")
    assert body["stale_keys"] == [{"key": "k", "version_at_read": 1, "current_version": 2}]


async def test_inject_stale_overwrites_and_sessions(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    await committed(client, "k", 0, "k1", agent="y")
    await read(client, "k", agent="x", session="s")
    r = await client.post(
        "/admin/inject-stale",
        json={"agent_id": "x", "key": "k", "stale_version": 0, "session_id": "s"},
    )
    ok(r)
    assert await dl_entries(client, "x", "s") == {"k": 0}
    assert await dl_entries(client, "x") == {}
    r = await client.post(
        "/admin/inject-stale",
        json={"agent_id": "x", "key": "k", "stale_version": 1},
        headers={"X-SBus-Session-Id": "h"},
    )
    ok(r)
    assert await dl_entries(client, "x", "h") == {"k": 1}


async def test_inject_stale_missing_shard(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/admin/inject-stale", json={"agent_id": "x", "key": "nope", "stale_version": 0}
    )
    problem(r, 404, "ShardNotFound")
    assert (await dl(client))["total_deliveries"] == 0


async def test_inject_stale_deleted_shard(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    assert (await delete(client, "k", 0)).status_code == 204
    r = await client.post(
        "/admin/inject-stale", json={"agent_id": "x", "key": "k", "stale_version": 0}
    )
    problem(r, 404, "ShardNotFound")


@pytest.mark.parametrize("version", [2, 3, -1, 2**53])
async def test_inject_stale_out_of_range(client: httpx.AsyncClient, version: int) -> None:
    await create(client, "k")
    await committed(client, "k", 0, "k1", agent="y")
    r = await client.post(
        "/admin/inject-stale", json={"agent_id": "x", "key": "k", "stale_version": version}
    )
    problem(r, 422, "ValidationError")
    assert await dl_entries(client, "x") == {}


# -- /admin/shard ---------------------------------------------------------------------------------


async def test_admin_shard(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/shard", json={"key": "k", "content": "c", "goal_tag": "g"})
    body = ok(r, 201)
    assert r.headers["etag"] == '"0"'
    assert set(body) == SHARD_FIELDS
    assert (body["key"], body["version"], body["content"], body["goal_tag"]) == ("k", 0, "c", "g")
    assert body["id"] == sha256_hex("c")
    r = await client.post("/admin/shard", json={"key": "k", "content": "other"})
    assert ok(r) == {"status": "already_exists"}
    shard = await read(client, "k")
    assert (shard["content"], shard["version"]) == ("c", 0)


async def test_admin_shard_over_tombstone(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    assert (await delete(client, "k", 0)).status_code == 204
    r = await client.post("/admin/shard", json={"key": "k", "content": "again"})
    assert ok(r, 201)["version"] == 2


@pytest.mark.parametrize("body", [{"key": "k"}, {"content": "c"}, {"key": "a//b", "content": ""}])
async def test_admin_shard_bad_body(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    problem(await client.post("/admin/shard", json=body), 422, "ValidationError")
    assert (await stats(client))["total_shards"] == 0


# -- /admin/delivery-log --------------------------------------------------------------------------


async def test_delivery_log_shape(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    await committed(client, "b", 0, "b1", agent="w")
    await read(client, "a", agent="x")
    await read(client, "b", agent="x")
    await read(client, "a", agent="x", session="s")
    await read(client, "b", agent="y", session="s")
    body = await dl(client)
    assert set(body) == {"agents", "sessions", "total_agents", "total_deliveries", "next_after"}
    assert body["total_agents"] == 3
    assert body["total_deliveries"] == 5
    assert body["next_after"] is None
    assert set(body["agents"]) == {"w", "x"}  # session "" only
    assert set(body["agents"]["x"]) == {"a", "b"}
    assert body["agents"]["x"]["b"]["version"] == 1
    age = body["agents"]["x"]["a"]["age_secs"]
    assert isinstance(age, int | float) and 0 <= age < 60
    assert set(body["agents"]["x"]["a"]) == {"version", "age_secs"}
    versions = {
        a: {s: {k: v["version"] for k, v in e.items()} for s, e in by.items()}
        for a, by in body["sessions"].items()
    }
    assert versions == {
        "w": {"": {"b": 1}},
        "x": {"": {"a": 0, "b": 1}, "s": {"a": 0}},
        "y": {"s": {"b": 1}},
    }


async def test_delivery_log_paging(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    for agent in ("d", "b", "a", "c"):
        await read(client, "k", agent=agent)
    page = ok(await client.get("/admin/delivery-log", params={"limit": 2}))
    assert sorted(page["sessions"]) == ["a", "b"]
    assert page["next_after"] == "b"
    page = ok(await client.get("/admin/delivery-log", params={"limit": 2, "after": "b"}))
    assert sorted(page["sessions"]) == ["c", "d"]
    assert page["next_after"] is None
    page = ok(await client.get("/admin/delivery-log", params={"after": "c"}))
    assert sorted(page["sessions"]) == ["d"]
    assert page["next_after"] is None


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "x"}, {"limit": "10001"}])
async def test_delivery_log_bad_params(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    problem(await client.get("/admin/delivery-log", params=params), 422, "ValidationError")


# -- Host check -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.com", "evil.com:7000", "localhost.evil.com", "10.0.0.1"])
async def test_host_not_allowed(client: httpx.AsyncClient, host: str) -> None:
    await create(client, "k")
    before = await snapshot(client, "k")
    headers = {"Host": host}
    problem(await client.get("/stats", headers=headers), 403, "HostNotAllowed")
    problem(
        await client.get("/shard/k", params={"agent_id": "x"}, headers=headers),
        403,
        "HostNotAllowed",
    )
    r = await client.post("/shard", json={"key": "n", "content": ""}, headers=headers)
    problem(r, 403, "HostNotAllowed")
    r = await client.post(
        "/commit/v2",
        json={"key": "k", "expected_version": 0, "delta": "x", "agent_id": "a"},
        headers=headers,
    )
    problem(r, 403, "HostNotAllowed")
    problem(await client.post("/admin/reset", headers=headers), 403, "HostNotAllowed")
    assert await snapshot(client, "k") == before


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:7000", "127.0.0.1:7000", "[::1]:7000", "LOCALHOST"]
)
async def test_host_allowed(client: httpx.AsyncClient, host: str) -> None:
    ok(await client.get("/stats", headers={"Host": host}))
