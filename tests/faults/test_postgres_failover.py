"""PostgreSQL failover (docs/operations.md section 7): two ``sbus serve`` replicas on a
multi-host store URL over a primary and its synchronous standby. SDK clients commit under
load with Idempotency-Keys; the primary crashes (``pg_ctl stop -m immediate``) and the
standby is promoted. Every commit a client saw acknowledged is on the new primary, none
is applied twice, the replicas reconnect by themselves and answer commits again, and
``/admin/health`` is 200 again.

And the URL itself: a standby named first is passed over for the primary
(``target_session_attrs=read-write``), by ``sbus migrate`` and by the store, and a URL that
lets the bus onto a standby gets 503 ``not_applied`` for every write, never a commit.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings
from sbus.storage.sql import postgres as postgres_store
from sbus.storage.sql.postgres import PostgresStore
from sbus_client import Bus, TransportRetry, VersionMismatch
from tests.api.helpers import running_app
from tests.concurrency.conftest import LOOPBACK, free_port, new_client, sbus_executable, server_env
from tests.faults.conftest import (
    HOT_KEYS,
    REQUEST_TIMEOUT_S,
    Buses,
    Postgres,
    history,
    problem_of_503,
    seed_shards,
    wait_healthy,
)
from tests.faults.pgpair import (
    Pair,
    aexecute,
    afetch,
    direct_url,
    fetch,
    multi_host_url,
    postgres_root,
    promote,
    rejoin,
    start_pair,
)
from tests.history.client import Recorder

pytestmark = pytest.mark.faults

ONE_WORKER = {"SBUS_WORKERS": "1"}
# Bounds that stop a broken run; a healthy one passes each long before (no speed is
# asserted).
PHASE_TIMEOUT_S = 30.0
SETTLE_S = 45.0  # the SDK keeps resending one request this long at most


@pytest.fixture
def pair(service_root: Path, postgres: Postgres) -> Iterator[Pair]:
    """A started primary (the ``postgres`` fixture, stopped by it) and its synchronous
    standby, not migrated."""
    started = start_pair(service_root, postgres)
    try:
        yield started
    finally:
        started.standby.stop()


def sbus_migrate(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sbus_executable(), "migrate", "--store", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=server_env(),
        check=False,
    )


# --- the SDK load --------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """A commit the client saw acknowledged (200, fresh or replayed)."""

    key: str
    version: int
    content: str
    commit_id: str
    started: float
    acked: float


@dataclass
class SdkLoad:
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acks: list[Ack] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # 409: (key, content)
    failures: list[str] = field(default_factory=list)
    tally: Counter[str] = field(default_factory=Counter)

    def note(self, what: str) -> None:
        with self.lock:
            self.tally[what] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def acked_since(self, moment: float) -> list[Ack]:
        """Acknowledged commits first sent after ``moment``."""
        with self.lock:
            return [a for a in self.acks if a.started > moment]


class CountingTransport(httpx.HTTPTransport):
    """Counts sends that got no answer (the SDK resends them with the same key)."""

    def __init__(self, load: SdkLoad) -> None:
        super().__init__()
        self.load = load

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.TransportError:
            self.load.note(f"no answer:{request.method}")
            raise


def sdk_client(load: SdkLoad, recorder: Recorder) -> httpx.Client:
    """The agent's HTTP client: counts 503s by outcome and unanswered sends, and records
    every request into the test's history for the isolation checker."""

    def on_response(resp: httpx.Response) -> None:
        if resp.status_code != 503:
            return
        resp.read()
        problem = problem_of_503(resp)
        if problem is not None:
            load.fail(problem)
        kind = "commit" if resp.request.method == "POST" else "read"
        load.note(f"503:{kind}:{resp.json().get('outcome')}")

    client = httpx.Client(
        timeout=REQUEST_TIMEOUT_S,
        trust_env=False,
        transport=CountingTransport(load),
        event_hooks={"request": [], "response": [on_response]},
    )
    return recorder.attach(client)


