"""The bench-only baseline stores of loadtest/baselines/ (a SERIALIZABLE PostgreSQL
transaction, Redis WATCH/MULTI) lose no update under real concurrency: rounds of 16
commits racing at one version of one key, each round exactly one winner, the counter in
the content equal to the commits acknowledged. The baseline's own mechanism must have
fired (serialization failures retried, EXECs aborted), so the commits really collided
inside the store and were not merely queued."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from sbus.api.runtime import runtime_of
from sbus.core import errors as e
from sbus.core.engine import commit_txn, new_commit_id
from sbus.core.types import CreateOp, Limits, WriteOp
from tests import backends

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest" / "baselines"))

import serve
from pg_serializable import SerializablePostgresStore
from redis_watch import WatchRedisStore

RACERS = 16
ROUNDS = 12


@pytest.fixture(params=["serializable", "watch"])
async def baseline(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    kind = "postgres" if request.param == "serializable" else "redis"
    await backends.require(kind)
    await backends.wipe(kind)
    store: Any
    if kind == "postgres":
        store = SerializablePostgresStore(backends.POSTGRES_URL, Limits(), pool_size=RACERS)
    else:
        store = WatchRedisStore(backends.REDIS_URL, Limits())
    await store.start()
    if kind == "redis":
        # The store's own reads and scripts run outside redis-py's pool, which therefore
        # starts with one connection: the first racer would take it and finish before the
        # others had connected, and no two WATCH transactions would ever overlap. Open one
        # per racer up front, as the PostgreSQL baseline's pool_size does.
        pool = store.node().pool
        taken = [await pool.get_connection() for _ in range(RACERS)]
        for conn in taken:
            await pool.release(conn)
    yield store
    await store.close()


def increment(key: str, agent: str, version: int, value: int) -> Any:
    return commit_txn(
        op="commit",
        agent_id=agent,
        session_id="",
        writes=[WriteOp(key, version, "commit", str(value + 1))],
        read_set=[],
        rationale=None,
        idem=None,
    )


async def test_racing_commits_lose_no_update(baseline: Any) -> None:
    await baseline.create(CreateOp("counter", "0", "", False, "setup", new_commit_id()))
    acknowledged = 0
    for _ in range(ROUNDS):
        agents = [f"agent-{i}" for i in range(RACERS)]
        reads = [await baseline.read("counter", a, "", True) for a in agents]
        assert len({(r.version, r.content) for r in reads}) == 1
        version, value = reads[0].version, int(reads[0].content)
        outcomes = await asyncio.gather(
            *(baseline.apply(increment("counter", a, version, value)) for a in agents),
            return_exceptions=True,
        )
        won = [o for o in outcomes if not isinstance(o, BaseException)]
        lost = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(won) == 1 and won[0].status == 200
        assert won[0].body["new_version"] == version + 1
        assert all(isinstance(o, e.VersionMismatch) for o in lost), lost
        acknowledged += len(won)
    final = await baseline.read("counter", None, "", False)
    assert (final.version, int(final.content)) == (ROUNDS, acknowledged)
    assert acknowledged == ROUNDS
    races = getattr(baseline, "serialization_retries", 0) + getattr(baseline, "exec_aborts", 0)
    assert races > 0  # the store's own mechanism stopped concurrent winners


async def test_a_stale_delivery_log_entry_is_refused(baseline: Any) -> None:
    """ORI through the DeliveryLog (no expected version on the read key): B read
    ``plan`` at 0, A moved it, B's commit of ``code`` is 409 CrossShardStale."""
    for key in ("plan", "code"):
        await baseline.create(CreateOp(key, "0", "", False, "setup", new_commit_id()))
    await baseline.read("plan", "B", "", True)
    await baseline.apply(increment("plan", "A", 0, 0))
    with pytest.raises(e.CrossShardStale):
        await baseline.apply(increment("code", "B", 0, 0))
    out = await baseline.apply(increment("code", "C", 0, 0))
    assert out.status == 200 and out.body["new_version"] == 1
    # the row the baseline wrote reads back whole through the real store's read path
    row = await baseline.read("code", "C", "", True)
    assert (row.version, row.content, row.history_depth) == (1, "1", 1)
    history = await baseline.history("code", None, 10)
    assert [h.version for h in history][:2] in ([1, 0], [0, 1])


