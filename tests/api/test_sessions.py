"""Sessions and the DeliveryLog: TTL expiry, overflow, POST /session and
POST /delivery_log/register (protocol.md §§1, 2 and 4 step 9b)."""

from __future__ import annotations

import httpx
import pytest

from tests.api.helpers import (
    advance,
    commit,
    committed,
    create,
    delete,
    dl_entries,
    ok,
    problem,
    read,
    stats,
)
from tests.conftest import AppFactory

TTL_S = 10
TTL_MS = TTL_S * 1000


async def _stale_setup(c: httpx.AsyncClient, agent: str = "x", session: str | None = None) -> None:
    """agent reads o@0; o then moves to 1; w stays at 0."""
    await create(c, "o")
    await create(c, "w")
    await read(c, "o", agent=agent, session=session)
    await committed(c, "o", 0, "o1", agent="y")


@pytest.fixture
async def ttl_client(make_client: AppFactory) -> httpx.AsyncClient:
    _, c = await make_client(session_ttl=TTL_S)
    return c


# -- TTL ---------------------------------------------------------------------------------


async def test_live_entry_within_ttl_still_guards(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    await _stale_setup(c)
    await advance(c, TTL_MS - 1000)
    problem(await commit(c, "w", 0, "w1", agent="x"), 409, "CrossShardStale")


async def test_session_expired_after_ttl(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    await _stale_setup(c)
    await advance(c, TTL_MS + 1)
    before = await stats(c)
    body = problem(await commit(c, "w", 0, "w1", agent="x"), 410, "SessionExpired")
    assert body["reason"] == "ttl"
    # a commit does not restart the session
    problem(await commit(c, "w", 0, "w1", agent="x"), 410, "SessionExpired")
    w = await read(c, "w")
    assert (w["version"], w["attempt_count"]) == (0, 0)
    assert await stats(c) == before
    # other sessions of the same agent are unaffected
    await committed(c, "w", 0, "w1", agent="x", session_id="other")


async def test_expired_entries_leave_delivery_log(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    await _stale_setup(c)
    await advance(c, TTL_MS + 1)
    assert await dl_entries(c, "x") == {}
    s = await stats(c)
    assert s["delivery_log"] == {"agents": 0, "deliveries": 0}


async def test_get_restarts_expired_session(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    await _stale_setup(c)
    await create(c, "z")
    await advance(c, TTL_MS + 1)
    await read(c, "z", agent="x")
    assert await dl_entries(c, "x") == {"z": 0}
    # the expired read of o@0 no longer constrains x
    await committed(c, "w", 0, "w1", agent="x")
    s = await stats(c)
    assert (s["view_checked_commits"], s["view_divergent_commits"]) == (1, 0)


async def test_register_restarts_expired_session(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    await _stale_setup(c)
    await advance(c, TTL_MS + 1)
    r = await c.post("/delivery_log/register", json={"agent_id": "x", "shards_used": ["o"]})
    assert ok(r) == {"ok": True, "registered": 1, "skipped_existing": [], "skipped_no_shard": []}
    assert await dl_entries(c, "x") == {"o": 1}
    await committed(c, "w", 0, "w1", agent="x")


async def test_session_empty_after_two_ttls(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    await _stale_setup(c)
    await advance(c, 2 * TTL_MS + 1)
    await committed(c, "w", 0, "w1", agent="x")
    # empty: nothing was checked
    assert (await stats(c))["view_checked_commits"] == 0


async def test_post_session_clears_expired(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    await _stale_setup(c)
    await advance(c, TTL_MS + 1)
    ok(await c.post("/session", json={"agent_id": "x"}))
    await committed(c, "w", 0, "w1", agent="x")


async def test_read_your_write_keeps_session_live(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    await create(c, "w")
    await committed(c, "w", 0, "w1", agent="x")
    await advance(c, TTL_MS - 1000)
    await committed(c, "w", 1, "w2", agent="x")
    await advance(c, TTL_MS - 1000)
    # the second commit refreshed the entry: still live, not expired
    assert await dl_entries(c, "x") == {"w": 2}
    await committed(c, "w", 2, "w3", agent="x")


async def test_ttl_zero_never_expires(make_client: AppFactory) -> None:
    _, c = await make_client(session_ttl=0)
    await _stale_setup(c)
    await advance(c, 10 * 86_400_000)
    assert await dl_entries(c, "x") == {"o": 0}
    problem(await commit(c, "w", 0, "w1", agent="x"), 409, "CrossShardStale")


async def test_advance_clock_answers_offset(ttl_client: httpx.AsyncClient) -> None:
    c = ttl_client
    body = ok(await c.post("/admin/test/advance-clock", json={"ms": 1500}))
    assert body["offset_ms"] == 1500
    body = ok(await c.post("/admin/test/advance-clock", json={"ms": 500}))
    assert body["offset_ms"] == 2000
    assert isinstance(body["now_ms"], int)


# -- overflow ----------------------------------------------------------------------------


@pytest.fixture
async def small_dl(make_client: AppFactory) -> httpx.AsyncClient:
    _, c = await make_client(max_dl_entries=2)
    for key in ("a", "b", "c", "w"):
        await create(c, key)
    return c


async def test_overflow_serves_but_does_not_record(small_dl: httpx.AsyncClient) -> None:
    c = small_dl
    await read(c, "a", agent="x")
    await read(c, "b", agent="x")
    r = await c.get("/shard/c", params={"agent_id": "x"})
    assert ok(r)["key"] == "c"
    assert r.headers["etag"] == '"0"'
    assert await dl_entries(c, "x") == {"a": 0, "b": 0}
    body = problem(await commit(c, "w", 0, "w1", agent="x"), 410, "SessionExpired")
    assert body["reason"] == "overflow"
    assert (await read(c, "w"))["attempt_count"] == 0


async def test_overflow_is_sticky_until_post_session(small_dl: httpx.AsyncClient) -> None:
    c = small_dl
    for key in ("a", "b", "c"):
        await read(c, key, agent="x")
    await read(c, "a", agent="x")  # a re-read does not clear it
    problem(await commit(c, "w", 0, "w1", agent="x"), 410, "SessionExpired")
    r = await c.post("/delivery_log/register", json={"agent_id": "x", "shards_used": ["w"]})
    assert ok(r)["registered"] == 0
    problem(await commit(c, "w", 0, "w1", agent="x"), 410, "SessionExpired")
    assert ok(await c.post("/session", json={"agent_id": "x"})) == {
        "agent_id": "x",
        "status": "created",
    }
    assert await dl_entries(c, "x") == {}
    await committed(c, "w", 0, "w1", agent="x")


async def test_overflow_survives_ttl(make_client: AppFactory) -> None:
    _, c = await make_client(max_dl_entries=1, session_ttl=TTL_S)
    await create(c, "a")
    await create(c, "b")
    await read(c, "a", agent="x")
    await read(c, "b", agent="x")
    await advance(c, 3 * TTL_MS)
    await read(c, "a", agent="x")
    body = problem(await commit(c, "b", 0, "b1", agent="x"), 410, "SessionExpired")
    assert body["reason"] == "overflow"


async def test_reread_at_capacity_does_not_overflow(small_dl: httpx.AsyncClient) -> None:
    c = small_dl
    await read(c, "a", agent="x")
    await read(c, "b", agent="x")
    await read(c, "a", agent="x")
    await read(c, "b", agent="x")
    await committed(c, "w", 0, "w1", agent="x")


async def test_overflow_is_per_session(small_dl: httpx.AsyncClient) -> None:
    c = small_dl
    for key in ("a", "b", "c"):
        await read(c, key, agent="x")
    await committed(c, "w", 0, "w1", agent="x", session_id="s2")
    await committed(c, "a", 0, "a1", agent="y")


async def test_register_overflow(small_dl: httpx.AsyncClient) -> None:
    c = small_dl
    r = await c.post(
        "/delivery_log/register", json={"agent_id": "x", "shards_used": ["a", "b", "c"]}
    )
    assert ok(r)["registered"] == 2
    assert await dl_entries(c, "x") == {"a": 0, "b": 0}
    body = problem(await commit(c, "w", 0, "w1", agent="x"), 410, "SessionExpired")
    assert body["reason"] == "overflow"


# -- POST /session ----------------------------------------------------------------------


async def test_post_session_empties(client: httpx.AsyncClient) -> None:
    await _stale_setup(client)
    body = ok(await client.post("/session", json={"agent_id": "x", "session_ttl": 3600}))
    assert body == {"agent_id": "x", "status": "created"}
    assert await dl_entries(client, "x") == {}
    await committed(client, "w", 0, "w1", agent="x")


async def test_post_session_only_that_session(client: httpx.AsyncClient) -> None:
    await _stale_setup(client, session="s1")
    await read(client, "o", agent="x", session="s2")  # o@1, fresh
    await committed(client, "o", 1, "o2", agent="y")
    ok(await client.post("/session", json={"agent_id": "x", "session_id": "s1"}))
    assert await dl_entries(client, "x", "s1") == {}
    assert await dl_entries(client, "x", "s2") == {"o": 1}
    await committed(client, "w", 0, "w1", agent="x", session_id="s1")
    problem(await commit(client, "w", 1, "w2", agent="x", session_id="s2"), 409, "CrossShardStale")


async def test_post_session_by_headers(client: httpx.AsyncClient) -> None:
    await _stale_setup(client, session="s")
    r = await client.post(
        "/session", json={}, headers={"X-Agent-Id": "x", "X-SBus-Session-Id": "s"}
    )
    assert ok(r) == {"agent_id": "x", "status": "created"}
    assert await dl_entries(client, "x", "s") == {}


async def test_post_session_agent_mismatch(client: httpx.AsyncClient) -> None:
    await _stale_setup(client)
    for header in ("X-Agent-Id", "X-SBus-Agent-Id"):
        r = await client.post("/session", json={"agent_id": "x"}, headers={header: "z"})
        problem(r, 403, "AgentMismatch")
    r = await client.post(
        "/session", json={"agent_id": "x", "session_id": "a"}, headers={"X-SBus-Session-Id": "b"}
    )
    problem(r, 403, "AgentMismatch")
    assert await dl_entries(client, "x") == {"o": 0}


@pytest.mark.parametrize("body", [{}, {"agent_id": ""}, {"session_id": "s"}])
async def test_post_session_requires_agent(client: httpx.AsyncClient, body: dict[str, str]) -> None:
    problem(await client.post("/session", json=body), 422, "ValidationError")


# -- register ----------------------------------------------------------------------------


async def test_register_records_current_versions(client: httpx.AsyncClient) -> None:
    await _stale_setup(client, agent="reader")
    await create(client, "p")
    await delete(client, "p", 0)
    r = await client.post(
        "/delivery_log/register",
        json={"agent_id": "x", "shards_used": ["o", "w", "ghost", "p", "o"], "source": "proxy"},
    )
    body = ok(r)
    assert body == {
        "ok": True,
        "registered": 2,
        "skipped_existing": [],
        "skipped_no_shard": ["ghost", "p"],
    }
    assert await dl_entries(client, "x") == {"o": 1, "w": 0}
    await committed(client, "o", 1, "o2", agent="y")
    body = problem(await commit(client, "w", 0, "w1", agent="x"), 409, "CrossShardStale")
    assert body["stale_keys"] == [{"key": "o", "version_at_read": 1, "current_version": 2}]


async def test_register_skips_live_entries(client: httpx.AsyncClient) -> None:
    await _stale_setup(client)  # x holds o@0, o is at 1
    r = await client.post(
        "/delivery_log/register", json={"agent_id": "x", "shards_used": ["o", "w"]}
    )
    assert ok(r) == {"ok": True, "registered": 1, "skipped_existing": ["o"], "skipped_no_shard": []}
    assert await dl_entries(client, "x") == {"o": 0, "w": 0}
    problem(await commit(client, "w", 0, "w1", agent="x"), 409, "CrossShardStale")


async def test_register_session_from_header_only(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    r = await client.post(
        "/delivery_log/register",
        json={"agent_id": "x", "session_id": "body-s", "shards_used": ["o"]},
    )
    assert ok(r)["registered"] == 1
    assert await dl_entries(client, "x") == {"o": 0}
    assert await dl_entries(client, "x", "body-s") == {}
    r = await client.post(
        "/delivery_log/register",
        json={"agent_id": "x", "session_id": "body-s", "shards_used": ["o"]},
        headers={"X-SBus-Session-Id": "hdr-s"},
    )
    assert ok(r)["registered"] == 1
    assert await dl_entries(client, "x", "hdr-s") == {"o": 0}
    assert await dl_entries(client, "x", "body-s") == {}


async def test_register_empty_list(client: httpx.AsyncClient) -> None:
    r = await client.post("/delivery_log/register", json={"agent_id": "x", "shards_used": []})
    assert ok(r) == {"ok": True, "registered": 0, "skipped_existing": [], "skipped_no_shard": []}


async def test_register_empty_agent_422(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    r = await client.post("/delivery_log/register", json={"agent_id": "", "shards_used": ["o"]})
    problem(r, 422, "ValidationError")
    assert (await stats(client))["delivery_log"]["deliveries"] == 0


@pytest.mark.parametrize(
    "body", [{"shards_used": ["o"]}, {"agent_id": "x"}, {"agent_id": "x", "shards_used": "o"}]
)
async def test_register_schema_422(client: httpx.AsyncClient, body: dict[str, object]) -> None:
    problem(await client.post("/delivery_log/register", json=body), 422, "ValidationError")


async def test_register_agent_mismatch(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    r = await client.post(
        "/delivery_log/register",
        json={"agent_id": "x", "shards_used": ["o"]},
        headers={"X-SBus-Agent-Id": "other"},
    )
    problem(r, 403, "AgentMismatch")
    assert (await stats(client))["delivery_log"]["deliveries"] == 0