def sdk_agent(load: SdkLoad, recorder: Recorder, url: str, index: int) -> None:
    """Read a hot key, commit a unique content at its version; until told to stop."""
    name = f"agent-{index}"
    rng = random.Random(index)
    retry = TransportRetry(attempts=100_000, base=0.02, cap=0.5, max_elapsed=SETTLE_S)
    with (
        sdk_client(load, recorder) as http,
        Bus(url, agent_id=name, http_client=http, retry=retry) as bus,
    ):
        # One session per key: a commit records its key in its session, which a commit
        # of another key in the same session would then check (CrossShardStale).
        sessions = {key: bus.session(session_id=f"{name}+{key}", keep=True) for key in HOT_KEYS}
        seq = 0
        while not load.stop.is_set():
            key = rng.choice(HOT_KEYS)
            content = f"{name}:{seq}"
            seq += 1
            started = time.monotonic()
            try:
                version = sessions[key].read(key, record=False).version
                done = sessions[key].commit(key, content, expected=version)
            except VersionMismatch:
                with load.lock:
                    load.refused.append((key, content))
                continue
            except Exception as exc:  # noqa: BLE001 - any other end is a failure
                load.fail(f"{name} {key} {content}: {type(exc).__name__}: {exc}")
                return
            with load.lock:
                load.acks.append(
                    Ack(key, done.version, content, done.commit_id, started, time.monotonic())
                )