async def test_write_skew_through_the_delivery_log_is_refused(baseline: Any) -> None:
    """Pairs of agents each read both keys of their pair, then commit one each, at once:
    with no read lock it is the baseline's own mechanism (SSI, WATCH of the DeliveryLog's
    shards) that must stop both from landing. Exactly one commit per pair succeeds; the
    other is 409 CrossShardStale naming the key its partner moved."""
    pairs = RACERS // 2
    for round_no in range(ROUNDS):
        keys = [(f"x/{round_no}/{p}", f"y/{round_no}/{p}") for p in range(pairs)]
        for x, y in keys:
            for key in (x, y):
                await baseline.create(CreateOp(key, "0", "", False, "setup", new_commit_id()))
            for agent in (f"a{x}", f"b{x}"):
                await baseline.read(x, agent, "", True)
                await baseline.read(y, agent, "", True)
        outcomes = await asyncio.gather(
            *(
                baseline.apply(increment(key, f"{who}{x}", 0, 0))
                for x, y in keys
                for who, key in (("a", x), ("b", y))
            ),
            return_exceptions=True,
        )
        for p in range(pairs):
            pair = outcomes[2 * p : 2 * p + 2]
            won = [o for o in pair if not isinstance(o, BaseException)]
            assert len(won) == 1, (round_no, p, pair)
            assert all(isinstance(o, e.CrossShardStale) for o in pair if o not in won), pair


@pytest.mark.parametrize("kind", ["serializable", "watch"])
async def test_the_served_baseline_loses_no_update(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``baselines/serve.py``'s app factory (what each uvicorn worker runs) serves the
    baseline store behind the bus's own app: 16 agents read one key, then all commit at
    the version read at once over HTTP; one 200, fifteen 409 VersionMismatch, the counter
    intact. (Whether their loads overlapped inside the store is up to the scheduler here;
    the tests above arrange it.)"""
    backend = "postgres" if kind == "serializable" else "redis"
    await backends.require(backend)
    await backends.wipe(backend)
    url = backends.POSTGRES_URL if backend == "postgres" else backends.REDIS_URL
    monkeypatch.setenv("SBUS_BENCH_BASELINE", kind)
    monkeypatch.setenv("SBUS_STORE", url)
    app = serve.factory()
    store = runtime_of(app).bus.store
    assert type(store) is (SerializablePostgresStore if kind == "serializable" else WatchRedisStore)
    async with LifespanManager(app) as manager:
        for _ in range(1000):
            if runtime_of(app).ready:
                break
            await asyncio.sleep(0.01)
        assert runtime_of(app).ready, runtime_of(app).not_ready_reason
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            r = await c.post("/shard", json={"key": "hot", "content": "0", "agent_id": "s"})
            assert r.status_code == 201, r.text
            agents = [f"agent-{i}" for i in range(RACERS)]
            for agent in agents:
                r = await c.get("/shard/hot", params={"agent_id": agent})
                assert r.json()["version"] == 0
            answers = await asyncio.gather(
                *(
                    c.post(
                        "/commit",
                        json={"key": "hot", "expected_version": 0, "delta": "1", "agent_id": a},
                    )
                    for a in agents
                )
            )
            statuses = sorted(r.status_code for r in answers)
            assert statuses == [200] + [409] * (RACERS - 1)
            assert {r.json()["error"] for r in answers if r.status_code == 409} == {
                "VersionMismatch"
            }
            final = (await c.get("/shard/hot")).json()
            assert (final["version"], final["content"]) == (1, "1")
