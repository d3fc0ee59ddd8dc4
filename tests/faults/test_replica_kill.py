"""A bus replica is SIGKILLed mid-load; two replicas share one store (PostgreSQL, then
Redis). Agents spread over both; those of the dead replica fail over to the live one and
retry with the same Idempotency-Key. The live replica keeps serving, nothing is applied
twice or lost, and no multi-key commit is half-applied."""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import (
    Buses,
    Load,
    kill_bus,
    run_load,
    seed_shards,
    summary,
    verify_history,
    wait_healthy,
)

pytestmark = pytest.mark.faults

WARMUP_S = 2.0
AFTER_S = 3.0
# One process per replica, so SIGKILL of the replica is the death of the bus.
REPLICA = {"SBUS_WORKERS": "1"}


@pytest.mark.parametrize("store", ["postgres", "redis"])
def test_replica_killed_mid_load(buses: Buses, request: pytest.FixtureRequest, store: str) -> None:
    server = request.getfixturevalue("running_postgres" if store == "postgres" else "running_redis")
    url: str = server.url
    doomed, survivor = buses.start(url, REPLICA, count=2)
    seed_shards(survivor.base_url)
    killed_at = 0.0

    def fault(load: Load) -> None:
        nonlocal killed_at
        time.sleep(WARMUP_S)
        kill_bus(doomed)
        killed_at = time.monotonic()
        time.sleep(AFTER_S)

    load = run_load([doomed.base_url, survivor.base_url], fault, failover=True)
    print(f"\nreplica kill over {store}: {summary(load)}; bus tracebacks {buses.tracebacks()}")
    assert load.violations == []
    assert not doomed.alive()
    transport = {k: n for k, n in load.tally.items() if k.startswith("transport:")}
    assert transport, "no agent of the killed replica noticed: the fault did not happen"
    assert all(k.endswith(doomed.base_url) for k in transport), transport
    assert all(a.status is not None for a in load.attempts)
    wait_healthy(survivor.base_url, 10.0)
    assert verify_history(survivor.base_url, load) == []
    assert load.successes_after(killed_at) > 0, "the live replica served no commit after the kill"
    assert survivor.alive()