def wait_for(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {PHASE_TIMEOUT_S}s: {what}", pytrace=False)
        time.sleep(0.02)


def verify_acks(base_url: str, load: SdkLoad) -> list[str]:
    """Every acknowledged commit is in the history at its version with its content and
    commit id; nothing else is (no refused or unanswered commit applied, none applied
    twice); each key's current version is its last acknowledged one."""
    problems: list[str] = []
    with new_client(base_url) as client:
        for key in HOT_KEYS:
            resp = client.get(f"/shard/{key}", params={"record": "false"})
            assert resp.status_code == 200, resp.text
            current = resp.json()
            entries = history(client, key)
            acks = sorted((a for a in load.acks if a.key == key), key=lambda a: a.version)
            if [a.version for a in acks] != list(range(1, current["version"] + 1)):
                problems.append(
                    f"{key}: at version {current['version']}, acknowledged versions "
                    f"{[a.version for a in acks][:20]}..."
                )
            for ack in acks:
                entry = entries.get(ack.version)
                if entry is None or (entry["content"], entry["commit_id"]) != (
                    ack.content,
                    ack.commit_id,
                ):
                    problems.append(f"{key} v{ack.version}: acknowledged {ack}, history {entry}")
            applied = Counter(e["content"] for v, e in entries.items() if v > 0)
            twice = [c for c, n in applied.items() if n > 1]
            if twice:
                problems.append(f"{key}: applied twice: {twice}")
            refused = {c for k, c in load.refused if k == key} & set(applied)
            if refused:
                problems.append(f"{key}: refused (409) but applied: {sorted(refused)}")
            if acks and current["content"] != acks[-1].content:
                problems.append(f"{key}: content {current['content']!r}, last ack {acks[-1]}")
    return problems


# --- the tests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Failover:
    crashed: float  # the old primary killed
    promoted: float  # pg_ctl promote returned


def failover_under_load(
    buses: Buses, pair: Pair, recorder: Recorder, *, rounds: int, agents: int, phase: int
) -> None:
    """Two replicas on ``pair``'s URL, ``agents`` SDK agents spread over them; ``rounds``
    times: ``phase`` commits acknowledged, the primary crashed, the standby promoted,
    ``phase`` commits sent after the promotion acknowledged, and (between rounds) the old
    primary rebuilt as the new one's synchronous standby. Then every check."""
    done = sbus_migrate(pair.url)
    assert done.returncode == 0, done.stderr
    replicas = buses.start(pair.url, ONE_WORKER, count=2)
    seed_shards(replicas[0].base_url)
    load = SdkLoad()
    threads = [
        threading.Thread(
            target=sdk_agent, args=(load, recorder, replicas[i % 2].base_url, i), daemon=True
        )
        for i in range(agents)
    ]
    for thread in threads:
        thread.start()
    primary, standby = pair.primary, pair.standby
    failovers: list[Failover] = []
    try:
        wait_for(f"{phase} commits before the first crash", lambda: len(load.acks) >= phase)
        for round_ in range(rounds):
            if round_:
                standby = rejoin(standby, primary)  # the crashed one, as a standby
            crashed = time.monotonic()
            primary.stop()  # pg_ctl stop -m immediate: a crash, no checkpoint
            promote(standby)
            promoted = time.monotonic()
            failovers.append(Failover(crashed, promoted))
            primary, standby = standby, primary

            def enough(since: float = promoted) -> bool:
                return len(load.acked_since(since)) >= phase

            wait_for(f"{phase} commits sent after promotion {round_ + 1}", enough)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(SETTLE_S + REQUEST_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "an agent never got an answer"
    assert load.failures == []
    for replica in replicas:
        wait_healthy(replica.base_url, PHASE_TIMEOUT_S)
        assert replica.alive(), "a replica must reconnect without a restart"
    assert verify_acks(replicas[1].base_url, load) == []
    # The last promoted standby is the primary the bus writes to.
    assert fetch(primary, "SELECT pg_is_in_recovery() AS r")[0]["r"] is False
    assert sum(n for k, n in load.tally.items() if k.startswith(("503:", "no answer"))) > 0, (
        "the crashes never reached the clients: the fault did not happen"
    )
    report = []
    for n, failover in enumerate(failovers):
        after = [a.acked for a in load.acks if a.acked > failover.promoted]
        report.append(
            f"#{n + 1}: promoted {failover.promoted - failover.crashed:.2f} s after the crash, "
            f"first commit acknowledged {min(after) - failover.promoted:.2f} s after that"
        )
    before = sum(1 for a in load.acks if a.acked < failovers[0].crashed)
    print(
        f"\nPostgreSQL failover x{rounds}: {len(load.acks)} acknowledged commits ({before} "
        f"before the first crash, {len(load.acked_since(failovers[-1].promoted))} sent after "
        f"the last promotion), {len(load.refused)} refused (409); 503s and unanswered sends "
        f"{dict(sorted(load.tally.items()))}; {'; '.join(report)}; "
        f"bus tracebacks {buses.tracebacks()}"
    )


def test_failover_under_load_loses_no_acknowledged_commit(
    buses: Buses, pair: Pair, recorder: Recorder
) -> None:
    failover_under_load(buses, pair, recorder, rounds=1, agents=4, phase=20)


@pytest.mark.slow
def test_failover_soak(buses: Buses, pair: Pair, recorder: Recorder) -> None:
    """Four failovers back and forth, the old primary rebuilt as the new one's
    synchronous standby each time, under a heavier load."""
    failover_under_load(buses, pair, recorder, rounds=4, agents=8, phase=150)


async def test_standby_named_first_is_passed_over(pair: Pair) -> None:
    """The standby first in the URL: ``sbus migrate`` and the store both reach the
    primary, and the standby serves no client of the bus; with the primary fenced too,
    no host takes writes and every write is 503 ``not_applied`` until it is lifted. Then
    a URL naming the standby alone (several hosts with ``target_session_attrs=any`` are
    refused at start, sql.pgurl): the server refuses its writes (25006), so the bus never
    becomes ready, says why, and applies nothing."""
    url = multi_host_url(pair.standby, pair.primary)
    done = sbus_migrate(url)
    assert done.returncode == 0, done.stderr
    async with running_app(store=url) as (_, client):
        resp = await client.post("/shard", json={"key": "k", "content": ""})
        assert resp.status_code == 201, resp.text
        for version in range(5):
            body = {"key": "k", "expected_version": version, "delta": f"v{version + 1}"}
            resp = await client.post("/commit", json={**body, "agent_id": "a"})
            assert resp.status_code == 200, resp.text
        standby_clients = await afetch(
            pair.standby,
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        assert standby_clients[0]["n"] == 0
        # The primary fenced read-only too: no host takes writes. The write that meets the
        # fence, and every one until it is lifted, is 503 not_applied; then commits again.
        await aexecute(pair.primary, "ALTER SYSTEM SET default_transaction_read_only = on")
        await aexecute(pair.primary, "SELECT pg_reload_conf()")
        body = {"key": "k", "expected_version": 5, "delta": "v6", "agent_id": "a"}
        details = []
        for _ in range(3):
            resp = await client.post("/commit", json=body)
            assert resp.status_code == 503, resp.text
            problem = resp.json()
            assert (problem["error"], problem["outcome"]) == ("StoreUnavailable", "not_applied")
            details.append(problem["detail"])
        assert "no PostgreSQL host accepts writes" in details[-1], details
        await aexecute(pair.primary, "ALTER SYSTEM RESET default_transaction_read_only")
        await aexecute(pair.primary, "SELECT pg_reload_conf()")
        for _ in range(100):
            resp = await client.post("/commit", json=body)
            if resp.status_code != 503:
                break
            await asyncio.sleep(0.02)
        assert resp.status_code == 200, resp.text
    rows = await afetch(pair.primary, "SELECT version, content FROM sbus_shards WHERE key = 'k'")
    assert [(r["version"], r["content"]) for r in rows] == [(6, "v6")]

    # Start-up writes too (the store's signing secret): on the standby the bus never
    # becomes ready, and names why.
    app = create_app(Settings(store=multi_host_url(pair.standby, attrs=None)))
    async with LifespanManager(app) as manager:
        runtime = runtime_of(app)
        for _ in range(1000):
            if "read-only" in (runtime.not_ready_reason or ""):
                break
            await asyncio.sleep(0.01)
        assert "read-only" in (runtime.not_ready_reason or ""), runtime.not_ready_reason
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            resp = await client.get("/admin/health")
            assert resp.status_code == 503, resp.text
            assert "read-only" in resp.json()["reason"]
            body = {"key": "k", "expected_version": 6, "delta": "on the standby"}
            resp = await client.post("/commit", json={**body, "agent_id": "a"})
            assert resp.status_code == 503, resp.text
            problem = resp.json()
            assert (problem["error"], problem["outcome"]) == ("StoreUnavailable", "not_applied")
    rows = await afetch(pair.primary, "SELECT version, content FROM sbus_shards WHERE key = 'k'")
    assert [(r["version"], r["content"]) for r in rows] == [(6, "v6")]


async def test_fenced_primary_is_left_for_the_next_host(
    service_root: Path, postgres: Postgres
) -> None:
    """A primary fenced read-only under a running bus (``default_transaction_read_only``,
    as a failover manager may do to an old primary it cannot stop): the write that meets
    it is 503 ``not_applied``, and the bus drops its connections there, so the next
    requests connect again and land on the next host of the URL that takes writes.
    Two independent servers stand for the old and the new primary."""
    old = postgres
    new = Postgres(old.bindir, postgres_root(service_root, "new"), free_port())
    try:
        for server in (old, new):
            server.start()
            await PostgresStore(direct_url(server)).migrate()
        async with running_app(store=multi_host_url(old, new)) as (_, client):
            resp = await client.post("/shard", json={"key": "k", "content": ""})
            assert resp.status_code == 201, resp.text
            await aexecute(old, "ALTER SYSTEM SET default_transaction_read_only = on")
            await aexecute(old, "SELECT pg_reload_conf()")
            body = {"key": "k", "expected_version": 0, "delta": "fenced", "agent_id": "a"}
            statuses = []
            for _ in range(50):
                resp = await client.post("/commit", json=body)
                statuses.append(resp.status_code)
                if resp.status_code != 503:
                    break
                problem = resp.json()
                assert (problem["outcome"], "read-only" in problem["detail"]) == (
                    "not_applied",
                    True,
                ), problem
                await asyncio.sleep(0.05)
            # The new primary has no shard k: the bus reached it, and only it.
            assert statuses[-1] == 404, statuses
            assert 503 in statuses
            resp = await client.post("/shard", json={"key": "after", "content": "x"})
            assert resp.status_code == 201, resp.text
        sql = "SELECT key, version, content FROM sbus_shards ORDER BY key"
        assert [tuple(r) for r in await afetch(old, sql)] == [("k", 0, "")]
        assert [tuple(r) for r in await afetch(new, sql)] == [("after", 0, "x")]
    finally:
        new.stop()


@pytest.fixture
def hanging_host() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never answers: a PostgreSQL
    host that hangs (frozen, or its machine half gone) rather than refusing."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(64)
        port: int = sock.getsockname()[1]
        yield port


async def test_a_hanging_host_is_passed_over(
    running_postgres: Postgres, hanging_host: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that hangs, named first: the connection that tries it gives up after the
    connect timeout, and the next starts at the next host, so the bus becomes ready and
    commits (with asyncpg's order alone every connection would wait on the hanging host,
    and the bus would never be ready)."""
    monkeypatch.setattr(postgres_store, "CONNECT_TIMEOUT_S", 0.5)
    url = (
        f"postgresql+asyncpg://postgres@{LOOPBACK}:{hanging_host},"
        f"{LOOPBACK}:{running_postgres.port}/postgres"
    )
    async with running_app(store=url) as (_, client):
        resp = await client.post("/shard", json={"key": "k", "content": ""})
        assert resp.status_code == 201, resp.text
        body = {"key": "k", "expected_version": 0, "delta": "v1", "agent_id": "a"}
        resp = await client.post("/commit", json=body)
        assert resp.status_code == 200, resp.text
