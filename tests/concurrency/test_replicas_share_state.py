"""Two bus processes over one shared store behave as one bus (protocol.md §7).

Nothing that matters may live in a bus process, so for each shared store (postgres-2,
redis-2) two ``sbus serve --workers 1`` replicas A and B are started once per module and
the store is wiped before each test. Each test records state through one replica and
observes its effect through the other:

- a DeliveryLog entry recorded via A makes a commit via B fail with CrossShardStale;
- the counters in /stats, /metrics and /admin/health are identical on A and B;
- ORI turned off on A is off for B, and turned back on via B is on for A;
- an idempotent retry sent to B replays A's result byte-identically and commits nothing
  twice, including when the same request races through both replicas at once;
- POST /session on B empties the session A recorded (and only that session);
- advance-clock on A moves the store clock, so B finds the session expired (410 ttl).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import pytest

from sbus import __version__
from tests import backends
from tests.concurrency.conftest import (
    SHARED_TOPOLOGIES,
    Bus,
    ServerGroup,
    Topology,
    assert_replicas_agree,
    attach_logs,
    create_shard,
    expect,
    new_client,
    prepare_store,
    run_threads,
)

pytestmark = pytest.mark.concurrency

PROBLEM = "application/problem+json"
TTL_S = 600  # the replicas' SBUS_SESSION_TTL; only advance-clock ever reaches it
STORE_METRICS = ("sbus_commits_total", "sbus_conflicts_total", "sbus_cross_stale_total")
RACE_ROUNDS = 10
RACERS_PER_REPLICA = 2


@pytest.fixture(scope="module", params=SHARED_TOPOLOGIES, ids=str)
def replica_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bus]:
    """Replicas A and B over one shared store, for the whole module."""
    topology: Topology = request.param
    log_dir = tmp_path_factory.mktemp(f"replicas-{topology}")
    group = ServerGroup(log_dir / "logs")
    try:
        store = prepare_store(topology, log_dir)
        servers = group.start_replicas(store, 2, {"SBUS_SESSION_TTL": str(TTL_S)})
    except BaseException:
        group.stop_all()
        raise
    yield Bus(topology, servers)
    group.fail_on(group.stop_all())


@pytest.fixture
def pair(request: pytest.FixtureRequest, replica_pair: Bus) -> Iterator[tuple[httpx.Client, ...]]:
    """Clients of A and B over a freshly wiped store (the replicas keep running: what
    they hold in memory must not matter)."""
    asyncio.run(backends.wipe(replica_pair.topology.store))
    attach_logs(request.node, replica_pair.servers)
    with new_client(replica_pair.url(0)) as a, new_client(replica_pair.url(1)) as b:
        yield a, b


# --- helpers ------------------------------------------------------------------------------


def ok(resp: httpx.Response, status: int = 200) -> dict[str, Any]:
    expect(resp, [status])
    body: dict[str, Any] = resp.json()
    return body


def problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    expect(resp, [status])
    assert resp.headers["content-type"].split(";")[0] == PROBLEM, resp.headers
    body: dict[str, Any] = resp.json()
    assert (body["error"], body["status"]) == (code, status), body
    return body


def read(client: httpx.Client, key: str, agent: str, session: str = "") -> int:
    resp = client.get(f"/shard/{key}", params={"agent_id": agent, "session_id": session})
    version: int = ok(resp)["version"]
    return version


def peek(client: httpx.Client, key: str) -> dict[str, Any]:
    """The shard without recording a read."""
    return ok(client.get(f"/shard/{key}", params={"record": "false"}))


def commit(
    client: httpx.Client,
    key: str,
    expected: int,
    delta: str,
    agent: str,
    session: str = "",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body = {
        "key": key,
        "expected_version": expected,
        "delta": delta,
        "agent_id": agent,
        "session_id": session,
    }
    return client.post("/commit/v2", json=body, headers=headers)


def committed(
    client: httpx.Client, key: str, expected: int, delta: str, agent: str, session: str = ""
) -> None:
    body = ok(commit(client, key, expected, delta, agent, session))
    assert body["new_version"] == expected + 1, body


def dl_sessions(client: httpx.Client) -> dict[str, dict[str, dict[str, int]]]:
    """agent -> session -> key -> version served, from /admin/delivery-log."""
    body = ok(client.get("/admin/delivery-log"))
    return {
        agent: {
            session: {key: entry["version"] for key, entry in entries.items()}
            for session, entries in by_session.items()
        }
        for agent, by_session in body["sessions"].items()
    }


def stale(resp: httpx.Response, key: str, at_read: int, current: int) -> None:
    body = problem(resp, 409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == (
        key,
        at_read,
        current,
    ), body
    assert body["stale_keys"] == [
        {"key": key, "version_at_read": at_read, "current_version": current}
    ], body


def store_metrics(client: httpx.Client) -> dict[str, float]:
    resp = client.get("/metrics")
    expect(resp, [200])
    found = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(sbus_\w+_total) (\S+)$", resp.text, re.MULTILINE)
    }
    return {name: found[name] for name in (*STORE_METRICS, "sbus_shards_total")}


def both_stats(pair: tuple[httpx.Client, ...]) -> dict[str, Any]:
    a, b = pair
    stats_a, stats_b = ok(a.get("/stats")), ok(b.get("/stats"))
    assert stats_a == stats_b, f"A {stats_a} != B {stats_b}"
    return stats_a


# --- the tests ----------------------------------------------------------------------------


def test_delivery_log_recorded_on_a_guards_commit_on_b(pair: tuple[httpx.Client, ...]) -> None:
    a, b = pair
    assert create_shard(a, "dl/read", "r0") == 0
    assert create_shard(b, "dl/write", "w0") == 0
    assert read(a, "dl/read", "x") == 0
    assert dl_sessions(b) == {"x": {"": {"dl/read": 0}}}
    committed(b, "dl/read", 0, "r1", "y")

    # x's read was recorded by A only; B must find it and refuse.
    stale(commit(b, "dl/write", 0, "w1", "x"), "dl/read", 0, 1)
    for client in pair:
        shard = peek(client, "dl/write")
        assert (shard["version"], shard["content"], shard["attempt_count"]) == (0, "w0", 0)

    # And the other way round: a re-read on B makes x's commit on A current.
    assert read(b, "dl/read", "x") == 1
    assert dl_sessions(a) == {"x": {"": {"dl/read": 1}}, "y": {"": {"dl/read": 1}}}
    committed(a, "dl/write", 0, "w1", "x")
    assert both_stats(pair)["cross_shard_stale"] == 1


def test_counters_are_identical_on_both_replicas(pair: tuple[httpx.Client, ...]) -> None:
    a, b = pair
    assert create_shard(a, "a") == 0
    assert create_shard(b, "b") == 0
    assert create_shard(a, "c") == 0
    assert read(a, "a", "x") == 0
    committed(b, "b", 0, "b1", "x")  # checked {a@0}: current
    committed(a, "a", 0, "a1", "y")  # y read nothing: unchecked
    stale(commit(b, "c", 0, "c1", "x"), "a", 0, 1)  # checked {a@0, b@1}: divergent
    body = problem(commit(b, "a", 0, "a2", "y"), 409, "VersionMismatch")
    assert (body["key"], body["expected"], body["found"]) == ("a", 0, 1), body

    stats = both_stats(pair)
    assert {k: v for k, v in stats.items() if k not in ("backend", "wal_enabled")} == {
        "total_shards": 3,
        "total_commits": 2,
        "total_conflicts": 1,
        "cross_shard_stale": 1,
        "view_divergent_commits": 1,
        "view_checked_commits": 2,
        "view_divergence_rate": 0.5,
        "ori_enabled": True,
        "total_attempts": 3,
        "scr": pytest.approx(1 / 3),
        # x: a (read), b (its own write); y: a (its own write)
        "delivery_log": {"agents": 2, "deliveries": 3},
    }
    metrics = [store_metrics(client) for client in pair]
    assert (
        metrics[0]
        == metrics[1]
        == {
            "sbus_commits_total": 2,
            "sbus_conflicts_total": 1,
            "sbus_cross_stale_total": 1,
            "sbus_shards_total": 3,
        }
    )
    health = [ok(client.get("/admin/health")) for client in pair]
    assert (
        health[0]
        == health[1]
        == {
            "status": "ok",
            "version": __version__,
            "total_shards": 3,
            "total_commits": 2,
            "total_conflicts": 1,
            "delivery_agents": 2,
        }
    )


def test_ori_flag_is_shared(pair: tuple[httpx.Client, ...]) -> None:
    a, b = pair
    assert ok(b.get("/admin/config"))["ori_enabled"] is True
    body = ok(a.post("/admin/config", json={"ori_enabled": False}))
    assert (body["ok"], body["ori_enabled"]) == (True, False)
    for client in pair:
        assert ok(client.get("/admin/config"))["ori_enabled"] is False
    assert both_stats(pair)["ori_enabled"] is False

    assert create_shard(a, "o") == 0
    assert create_shard(a, "w") == 0
    assert read(b, "o", "x") == 0
    committed(a, "o", 0, "o1", "y")
    # ORI off (set on A) admits on B the commit it would refuse; the divergence is counted.
    committed(b, "w", 0, "w1", "x")
    stats = both_stats(pair)
    assert (stats["view_checked_commits"], stats["view_divergent_commits"]) == (1, 1)
    assert (stats["cross_shard_stale"], stats["total_commits"]) == (0, 2)

    assert ok(b.post("/admin/config", json={"ori_enabled": True}))["ori_enabled"] is True
    for client in pair:
        assert ok(client.get("/admin/config"))["ori_enabled"] is True
    # x still holds o@0 (its own write refreshed only w): stale again, now refused on A.
    stale(commit(a, "w", 1, "w2", "x"), "o", 0, 1)
    stats = both_stats(pair)
    assert (stats["view_checked_commits"], stats["view_divergent_commits"]) == (2, 2)
    assert (stats["cross_shard_stale"], stats["total_commits"], stats["ori_enabled"]) == (
        1,
        2,
        True,
    )


def test_idempotent_retry_on_b_replays_a(pair: tuple[httpx.Client, ...]) -> None:
    a, b = pair
    assert create_shard(a, "k", "k0") == 0
    key = {"Idempotency-Key": "retry-1"}
    first = commit(a, "k", 0, "k1", "x", headers=key)
    body = ok(first)
    assert body["new_version"] == 1
    assert "idempotent-replayed" not in first.headers

    again = commit(b, "k", 0, "k1", "x", headers=key)
    expect(again, [first.status_code])
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["etag"] == first.headers["etag"] == '"1"'
    # Same key, another body: refused on B, whichever replica recorded the key.
    problem(commit(b, "k", 0, "other", "x", headers=key), 422, "IdempotencyKeyReused")

    for client in pair:
        shard = peek(client, "k")
        assert (shard["version"], shard["content"], shard["attempt_count"]) == (1, "k1", 1)
        entries = ok(client.get("/history/k"))["entries"]
        assert [(e["version"], e["commit_id"]) for e in entries] == [
            (1, body["commit_id"]),
            (0, entries[-1]["commit_id"]),
        ]
    stats = both_stats(pair)
    assert (stats["total_commits"], stats["total_conflicts"]) == (1, 0)


def test_idempotent_request_racing_through_both_replicas_commits_once(
    pair: tuple[httpx.Client, ...], replica_pair: Bus
) -> None:
    """RACE_ROUNDS rounds; in each, the same commit with one Idempotency-Key is sent by
    RACERS_PER_REPLICA threads to each replica at once. The store serializes them: one
    commits, every other one replays its answer byte for byte."""
    a, _ = pair
    assert create_shard(a, "race", "r0") == 0
    racers = RACERS_PER_REPLICA * replica_pair.replicas
    start_line = threading.Barrier(racers, timeout=30)
    answers: list[list[httpx.Response | None]] = [[None] * racers for _ in range(RACE_ROUNDS)]

    def racer(slot: int) -> None:
        with new_client(replica_pair.url(slot)) as client:
            for rnd in range(RACE_ROUNDS):
                start_line.wait()
                headers = {"Idempotency-Key": f"race-{rnd}"}
                answers[rnd][slot] = commit(client, "race", rnd, f"r{rnd + 1}", "x", "", headers)

    run_threads(
        [partial(racer, slot) for slot in range(racers)],
        timeout=60,
        on_error=start_line.abort,
    )
    commit_ids = []
    for rnd, row in enumerate(answers):
        responses = [r for r in row if r is not None]
        assert len(responses) == racers, rnd
        for resp in responses:
            expect(resp, [200])
        originals = [r for r in responses if "idempotent-replayed" not in r.headers]
        assert len(originals) == 1, (rnd, [dict(r.headers) for r in responses])
        for resp in responses:
            assert resp.content == originals[0].content, rnd
            if resp is not originals[0]:
                assert resp.headers["idempotent-replayed"] == "true", rnd
        body = originals[0].json()
        assert body["new_version"] == rnd + 1, (rnd, body)
        commit_ids.append(body["commit_id"])

    for client in pair:
        shard = peek(client, "race")
        assert (shard["version"], shard["attempt_count"]) == (RACE_ROUNDS, RACE_ROUNDS)
        entries = ok(client.get("/history/race"))["entries"]
        assert [(e["version"], e["commit_id"]) for e in entries[:-1]] == [
            (v, commit_ids[v - 1]) for v in range(RACE_ROUNDS, 0, -1)
        ]
    stats = assert_replicas_agree(replica_pair)
    assert (stats["total_commits"], stats["total_conflicts"]) == (RACE_ROUNDS, 0)


def test_session_reset_on_b_clears_what_a_recorded(pair: tuple[httpx.Client, ...]) -> None:
    a, b = pair
    assert create_shard(a, "o") == 0
    assert create_shard(a, "w") == 0
    assert read(a, "o", "x", "task") == 0
    assert read(b, "o", "x") == 0  # another session of x, which the reset must keep
    committed(a, "o", 0, "o1", "y")
    stale(commit(b, "w", 0, "w1", "x", "task"), "o", 0, 1)

    assert ok(b.post("/session", json={"agent_id": "x", "session_id": "task"})) == {
        "agent_id": "x",
        "status": "created",
    }
    for client in pair:
        assert dl_sessions(client)["x"] == {"": {"o": 0}}
    committed(a, "w", 0, "w1", "x", "task")
    # The untouched session "" still holds o@0.
    stale(commit(a, "w", 1, "w2", "x"), "o", 0, 1)
    stats = both_stats(pair)
    assert (stats["total_commits"], stats["cross_shard_stale"]) == (2, 2)


def test_advance_clock_on_a_expires_session_for_b(pair: tuple[httpx.Client, ...]) -> None:
    a, b = pair
    assert create_shard(b, "o") == 0
    assert create_shard(b, "w") == 0
    assert read(b, "o", "x") == 0

    body = ok(a.post("/admin/test/advance-clock", json={"ms": TTL_S * 1000 + 1}))
    assert body["offset_ms"] == TTL_S * 1000 + 1
    # The offset lives in the store: B reports it too.
    assert ok(b.post("/admin/test/advance-clock", json={"ms": 0}))["offset_ms"] == (
        TTL_S * 1000 + 1
    )

    body = problem(commit(b, "w", 0, "w1", "x"), 410, "SessionExpired")
    assert body["reason"] == "ttl", body
    for client in pair:
        shard = peek(client, "w")
        assert (shard["version"], shard["attempt_count"]) == (0, 0)
    # A GET on an expired session starts it afresh, on either replica.
    assert read(a, "o", "x") == 0
    committed(b, "w", 0, "w1", "x")
    stats = both_stats(pair)
    assert (stats["total_commits"], stats["total_conflicts"], stats["cross_shard_stale"]) == (
        1,
        0,
        0,
    )
