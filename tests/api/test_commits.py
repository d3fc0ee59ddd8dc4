"""POST /commit, /commit/v2, /commit/multi and /rollback: the commit protocol of protocol.md
section 4 seen through the wire, with its counters (section 6)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.helpers import (
    SHARD_FIELDS,
    commit,
    committed,
    create,
    delete,
    dl_entries,
    history,
    ok,
    problem,
    read,
    sha256_hex,
    snapshot,
    stats,
)
from tests.conftest import AppFactory

PATHS = ["/commit", "/commit/v2"]


# -- single commits ----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_commit_success(client: httpx.AsyncClient, path: str) -> None:
    await create(client, "k", "v0")
    r = await commit(client, "k", 0, "v1", path=path, rationale="why")
    body = ok(r)
    assert set(body) == {"new_version", "shard_id", "commit_id"}
    assert body["new_version"] == 1
    assert body["shard_id"] == sha256_hex("v0")
    assert isinstance(body["commit_id"], str) and body["commit_id"]
    assert r.headers["etag"] == '"1"'
    shard = await read(client, "k")
    assert (shard["version"], shard["content"]) == (1, "v1")
    assert (shard["attempt_count"], shard["conflict_count"], shard["delta_log_depth"]) == (1, 0, 1)
    assert shard["id"] == sha256_hex("v0")
    s = await stats(client)
    assert (s["total_commits"], s["total_conflicts"], s["total_attempts"], s["scr"]) == (
        1,
        0,
        1,
        0.0,
    )
    entries = ok(await client.get("/history/k"))["entries"]
    assert entries[0]["rationale"] == "why"
    assert entries[0]["commit_id"] == body["commit_id"]
    assert entries[0]["agent_id"] == "a"


@pytest.mark.parametrize("path", PATHS)
async def test_commit_aliases(client: httpx.AsyncClient, path: str) -> None:
    await create(client, "k")
    r = await client.post(
        path, json={"key": "k", "expected_ver": 0, "content": "via alias", "agent_id": "a"}
    )
    assert ok(r)["new_version"] == 1
    assert (await read(client, "k"))["content"] == "via alias"


@pytest.mark.parametrize(
    "fields",
    [
        {"expected_version": 0, "expected_ver": 0, "delta": "x"},
        {"expected_version": 0, "delta": "x", "content": "x"},
        {"expected_ver": 0, "content": "x", "delta": "y"},
    ],
)
async def test_commit_ambiguous_field(client: httpx.AsyncClient, fields: dict[str, Any]) -> None:
    await create(client, "k")
    r = await client.post("/commit/v2", json={"key": "k", "agent_id": "a", **fields})
    problem(r, 422, "AmbiguousField")
    assert (await read(client, "k"))["version"] == 0


async def test_commit_requires_expected_version(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.post("/commit/v2", json={"key": "k", "delta": "x", "agent_id": "a"})
    problem(r, 422, "ValidationError")


@pytest.mark.parametrize("agent", [None, ""])
async def test_commit_requires_agent(client: httpx.AsyncClient, agent: str | None) -> None:
    await create(client, "k")
    body: dict[str, Any] = {"key": "k", "expected_version": 0, "delta": "x"}
    if agent is not None:
        body["agent_id"] = agent
    problem(await client.post("/commit/v2", json=body), 422, "ValidationError")
    assert (await stats(client))["total_commits"] == 0


async def test_commit_agent_from_header(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit/v2",
        json={"key": "k", "expected_version": 0, "delta": "x"},
        headers={"X-SBus-Agent-Id": "h"},
    )
    ok(r)
    assert ok(await client.get("/history/k"))["entries"][0]["agent_id"] == "h"
    assert await dl_entries(client, "h") == {"k": 1}


@pytest.mark.parametrize("header", ["X-Agent-Id", "X-SBus-Agent-Id"])
async def test_commit_agent_mismatch(client: httpx.AsyncClient, header: str) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit/v2",
        json={"key": "k", "expected_version": 0, "delta": "x", "agent_id": "a"},
        headers={header: "b"},
    )
    problem(r, 403, "AgentMismatch")
    shard = await read(client, "k")
    assert (shard["version"], shard["attempt_count"]) == (0, 0)


async def test_commit_session_mismatch(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit/v2",
        json={"key": "k", "expected_version": 0, "delta": "x", "agent_id": "a", "session_id": "1"},
        headers={"X-SBus-Session-Id": "2"},
    )
    problem(r, 403, "AgentMismatch")


async def test_commit_session_from_header(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    await create(client, "o")
    await read(client, "o", agent="a", session="s")
    await committed(client, "o", 0, "x", agent="b")
    # the header selects session s, whose read of o is stale
    r = await client.post(
        "/commit/v2",
        json={"key": "k", "expected_version": 0, "delta": "x", "agent_id": "a"},
        headers={"X-SBus-Session-Id": "s"},
    )
    problem(r, 409, "CrossShardStale")
    # the default session is unconstrained
    await committed(client, "k", 0, "y", agent="a")


async def test_version_mismatch_counts(client: httpx.AsyncClient) -> None:
    await create(client, "k", "v0")
    await committed(client, "k", 0, "v1")
    body = problem(await commit(client, "k", 0, "late", agent="b"), 409, "VersionMismatch")
    assert (body["key"], body["expected"], body["found"]) == ("k", 0, 1)
    shard = await read(client, "k")
    assert (shard["version"], shard["content"]) == (1, "v1")
    assert (shard["attempt_count"], shard["conflict_count"]) == (2, 1)
    s = await stats(client)
    assert (s["total_commits"], s["total_conflicts"], s["total_attempts"]) == (1, 1, 2)
    assert s["scr"] == 0.5
    assert s["cross_shard_stale"] == 0
    # a rejected commit records no read-your-write
    assert await dl_entries(client, "b") == {}


async def test_version_mismatch_ahead(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    body = problem(await commit(client, "k", 7, "x"), 409, "VersionMismatch")
    assert (body["expected"], body["found"]) == (7, 0)


async def test_commit_missing_shard(client: httpx.AsyncClient) -> None:
    body = problem(await commit(client, "nope", 0, "x"), 404, "ShardNotFound")
    assert body["key"] == "nope"
    s = await stats(client)
    assert (s["total_commits"], s["total_conflicts"], s["total_attempts"]) == (0, 0, 0)


async def test_read_your_writes(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    await create(client, "o")
    await read(client, "k", agent="a")
    await committed(client, "k", 0, "x", agent="a")
    assert await dl_entries(client, "a") == {"k": 1}
    # a's next commit elsewhere is not stale because of its own write
    await committed(client, "o", 0, "y", agent="a")
    assert await dl_entries(client, "a") == {"k": 1, "o": 1}
    await committed(client, "k", 1, "z", agent="a")


async def test_commit_without_prior_read_sets_dl(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    await committed(client, "k", 0, "x", agent="a", session_id="s")
    assert await dl_entries(client, "a", "s") == {"k": 1}


# -- cross-shard staleness -------------------------------------------------------------

# The same words on every store, and they name the remedy.
STALE_DETAIL = (
    "cross-shard stale read: key={key} version_at_read={read} current_version={current}; "
    "re-read the keys listed in stale_keys and retry, or start a new session with POST /session"
)


async def test_cross_shard_stale_from_delivery_log(client: httpx.AsyncClient) -> None:
    for key in ("a", "b", "c", "w"):
        await create(client, key)
    for key in ("c", "a", "b"):
        await read(client, key, agent="x")
    await committed(client, "c", 0, "c1", agent="y1")
    await committed(client, "a", 0, "a1", agent="y2")
    body = problem(await commit(client, "w", 0, "w1", agent="x"), 409, "CrossShardStale")
    assert body["detail"] == STALE_DETAIL.format(key="a", read=0, current=1)
    assert (body["key"], body["version_at_read"], body["current_version"]) == ("a", 0, 1)
    assert body["stale_keys"] == [
        {"key": "a", "version_at_read": 0, "current_version": 1},
        {"key": "c", "version_at_read": 0, "current_version": 1},
    ]
    w = await read(client, "w")
    # rejected before the written keys are looked at: no attempt
    assert (w["version"], w["attempt_count"], w["conflict_count"]) == (0, 0, 0)
    s = await stats(client)
    assert s["cross_shard_stale"] == 1
    assert s["total_conflicts"] == 0
    assert s["total_commits"] == 2
    assert s["view_checked_commits"] == 1
    assert s["view_divergent_commits"] == 1
    assert s["view_divergence_rate"] == 1.0
    # the DL entries of the rejected commit are untouched
    assert await dl_entries(client, "x") == {"a": 0, "b": 0, "c": 0}


async def test_reread_clears_staleness(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    await create(client, "w")
    await read(client, "o", agent="x")
    await committed(client, "o", 0, "o1", agent="y")
    problem(await commit(client, "w", 0, "w1", agent="x"), 409, "CrossShardStale")
    await read(client, "o", agent="x")
    await committed(client, "w", 0, "w1", agent="x")
    s = await stats(client)
    assert (s["view_checked_commits"], s["view_divergent_commits"]) == (2, 1)
    assert s["view_divergence_rate"] == 0.5


async def test_explicit_read_set(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    await create(client, "w")
    await committed(client, "o", 0, "o1", agent="y")
    rs = [{"key": "o", "version_at_read": 0}]
    body = problem(await commit(client, "w", 0, "x", read_set=rs), 409, "CrossShardStale")
    assert body["stale_keys"] == [{"key": "o", "version_at_read": 0, "current_version": 1}]
    rs = [{"key": "o", "version_at_read": 1}]
    await committed(client, "w", 0, "x", read_set=rs)
    s = await stats(client)
    assert (s["view_checked_commits"], s["view_divergent_commits"], s["cross_shard_stale"]) == (
        2,
        1,
        1,
    )


async def test_explicit_read_set_of_written_key_is_ignored(client: httpx.AsyncClient) -> None:
    await create(client, "w")
    await committed(client, "w", 0, "x", agent="y")
    rs = [{"key": "w", "version_at_read": 0}]
    await committed(client, "w", 1, "z", read_set=rs)
    # a written key is excluded, so the effective read set was empty
    assert (await stats(client))["view_checked_commits"] == 0


async def test_explicit_read_set_missing_key(client: httpx.AsyncClient) -> None:
    await create(client, "w")
    rs = [{"key": "ghost", "version_at_read": 0}]
    body = problem(await commit(client, "w", 0, "x", read_set=rs), 404, "ShardNotFound")
    assert body["key"] == "ghost"
    assert (await read(client, "w"))["version"] == 0


async def test_read_set_key_in_both_checked_at_both_versions(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    await create(client, "w")
    await committed(client, "o", 0, "o1", agent="y")
    await read(client, "o", agent="x")  # DL: o@1, current
    rs = [{"key": "o", "version_at_read": 0}]  # explicit: o@0, stale
    body = problem(
        await commit(client, "w", 0, "x", agent="x", read_set=rs), 409, "CrossShardStale"
    )
    assert body["stale_keys"] == [{"key": "o", "version_at_read": 0, "current_version": 1}]


async def test_duplicate_read_set_keys_422(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    await create(client, "w")
    rs = [{"key": "o", "version_at_read": 0}, {"key": "o", "version_at_read": 0}]
    problem(await commit(client, "w", 0, "x", read_set=rs), 422, "ValidationError")


async def test_read_set_too_large(make_client: AppFactory) -> None:
    _, c = await make_client(max_read_set=2)
    for key in ("a", "b", "c", "w"):
        await create(c, key)
    rs = [{"key": k, "version_at_read": 0} for k in ("a", "b", "c")]
    problem(await commit(c, "w", 0, "x", read_set=rs), 413, "ReadSetTooLarge")
    await committed(c, "w", 0, "x", read_set=rs[:2])
    s = await stats(c)
    assert (s["total_commits"], s["view_checked_commits"]) == (1, 1)


async def test_view_counters_counted_before_version_check(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    await create(client, "w")
    await read(client, "o", agent="x")
    await committed(client, "w", 0, "w1", agent="y")
    # o is fresh, w mismatches: checked, not divergent, a conflict
    problem(await commit(client, "w", 0, "late", agent="x"), 409, "VersionMismatch")
    s = await stats(client)
    assert (s["view_checked_commits"], s["view_divergent_commits"]) == (1, 0)
    assert (s["total_conflicts"], s["cross_shard_stale"]) == (1, 0)


async def test_ori_off_admits_stale_but_counts_divergence(client: httpx.AsyncClient) -> None:
    await create(client, "o")
    await create(client, "w")
    cfg = ok(await client.post("/admin/config", json={"ori_enabled": False}))
    assert cfg == {
        "ok": True,
        "ori_enabled": False,
        "view_checked_commits": 0,
        "view_divergent_commits": 0,
    }
    await read(client, "o", agent="x")
    await committed(client, "o", 0, "o1", agent="y")
    await committed(client, "w", 0, "w1", agent="x")
    s = await stats(client)
    assert s["ori_enabled"] is False
    assert (s["view_checked_commits"], s["view_divergent_commits"]) == (1, 1)
    assert s["cross_shard_stale"] == 0
    assert s["total_commits"] == 2
    cfg = ok(await client.get("/admin/config"))
    assert cfg == {
        "ok": True,
        "ori_enabled": False,
        "view_checked_commits": 1,
        "view_divergent_commits": 1,
    }
    ok(await client.post("/admin/config", json={"ori_enabled": True}))
    await committed(client, "o", 1, "o2", agent="y")
    problem(await commit(client, "w", 1, "w2", agent="x"), 409, "CrossShardStale")


async def test_ori_off_still_checks_versions(client: httpx.AsyncClient) -> None:
    ok(await client.post("/admin/config", json={"ori_enabled": False}))
    await create(client, "w")
    await committed(client, "w", 0, "w1")
    problem(await commit(client, "w", 0, "w2", agent="b"), 409, "VersionMismatch")
    rs = [{"key": "ghost", "version_at_read": 0}]
    problem(await commit(client, "w", 1, "w2", read_set=rs), 404, "ShardNotFound")


async def test_mandate_not_found_on_plain_shard(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    before = await stats(client)
    r = await commit(client, "k", 0, "x", mandate="m.t.x", context={"a": 1})
    problem(r, 404, "MandateNotFound")
    shard = await read(client, "k")
    assert (shard["version"], shard["attempt_count"]) == (0, 0)
    assert await stats(client) == before


async def test_mandate_required(client: httpx.AsyncClient) -> None:
    await create(client, "k", policy={"require_mandate": True})
    before = await stats(client)
    body = problem(await commit(client, "k", 0, "x"), 403, "MandateRequired")
    assert body["key"] == "k"
    problem(await commit(client, "k", 0, "x", mandate="tok"), 404, "MandateNotFound")
    r = await client.post("/rollback", json={"key": "k", "target_version": 0, "agent_id": "a"})
    problem(r, 403, "MandateRequired")
    problem(await delete(client, "k", 0), 403, "MandateRequired")
    r = await client.delete(
        "/shard/k",
        params={"expected_version": "0", "agent_id": "a"},
        headers={"X-SBus-Mandate": "tok", "X-SBus-Mandate-Context": "{}"},
    )
    problem(r, 404, "MandateNotFound")
    r = await client.post(
        "/commit/multi",
        json={"agent_id": "a", "writes": [{"key": "k", "expected_version": 0, "delta": "x"}]},
    )
    problem(r, 403, "MandateRequired")
    shard = await read(client, "k")
    assert (shard["version"], shard["attempt_count"], shard["conflict_count"]) == (0, 0, 0)
    assert await stats(client) == before


# -- multi -------------------------------------------------------------------------------


def _multi(*writes: tuple[str, int, str], agent: str = "a", **extra: Any) -> dict[str, Any]:
    return {
        "agent_id": agent,
        "writes": [{"key": k, "expected_version": v, "delta": d} for k, v, d in writes],
        **extra,
    }


async def test_multi_success(client: httpx.AsyncClient) -> None:
    await create(client, "b")
    await create(client, "a")
    await committed(client, "a", 0, "a1")
    r = await client.post("/commit/multi", json=_multi(("b", 0, "B"), ("a", 1, "A"), rationale="r"))
    body = ok(r)
    assert set(body) == {"results", "commit_id"}
    assert body["results"] == [
        {"key": "b", "new_version": 1, "op": "commit"},
        {"key": "a", "new_version": 2, "op": "commit"},
    ]
    assert "etag" not in r.headers
    for key, content in (("a", "A"), ("b", "B")):
        assert (await read(client, key))["content"] == content
        entry = ok(await client.get(f"/history/{key}"))["entries"][0]
        assert entry["commit_id"] == body["commit_id"]
        assert entry["rationale"] == "r"
    s = await stats(client)
    assert s["total_commits"] == 2  # per transaction
    assert await dl_entries(client, "a") == {"a": 2, "b": 1}


async def test_multi_aliases(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    r = await client.post(
        "/commit/multi",
        json={"agent_id": "a", "writes": [{"key": "a", "expected_ver": 0, "content": "c"}]},
    )
    assert ok(r)["results"] == [{"key": "a", "new_version": 1, "op": "commit"}]
    r = await client.post(
        "/commit/multi",
        json={
            "agent_id": "a",
            "writes": [{"key": "a", "expected_version": 1, "expected_ver": 1, "delta": "c"}],
        },
    )
    problem(r, 422, "AmbiguousField")


async def test_multi_all_or_nothing_first_failing_key(client: httpx.AsyncClient) -> None:
    for key in ("a", "b", "c", "d"):
        await create(client, key)
    await committed(client, "d", 0, "d1", agent="y")
    await committed(client, "b", 0, "b1", agent="y")
    r = await client.post(
        "/commit/multi", json=_multi(("d", 0, "D"), ("c", 0, "C"), ("b", 0, "B"), ("a", 0, "A"))
    )
    body = problem(r, 409, "VersionMismatch")
    assert (body["key"], body["expected"], body["found"]) == ("b", 0, 1)
    for key, version in (("a", 0), ("b", 1), ("c", 0), ("d", 1)):
        assert (await read(client, key))["version"] == version
    # keys up to and including the failing one were attempted, in ascending order
    assert (await read(client, "a"))["attempt_count"] == 1
    b = await read(client, "b")
    assert (b["attempt_count"], b["conflict_count"]) == (2, 1)
    assert (await read(client, "c"))["attempt_count"] == 0
    assert (await read(client, "d"))["attempt_count"] == 1
    s = await stats(client)
    assert (s["total_commits"], s["total_conflicts"]) == (2, 1)
    assert await dl_entries(client, "a") == {}


async def test_multi_missing_key(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    body = problem(
        await client.post("/commit/multi", json=_multi(("a", 0, "A"), ("zz", 0, "Z"))),
        404,
        "ShardNotFound",
    )
    assert body["key"] == "zz"
    assert (await read(client, "a"))["version"] == 0


async def test_multi_cross_shard_stale(client: httpx.AsyncClient) -> None:
    for key in ("a", "b", "o"):
        await create(client, key)
    await read(client, "o", agent="x")
    await read(client, "a", agent="x")
    await committed(client, "o", 0, "o1", agent="y")
    await committed(client, "a", 0, "a1", agent="y")
    # a is written: its DL entry is excluded; o is stale
    r = await client.post("/commit/multi", json=_multi(("a", 1, "A"), ("b", 0, "B"), agent="x"))
    body = problem(r, 409, "CrossShardStale")
    assert body["detail"] == STALE_DETAIL.format(key="o", read=0, current=1)
    assert body["stale_keys"] == [{"key": "o", "version_at_read": 0, "current_version": 1}]


@pytest.mark.parametrize(
    "writes",
    [
        [],
        [{"key": "a", "expected_version": 0, "delta": "x"}] * 2,
    ],
    ids=["empty", "duplicate"],
)
async def test_multi_bad_writes_422(
    client: httpx.AsyncClient, writes: list[dict[str, Any]]
) -> None:
    await create(client, "a")
    r = await client.post("/commit/multi", json={"agent_id": "a", "writes": writes})
    problem(r, 422, "ValidationError")
    assert (await read(client, "a"))["attempt_count"] == 0


async def test_multi_missing_writes_422(client: httpx.AsyncClient) -> None:
    problem(await client.post("/commit/multi", json={"agent_id": "a"}), 422, "ValidationError")


async def test_multi_write_needs_expected_version(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    r = await client.post(
        "/commit/multi", json={"agent_id": "a", "writes": [{"key": "a", "delta": "x"}]}
    )
    problem(r, 422, "ValidationError")


async def test_multi_too_many_writes(make_client: AppFactory) -> None:
    _, c = await make_client(max_txn_keys=2)
    for key in ("a", "b", "c"):
        await create(c, key)
    body = problem(
        await c.post("/commit/multi", json=_multi(("a", 0, "A"), ("b", 0, "B"), ("c", 0, "C"))),
        413,
        "TooManyWrites",
    )
    assert body["max"] == 2
    ok(await c.post("/commit/multi", json=_multi(("a", 0, "A"), ("b", 0, "B"))))
    assert (await stats(c))["total_commits"] == 1


async def test_multi_rejects_if_match(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    r = await client.post("/commit/multi", json=_multi(("a", 0, "A")), headers={"If-Match": '"0"'})
    problem(r, 400, "InvalidPrecondition")
    assert (await read(client, "a"))["version"] == 0


async def test_multi_explicit_read_set(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "o")
    await committed(client, "o", 0, "o1", agent="y")
    rs = [{"key": "o", "version_at_read": 0}]
    r = await client.post("/commit/multi", json=_multi(("a", 0, "A"), read_set=rs))
    problem(r, 409, "CrossShardStale")
    rs = [{"key": "o", "version_at_read": 1}]
    ok(await client.post("/commit/multi", json=_multi(("a", 0, "A"), read_set=rs)))


async def test_multi_deleted_key(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    assert (await delete(client, "b", 0)).status_code == 204
    body = problem(
        await client.post("/commit/multi", json=_multi(("a", 0, "A"), ("b", 1, "B"))),
        404,
        "ShardDeleted",
    )
    assert (body["key"], body["version"]) == ("b", 1)


# -- If-Match ----------------------------------------------------------------------------


async def test_if_match_supplies_expected_version(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit/v2", json={"key": "k", "delta": "x", "agent_id": "a"}, headers={"If-Match": '"0"'}
    )
    assert ok(r)["new_version"] == 1
    assert r.headers["etag"] == '"1"'


async def test_if_match_equal_to_expected_version(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit",
        json={"key": "k", "expected_version": 0, "delta": "x", "agent_id": "a"},
        headers={"If-Match": '"0"'},
    )
    assert ok(r)["new_version"] == 1


@pytest.mark.parametrize("value", ["*", 'W/"0"', '"0", "1"', '"0","1"', "0", '"x"', '""', '"-1"'])
async def test_if_match_invalid(client: httpx.AsyncClient, value: str) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit/v2", json={"key": "k", "delta": "x", "agent_id": "a"}, headers={"If-Match": value}
    )
    problem(r, 400, "InvalidPrecondition")
    r = await client.delete("/shard/k", params={"agent_id": "a"}, headers={"If-Match": value})
    problem(r, 400, "InvalidPrecondition")
    shard = await read(client, "k")
    assert (shard["version"], shard["attempt_count"]) == (0, 0)


async def test_if_match_conflicts_with_expected_version(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit/v2",
        json={"key": "k", "expected_version": 0, "delta": "x", "agent_id": "a"},
        headers={"If-Match": '"1"'},
    )
    problem(r, 422, "PreconditionConflict")
    assert (await read(client, "k"))["attempt_count"] == 0


async def test_if_match_failed_is_version_mismatch(client: httpx.AsyncClient) -> None:
    await create(client, "k")
    r = await client.post(
        "/commit/v2", json={"key": "k", "delta": "x", "agent_id": "a"}, headers={"If-Match": '"4"'}
    )
    body = problem(r, 409, "VersionMismatch")
    assert (body["key"], body["expected"], body["found"]) == ("k", 4, 0)
    assert (await stats(client))["total_conflicts"] == 1


# -- rollback ----------------------------------------------------------------------------


async def _three_versions(c: httpx.AsyncClient) -> None:
    await create(c, "k", "c0", goal_tag="g")
    await committed(c, "k", 0, "c1")
    await committed(c, "k", 1, "c2")


@pytest.mark.parametrize("target", [0, 1])
async def test_rollback(client: httpx.AsyncClient, target: int) -> None:
    await _three_versions(client)
    r = await client.post(
        "/rollback",
        json={"key": "k", "target_version": target, "agent_id": "r", "expected_version": 2},
    )
    body = ok(r)
    assert set(body) == SHARD_FIELDS | {"commit_id"}
    assert r.headers["etag"] == '"3"'
    assert (body["version"], body["content"], body["goal_tag"]) == (3, f"c{target}", "g")
    assert body["id"] == sha256_hex("c0")
    assert body["attempt_count"] == 3
    entry = ok(await client.get("/history/k"))["entries"][0]
    assert entry["rationale"] == f"rollback to {target}"
    assert (entry["version"], entry["content"], entry["agent_id"]) == (3, f"c{target}", "r")
    assert entry["commit_id"] == body["commit_id"]
    assert (await stats(client))["total_commits"] == 3
    assert await dl_entries(client, "r") == {"k": 3}


async def test_rollback_without_expected_version(client: httpx.AsyncClient) -> None:
    await _three_versions(client)
    r = await client.post("/rollback", json={"key": "k", "target_version": 1, "agent_id": "r"})
    assert ok(r)["version"] == 3


async def test_rollback_expected_ver_alias_and_if_match(client: httpx.AsyncClient) -> None:
    await _three_versions(client)
    r = await client.post(
        "/rollback", json={"key": "k", "target_version": 1, "agent_id": "r", "expected_ver": 2}
    )
    assert ok(r)["version"] == 3
    r = await client.post(
        "/rollback",
        json={"key": "k", "target_version": 0, "agent_id": "r"},
        headers={"If-Match": '"3"'},
    )
    assert ok(r)["version"] == 4
    r = await client.post(
        "/rollback",
        json={"key": "k", "target_version": 0, "agent_id": "r", "expected_version": 4},
        headers={"If-Match": '"3"'},
    )
    problem(r, 422, "PreconditionConflict")
    r = await client.post(
        "/rollback",
        json={
            "key": "k",
            "target_version": 0,
            "agent_id": "r",
            "expected_version": 4,
            "expected_ver": 4,
        },
    )
    problem(r, 422, "AmbiguousField")


async def test_rollback_version_mismatch(client: httpx.AsyncClient) -> None:
    await _three_versions(client)
    r = await client.post(
        "/rollback",
        json={"key": "k", "target_version": 0, "agent_id": "r", "expected_version": 1},
    )
    body = problem(r, 409, "VersionMismatch")
    assert (body["expected"], body["found"]) == (1, 2)


@pytest.mark.parametrize("target", [3, 99])
async def test_rollback_beyond_current(client: httpx.AsyncClient, target: int) -> None:
    await _three_versions(client)
    r = await client.post("/rollback", json={"key": "k", "target_version": target, "agent_id": "r"})
    problem(r, 404, "VersionNotFound")
    assert (await read(client, "k"))["version"] == 2
    assert (await stats(client))["total_commits"] == 2


async def test_rollback_trimmed_version(make_client: AppFactory) -> None:
    _, c = await make_client(history_depth=3)
    await create(c, "k", "c0")
    for v in range(4):
        await committed(c, "k", v, f"c{v + 1}")
    entries = ok(await c.get("/history/k"))["entries"]
    assert [e["version"] for e in entries] == [4, 3, 2]
    assert (await read(c, "k"))["delta_log_depth"] == 3
    for target in (0, 1):
        r = await c.post("/rollback", json={"key": "k", "target_version": target, "agent_id": "r"})
        body = problem(r, 404, "VersionNotFound")
        assert body["key"] == "k"
    r = await c.post("/rollback", json={"key": "k", "target_version": 2, "agent_id": "r"})
    assert ok(r)["content"] == "c2"


async def test_rollback_missing_and_deleted(client: httpx.AsyncClient) -> None:
    r = await client.post("/rollback", json={"key": "nope", "target_version": 0, "agent_id": "r"})
    problem(r, 404, "ShardNotFound")
    await create(client, "k")
    assert (await delete(client, "k", 0)).status_code == 204
    r = await client.post("/rollback", json={"key": "k", "target_version": 0, "agent_id": "r"})
    problem(r, 404, "ShardDeleted")


async def test_rollback_to_tombstone_version_not_found(client: httpx.AsyncClient) -> None:
    await create(client, "k", "c0")
    assert (await delete(client, "k", 0)).status_code == 204
    await create(client, "k", "c2")
    r = await client.post("/rollback", json={"key": "k", "target_version": 1, "agent_id": "r"})
    problem(r, 404, "VersionNotFound")
    r = await client.post("/rollback", json={"key": "k", "target_version": 0, "agent_id": "r"})
    assert (ok(r)["version"], ok(r)["content"]) == (3, "c0")


async def test_rollback_stale_read_set(client: httpx.AsyncClient) -> None:
    await _three_versions(client)
    await create(client, "o")
    await read(client, "o", agent="r")
    await committed(client, "o", 0, "o1", agent="y")
    r = await client.post("/rollback", json={"key": "k", "target_version": 0, "agent_id": "r"})
    problem(r, 409, "CrossShardStale")
    rs = [{"key": "o", "version_at_read": 0}]
    r = await client.post(
        "/rollback", json={"key": "k", "target_version": 0, "agent_id": "z", "read_set": rs}
    )
    body = problem(r, 409, "CrossShardStale")
    assert body["detail"] == STALE_DETAIL.format(key="o", read=0, current=1)


async def test_rollback_without_expected_version_checks_its_own_read(
    client: httpx.AsyncClient,
) -> None:
    """Without an expected version nothing guards the rolled-back key but its caller's
    read of it: a stale DL entry (or read_set entry) for that key is 409 like any read."""
    await create(client, "k", "c0")
    await read(client, "k", agent="a")
    await committed(client, "k", 0, "c1", agent="b")
    r = await client.post("/rollback", json={"key": "k", "target_version": 0, "agent_id": "a"})
    body = problem(r, 409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == ("k", 0, 1)
    assert body["stale_keys"] == [{"key": "k", "version_at_read": 0, "current_version": 1}]
    shard = await read(client, "k")
    assert (shard["version"], shard["content"], shard["attempt_count"]) == (1, "c1", 1)
    assert (await stats(client))["cross_shard_stale"] == 1
    rs = [{"key": "k", "version_at_read": 0}]
    r = await client.post(
        "/rollback", json={"key": "k", "target_version": 0, "agent_id": "z", "read_set": rs}
    )
    problem(r, 409, "CrossShardStale")
    # With an expected version the guard decides, as for a commit.
    r = await client.post(
        "/rollback",
        json={"key": "k", "target_version": 0, "agent_id": "a", "expected_version": 1},
    )
    assert (ok(r)["version"], ok(r)["content"]) == (2, "c0")
    # A session that never read the key: nothing to check, the rollback applies.
    r = await client.post(
        "/rollback", json={"key": "k", "target_version": 1, "agent_id": "a", "session_id": "s2"}
    )
    assert (ok(r)["version"], ok(r)["content"]) == (3, "c1")
    assert await dl_entries(client, "a") == {"k": 2}


async def test_rollback_requires_agent(client: httpx.AsyncClient) -> None:
    await _three_versions(client)
    r = await client.post("/rollback", json={"key": "k", "target_version": 0})
    problem(r, 422, "ValidationError")


async def test_delta_too_large(make_client: AppFactory) -> None:
    _, c = await make_client(max_delta=10)
    body = problem(
        await c.post("/shard", json={"key": "k", "content": "x" * 11}), 413, "DeltaTooLarge"
    )
    assert body["max"] == 10
    await create(c, "k", "x" * 10)
    problem(await commit(c, "k", 0, "y" * 11), 413, "DeltaTooLarge")
    # bytes, not characters: 6 two-byte characters are 12 bytes
    problem(await commit(c, "k", 0, "é" * 6), 413, "DeltaTooLarge")
    await committed(c, "k", 0, "é" * 5)
    r = await c.post("/commit/multi", json=_multi(("k", 1, "z" * 11)))
    problem(r, 413, "DeltaTooLarge")
    r = await c.post("/admin/shard", json={"key": "k2", "content": "z" * 11})
    problem(r, 413, "DeltaTooLarge")
    shard = await read(c, "k")
    assert (shard["version"], shard["attempt_count"]) == (1, 1)
    assert (await stats(c))["total_shards"] == 1


async def test_rationale_too_large(client: httpx.AsyncClient) -> None:
    """SBUS_MAX_RATIONALE (default 4096 UTF-8 bytes) bounds a commit's rationale, which
    every history entry retains; a refusal leaves everything as it was."""
    await create(client, "k", "c0")
    await committed(client, "k", 0, "c1", rationale="é" * 2048)  # exactly 4096 bytes
    before = await snapshot(client, "k")
    before_history = await history(client, "k")
    for rationale, size in (("x" * 4097, 4097), ("é" * 2049, 4098)):
        body = problem(
            await commit(client, "k", 1, "c2", rationale=rationale), 413, "FieldTooLarge"
        )
        assert (body["field"], body["size"], body["max"]) == ("rationale", size, 4096)
        r = await client.post("/commit/multi", json=_multi(("k", 1, "c2"), rationale=rationale))
        body = problem(r, 413, "FieldTooLarge")
        assert (body["field"], body["size"], body["max"]) == ("rationale", size, 4096)
    assert await snapshot(client, "k") == before
    assert await history(client, "k") == before_history


async def test_goal_tag_too_large(client: httpx.AsyncClient) -> None:
    for path in ("/shard", "/admin/shard"):
        r = await client.post(path, json={"key": "k", "content": "c", "goal_tag": "g" * 4097})
        body = problem(r, 413, "FieldTooLarge")
        assert (body["field"], body["size"], body["max"]) == ("goal_tag", 4097, 4096)
    problem(await client.get("/shard/k"), 404, "ShardNotFound")
    assert (await stats(client))["total_shards"] == 0
    assert (await create(client, "k", "c", goal_tag="é" * 2048))["goal_tag"] == "é" * 2048


async def test_text_caps_are_settings(make_client: AppFactory) -> None:
    """The caps are configurable; a delete's and a rollback's rationale are the bus's
    own words and pass whatever the cap."""
    _, c = await make_client(max_rationale=3, max_goal_tag=2)
    problem(
        await c.post("/shard", json={"key": "k", "content": "c", "goal_tag": "abc"}),
        413,
        "FieldTooLarge",
    )
    await create(c, "k", "c0", goal_tag="ab")
    body = problem(await commit(c, "k", 0, "c1", rationale="abcd"), 413, "FieldTooLarge")
    assert body["max"] == 3
    await committed(c, "k", 0, "c1", rationale="abc")
    r = await c.post("/rollback", json={"key": "k", "target_version": 0, "agent_id": "a"})
    assert ok(r)["version"] == 2
    assert (await delete(c, "k", 2)).status_code == 204
    assert [e["rationale"] for e in await history(c, "k")][:2] == ["delete", "rollback to 0"]
    _, unlimited = await make_client(max_rationale=0, max_goal_tag=0)
    await create(unlimited, "u", "c0", goal_tag="g" * 5000)
    await committed(unlimited, "u", 0, "c1", rationale="r" * 5000)
