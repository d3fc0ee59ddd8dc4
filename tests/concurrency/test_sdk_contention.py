"""The client SDK under contention, against real ``sbus serve`` processes over SQLite,
PostgreSQL (two replicas) and Redis (two replicas), with the SDK's default retry budgets.

- 16 threads x 25 ``Session.update`` increments of one counter end at exactly 400, every
  version 1..400 written once with the value it counts (no lost and no doubled update);
- the same with 16 asyncio tasks over ``AsyncBus``;
- 16 threads moving amounts between two accounts with a ``transactional`` function: the
  total is conserved, and each balance is exactly what the transfers that returned made
  it (a transfer that gave up with RetriesExhausted moved nothing).

Each test also proves the requests collided, by arrangement rather than by luck: the
first commit of every worker is held in its HTTP transport (``HeldFirstCommits``) until
every worker has one ready, so all of them rest on the same read and all but one are
refused. The bus counts at least WORKERS - 1 VersionMismatch refusals (``/stats``), or
the ``on_retry`` hook runs at least that often. Clients alternate between the replicas,
so two processes race for the same row or key of the shared store.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from collections.abc import Hashable
from functools import partial

import httpx
import pytest

from sbus_client import AsyncBus, Bus, ConflictError, RetriesExhausted, Session, Shard
from tests.concurrency.conftest import Bus as Topology
from tests.concurrency.conftest import assert_replicas_agree, create_shard, new_client, run_threads
from tests.history.client import Recorder

pytestmark = pytest.mark.concurrency

WORKERS = 16
STEPS = 25
TIMEOUT_S = 120.0


def is_commit(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.startswith("/commit")


class HeldFirstCommits:
    """The arranged collision: each worker's (thread's or task's) first commit waits here
    until every worker's first commit is ready, then all go. Each was built on a read
    taken before any of them was sent, so they all expect the same version and exactly
    one wins: at least WORKERS - 1 refusals, on any machine, at any speed."""

    def __init__(self, workers: int) -> None:
        self.threads = threading.Barrier(workers, timeout=30)
        self.tasks = asyncio.Barrier(workers)
        self.seen: set[Hashable] = set()
        self.lock = threading.Lock()

    def first(self, worker: Hashable) -> bool:
        with self.lock:
            if worker in self.seen:
                return False
            self.seen.add(worker)
            return True

    def transport(self) -> httpx.BaseTransport:
        held = self

        class Hold(httpx.HTTPTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                if is_commit(request) and held.first(threading.get_ident()):
                    held.threads.wait()
                return super().handle_request(request)

        return Hold()

    def async_transport(self) -> httpx.AsyncBaseTransport:
        held = self

        class Hold(httpx.AsyncHTTPTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                if is_commit(request) and held.first(asyncio.current_task()):
                    await asyncio.wait_for(held.tasks.wait(), 30)
                return await super().handle_async_request(request)

        return Hold()


def abort(*barriers: threading.Barrier) -> None:
    for barrier in barriers:
        barrier.abort()


def recorded(recorder: Recorder, url: str, held: HeldFirstCommits | None = None) -> httpx.Client:
    """An HTTP client for the SDK whose requests enter the test's history, which the
    isolation checker verifies when the test ends (tests/concurrency/conftest.py)."""
    transport = held.transport() if held is not None else None
    client = httpx.Client(base_url=url, timeout=30.0, trust_env=False, transport=transport)
    return recorder.attach(client)


def unrecorded(url: str, held: HeldFirstCommits) -> httpx.Client:
    """For the counters: their ~2,500 operations would cost the history checker several
    seconds per test, and check_counter's oracle is exact for one key (every version
    1..400 written once, each counting the one before)."""
    return httpx.Client(base_url=url, timeout=30.0, trust_env=False, transport=held.transport())


def increment(shard: Shard) -> str:
    return str(int(shard.content) + 1)


def check_counter(topology: Topology, key: str, versions: list[int]) -> None:
    """The counter reached WORKERS * STEPS, each returned version is distinct, and the
    history holds version v with content str(v): every update built on the last one."""
    total = WORKERS * STEPS
    assert sorted(versions) == list(range(1, total + 1))
    with new_client(topology.url(0)) as client:
        resp = client.get(f"/shard/{key}", params={"record": "false"})
        assert resp.status_code == 200, resp.text
        assert (resp.json()["version"], resp.json()["content"]) == (total, str(total))
        resp = client.get(f"/history/{key}", params={"limit": 1000})
        assert resp.status_code == 200, resp.text
        entries = resp.json()["entries"]
    assert sorted(e["version"] for e in entries) == list(range(total + 1))
    assert all(e["content"] == str(e["version"]) for e in entries)
    stats = assert_replicas_agree(topology)
    assert stats["total_commits"] == total
    # They collided: the held first commits alone make WORKERS - 1 refusals.
    assert stats["total_conflicts"] >= WORKERS - 1, stats
    print(f"\n[{topology.topology}] {total} updates, {stats['total_conflicts']} VersionMismatch")


def test_threads_update_one_counter_to_exactly_400(fresh_bus: Topology, recorder: Recorder) -> None:
    key = "counter/threads"
    with new_client(fresh_bus.url(0)) as client:
        assert create_shard(client, key, "0") == 0
    recorder.checked_by_test = True  # by check_counter: see unrecorded()
    held = HeldFirstCommits(WORKERS)
    https = [unrecorded(url, held) for url in fresh_bus.urls]
    clients = [Bus(str(h.base_url), agent_id="counter", http_client=h) for h in https]
    start = threading.Barrier(WORKERS, timeout=30)
    versions: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        sdk = clients[i % len(clients)]
        with sdk.session(agent_id=f"agent-{i}") as s:
            start.wait()
            for _ in range(STEPS):
                done = s.update(key, increment)
                assert done is not None
                with lock:
                    versions.append(done.version)

    try:
        run_threads(
            [partial(worker, i) for i in range(WORKERS)],
            timeout=TIMEOUT_S,
            on_error=partial(abort, start, held.threads),
        )
    finally:
        for h in https:
            h.close()
    check_counter(fresh_bus, key, versions)


async def test_tasks_update_one_counter_to_exactly_400(
    fresh_bus: Topology, recorder: Recorder
) -> None:
    key = "counter/tasks"
    with new_client(fresh_bus.url(0)) as client:
        assert create_shard(client, key, "0") == 0
    recorder.checked_by_test = True  # by check_counter: see unrecorded()
    held = HeldFirstCommits(WORKERS)
    https = [
        httpx.AsyncClient(
            base_url=url, timeout=30.0, trust_env=False, transport=held.async_transport()
        )
        for url in fresh_bus.urls
    ]
    clients = [AsyncBus(str(h.base_url), agent_id="counter", http_client=h) for h in https]
    start = asyncio.Barrier(WORKERS)
    versions: list[int] = []

    async def worker(i: int) -> None:
        async with clients[i % len(clients)].session(agent_id=f"agent-{i}") as s:
            await start.wait()
            for _ in range(STEPS):
                done = await s.update(key, increment)
                assert done is not None
                versions.append(done.version)

    try:
        await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(WORKERS))), TIMEOUT_S)
    finally:
        for h in https:
            await h.aclose()
    check_counter(fresh_bus, key, versions)


TRANSFERS = 10
OPENING = 1000


def test_transactional_transfers_conserve_the_total(
    fresh_bus: Topology, recorder: Recorder
) -> None:
    accounts = ("acct/a", "acct/b")
    with new_client(fresh_bus.url(0)) as client:
        for key in accounts:
            assert create_shard(client, key, str(OPENING)) == 0
    held = HeldFirstCommits(WORKERS)
    https = [recorded(recorder, url, held) for url in fresh_bus.urls]
    clients = [Bus(str(h.base_url), agent_id="bank", http_client=h) for h in https]
    retries: Counter[str] = Counter()
    lock = threading.Lock()
    moved: list[tuple[str, int]] = []  # (source, amount) of each transfer that returned
    gave_up: list[RetriesExhausted] = []
    start = threading.Barrier(WORKERS, timeout=30)

    def on_retry(attempt: int, err: ConflictError, wait: float) -> None:
        with lock:
            retries[type(err).__name__] += 1

    def worker(i: int) -> None:
        sdk = clients[i % len(clients)]

        @sdk.transactional(on_retry=on_retry)
        def transfer(s: Session, src: str, dst: str, amount: int) -> int:
            a, b = s.read(src), s.read(dst)
            s.commit_many(
                [(src, str(int(a.content) - amount), a), (dst, str(int(b.content) + amount), b)]
            )
            return int(a.content) - amount

        rng = random.Random(i)
        start.wait()
        for _ in range(TRANSFERS):
            src, dst = rng.sample(accounts, 2)
            amount = rng.randint(1, 50)
            try:
                transfer(src, dst, amount)
            except RetriesExhausted as exc:
                with lock:
                    gave_up.append(exc)
            else:
                with lock:
                    moved.append((src, amount))

    try:
        run_threads(
            [partial(worker, i) for i in range(WORKERS)],
            timeout=TIMEOUT_S,
            on_error=partial(abort, start, held.threads),
        )
    finally:
        for h in https:
            h.close()

    with new_client(fresh_bus.url(0)) as client:
        balances = {}
        for key in accounts:
            resp = client.get(f"/shard/{key}", params={"record": "false"})
            assert resp.status_code == 200, resp.text
            balances[key] = int(resp.json()["content"])
    out_of_a = sum(n for src, n in moved if src == "acct/a") - sum(
        n for src, n in moved if src == "acct/b"
    )
    print(
        f"\n[{fresh_bus.topology}] {len(moved)} transfers, {len(gave_up)} gave up, "
        f"retries {dict(retries)}"
    )
    assert len(moved) + len(gave_up) == WORKERS * TRANSFERS
    assert sum(balances.values()) == 2 * OPENING
    assert balances == {"acct/a": OPENING - out_of_a, "acct/b": OPENING + out_of_a}
    assert all(isinstance(g.last_error, ConflictError) for g in gave_up)
    assert len(moved) > WORKERS  # most transfers went through
    # and they collided: every held first transfer but one was refused and retried
    assert sum(retries.values()) >= WORKERS - 1, retries
    stats = assert_replicas_agree(fresh_bus)
    assert stats["total_commits"] == len(moved)


def test_a_transactional_call_joins_a_session_passed_in(
    fresh_bus: Topology, recorder: Recorder
) -> None:
    """The FoundationDB rule, on a real bus: called with a session, the function runs once
    in it and a conflict propagates instead of being retried."""
    key = "join/x"
    with new_client(fresh_bus.url(0)) as client:
        assert create_shard(client, key, "0") == 0
    calls = 0
    with (
        recorded(recorder, fresh_bus.url(0)) as http,
        Bus(fresh_bus.url(0), agent_id="joiner", http_client=http) as sdk,
    ):

        @sdk.transactional()
        def bump(s: Session, expected: int) -> None:
            nonlocal calls
            calls += 1
            s.commit(key, "bumped", expected=expected)

        with sdk.session() as s, pytest.raises(ConflictError):
            bump(s, 7)
        assert calls == 1
        bump(0)  # on its own: a fresh session, committed
        assert calls == 2
