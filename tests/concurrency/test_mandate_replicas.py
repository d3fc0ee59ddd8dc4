"""Mandates across replicas (protocol.md §5): two token-mode ``sbus serve`` processes over
one shared store (PostgreSQL, then Redis) behave as one bus for consume-once mandates.

- Of 16 concurrent commits carrying one mandate, each to a different shard and spread
  over both replicas, exactly one succeeds and fifteen get 409 MandateConsumed; exactly
  one shard moves, as both replicas see it, and both count one commit.
- A mandate issued through one replica and redirected through the other (another agent,
  a key outside its patterns, another context) is refused with the exact 403 problem and
  is not consumed: its holder can then use it once.
- An idempotent retry of a mandated commit sent to the other replica replays the first
  answer (Idempotent-Replayed: true) and commits nothing twice.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest

from sbus.core.rights import ALL_RIGHTS, Scope
from sbus.security.keys import KeySet
from sbus.security.tokens import Issuer
from tests import backends
from tests.concurrency.conftest import (
    SHARED_TOPOLOGIES,
    Bus,
    ServerGroup,
    Topology,
    attach_logs,
    expect,
    new_client,
    prepare_store,
    run_threads,
)
from tests.history.client import Recorder

pytestmark = pytest.mark.concurrency

PROBLEM = "application/problem+json"
SECRET = "s-bus-mandate-replicas-test-secret-0123456789"  # > 32 bytes, same on both replicas
NAMESPACE = "sbus"  # the replicas' default SBUS_NAMESPACE
TOKEN_TTL_S = 3600
SHARDS = 16
CONTEXT: dict[str, Any] = {"order": 7, "amount": "12.50"}
THREAD_TIMEOUT_S = 60.0

ISSUER = Issuer(KeySet.from_secret(SECRET), namespace=NAMESPACE, max_ttl=86_400)


def bearer(agent: str, *scopes: Scope) -> dict[str, str]:
    value, _ = ISSUER.issue(agent, scopes, TOKEN_TTL_S)
    return {"Authorization": f"Bearer {value}"}


ROOT = bearer("root", Scope("**", ALL_RIGHTS))
GRANTOR = bearer("G", Scope.of("pay/*", "mandate"))
HOLDER = bearer("A", Scope.of("**", "read", "write", "delete"))
OTHER = bearer("B", Scope.of("**", "read", "write", "delete"))


@dataclass(frozen=True)
class Reply:
    """What one thread saw, kept after its connection closed."""

    key: str
    url: str
    status: int
    content_type: str
    body: dict[str, Any]
    text: str


@pytest.fixture(scope="module", params=SHARED_TOPOLOGIES, ids=str)
def token_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bus]:
    """Two token-mode replicas over one shared store, for the whole module."""
    topology: Topology = request.param
    log_dir = tmp_path_factory.mktemp(f"mandates-{topology}")
    group = ServerGroup(log_dir / "logs")
    env = {
        "SBUS_AUTH": "token",
        "SBUS_SECRET": SECRET,
        "SBUS_ADMIN_ENABLED": "1",
        "SBUS_TEST_HOOKS": "1",
    }
    try:
        store = prepare_store(topology, log_dir)
        servers = group.start_replicas(store, 2, env)
    except BaseException:
        group.stop_all()
        raise
    yield Bus(topology, servers)
    group.fail_on(group.stop_all())


@pytest.fixture
def bus2(request: pytest.FixtureRequest, token_pair: Bus) -> Bus:
    """The pair over a freshly wiped store with pay/1..pay/16 (require_mandate) and
    ``free`` (no policy), created through replica 0."""
    asyncio.run(backends.wipe(token_pair.topology.store))
    attach_logs(request.node, token_pair.servers)
    with new_client(token_pair.url(0)) as c:
        for i in range(1, SHARDS + 1):
            body = {"key": f"pay/{i}", "content": "v0", "policy": {"require_mandate": True}}
            expect(c.post("/shard", json=body, headers=ROOT), [201])
        expect(c.post("/shard", json={"key": "free", "content": "v0"}, headers=ROOT), [201])
    return token_pair


def issue_mandate(url: str) -> dict[str, Any]:
    """G grants A one mandate on pay/* through the replica at ``url``."""
    body = {"holder": "A", "keys": ["pay/*"], "context": CONTEXT, "ttl_s": 600}
    with new_client(url) as c:
        resp = c.post("/mandates", json=body, headers=GRANTOR)
    expect(resp, [201])
    m: dict[str, Any] = resp.json()
    assert isinstance(m["mandate"], str) and m["mandate"], m
    assert isinstance(m["jti"], str) and m["jti"], m
    assert len(m["context_hash"]) == 64, m
    return m


def commit_body(key: str, mandate: str, context: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "key": key,
        "expected_version": 0,
        "delta": "paid",
        "mandate": mandate,
        "context": CONTEXT if context is None else context,
    }


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.request.url, resp.status_code, resp.text)
    assert resp.headers["content-type"].split(";")[0] == PROBLEM, resp.headers
    body: dict[str, Any] = resp.json()
    assert body["error"] == code, body
    assert body["status"] == status, body
    return body


def versions(url: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with new_client(url) as c:
        for key in [f"pay/{i}" for i in range(1, SHARDS + 1)] + ["free"]:
            resp = c.get(f"/shard/{key}", params={"record": "false"}, headers=ROOT)
            expect(resp, [200])
            out[key] = resp.json()["version"]
    return out


def stats(url: str) -> dict[str, Any]:
    with new_client(url) as c:
        resp = c.get("/stats", headers=ROOT)
    expect(resp, [200])
    body: dict[str, Any] = resp.json()
    return body


def test_one_mandate_sixteen_commits_two_replicas(bus2: Bus, recorder: Recorder) -> None:
    m = issue_mandate(bus2.url(0))
    barrier = threading.Barrier(SHARDS, timeout=THREAD_TIMEOUT_S)
    replies: list[Reply] = []
    lock = threading.Lock()

    def agent(i: int) -> None:
        key = f"pay/{i + 1}"
        url = bus2.url(i)
        with new_client(url) as c:
            c.get("/stats", headers=HOLDER)  # open the connection before the race
            barrier.wait()
            resp = c.post("/commit/v2", json=commit_body(key, m["mandate"]), headers=HOLDER)
        expect(resp, [200, 409])
        reply = Reply(
            key, url, resp.status_code, resp.headers.get("content-type", ""), resp.json(), resp.text
        )
        with lock:
            replies.append(reply)

    run_threads(
        [partial(agent, i) for i in range(SHARDS)],
        timeout=THREAD_TIMEOUT_S,
        on_error=barrier.abort,
    )

    assert len(replies) == SHARDS
    statuses = sorted(r.status for r in replies)
    assert statuses == [200] + [409] * (SHARDS - 1), sorted(
        (r.status, r.key, r.url, r.body.get("error"), r.body.get("new_version")) for r in replies
    )
    (winner,) = [r for r in replies if r.status == 200]
    assert winner.body["new_version"] == 1, winner.text
    for r in replies:
        if r.status == 409:
            assert r.content_type.split(";")[0] == PROBLEM, (r.key, r.content_type)
            assert r.body["error"] == "MandateConsumed", (r.key, r.url, r.text)
            assert r.body["status"] == 409, r.text
            assert r.body["jti"] == m["jti"], r.text
    # the losers were spread over both replicas
    assert {r.url for r in replies if r.status == 409} == set(bus2.urls)

    expected = {f"pay/{i}": 0 for i in range(1, SHARDS + 1)} | {"free": 0, winner.key: 1}
    for url in bus2.urls:
        assert versions(url) == expected, url
        s = stats(url)
        assert s["total_commits"] == 1, (url, s)
    # The recorded history carries the mandate on all sixteen commits (MandateConsumeOnce
    # is checked on it at teardown, and here on the counts).
    carried = [op for op in recorder.history.ops if op.mandate == m["jti"]]
    assert sorted(op.result for op in carried) == ["fail"] * (SHARDS - 1) + ["ok"]


@pytest.mark.parametrize("issued_via", [0, 1])
def test_redirected_mandate_refused_on_the_other_replica(bus2: Bus, issued_via: int) -> None:
    m = issue_mandate(bus2.url(issued_via))
    other = bus2.url(issued_via + 1)
    cases: list[tuple[dict[str, str], dict[str, Any], str]] = [
        (OTHER, commit_body("pay/1", m["mandate"]), "MandateHolderMismatch"),
        (HOLDER, commit_body("free", m["mandate"]), "MandateScopeMismatch"),
        (
            HOLDER,
            commit_body("pay/1", m["mandate"], {"order": 8, "amount": "12.50"}),
            "MandateContextMismatch",
        ),
    ]
    with new_client(other) as c:
        for headers, body, code in cases:
            assert_problem(c.post("/commit/v2", json=body, headers=headers), 403, code)
    zero = {f"pay/{i}": 0 for i in range(1, SHARDS + 1)} | {"free": 0}
    for url in bus2.urls:
        assert versions(url) == zero, url
        assert stats(url)["total_commits"] == 0, url

    # none of the refusals consumed it: A uses it once (through the other replica) ...
    with new_client(other) as c:
        resp = c.post("/commit/v2", json=commit_body("pay/1", m["mandate"]), headers=HOLDER)
    expect(resp, [200])
    assert resp.json()["new_version"] == 1
    # ... and only once (through the issuing replica)
    with new_client(bus2.url(issued_via)) as c:
        again = c.post("/commit/v2", json=commit_body("pay/2", m["mandate"]), headers=HOLDER)
    assert assert_problem(again, 409, "MandateConsumed")["jti"] == m["jti"]
    for url in bus2.urls:
        assert versions(url) == zero | {"pay/1": 1}, url
        assert stats(url)["total_commits"] == 1, url


def test_idempotent_retry_on_the_other_replica_replays(bus2: Bus) -> None:
    m = issue_mandate(bus2.url(0))
    headers = {**HOLDER, "Idempotency-Key": "pay-1-attempt"}
    body = commit_body("pay/1", m["mandate"])
    with new_client(bus2.url(0)) as c:
        first = c.post("/commit/v2", json=body, headers=headers)
    expect(first, [200])
    assert first.json()["new_version"] == 1
    assert first.headers.get("idempotent-replayed", "false") != "true", first.headers

    with new_client(bus2.url(1)) as c:
        again = c.post("/commit/v2", json=body, headers=headers)
    expect(again, [200])
    assert again.headers.get("idempotent-replayed") == "true", again.headers
    assert again.json() == first.json()
    assert again.content == first.content

    # the mandate stays consumed: a fresh commit with it (no idempotency key) is refused
    with new_client(bus2.url(1)) as c:
        other = c.post("/commit/v2", json=commit_body("pay/2", m["mandate"]), headers=HOLDER)
    assert assert_problem(other, 409, "MandateConsumed")["jti"] == m["jti"]

    zero = {f"pay/{i}": 0 for i in range(1, SHARDS + 1)} | {"free": 0}
    for url in bus2.urls:
        assert versions(url) == zero | {"pay/1": 1}, url
        assert stats(url)["total_commits"] == 1, url
    with new_client(bus2.url(1)) as c:
        hist = c.get("/history/pay/1", headers=ROOT)
    expect(hist, [200])
    entries: list[dict[str, Any]] = hist.json()["entries"]
    assert [e["version"] for e in entries if e["version"] >= 1] == [1], entries
