"""PostgreSQL crashes (``pg_ctl restart -m immediate``) twice under a commit load: the bus
answers only well-formed 503s while it is down, recovers by itself, and the final state
is exactly the commits its clients were told succeeded."""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import (
    Buses,
    Load,
    Postgres,
    run_load,
    seed_shards,
    summary,
    verify_history,
    wait_healthy,
)

pytestmark = pytest.mark.faults

WARMUP_S = 2.0
BETWEEN_S = 2.0
AFTER_S = 3.0


def test_postgres_restart_under_load(buses: Buses, running_postgres: Postgres) -> None:
    (bus,) = buses.start(running_postgres.url)
    seed_shards(bus.base_url)
    recovered_at = 0.0

    def fault(load: Load) -> None:
        nonlocal recovered_at
        time.sleep(WARMUP_S)
        for _ in range(2):
            running_postgres.restart_immediate()
            time.sleep(BETWEEN_S)
        recovered_at = time.monotonic()
        time.sleep(AFTER_S)

    load = run_load([bus.base_url], fault)
    print(f"\nPostgreSQL restart: {summary(load)}; bus tracebacks {buses.tracebacks()}")
    assert load.violations == []
    wait_healthy(bus.base_url, 10.0)
    assert verify_history(bus.base_url, load) == []
    assert sum(n for k, n in load.tally.items() if k.startswith("503:")) > 0, (
        "the restarts never reached the clients: the fault did not happen"
    )
    assert load.successes_after(recovered_at) > 0, "no fresh commit after the restarts"
    assert bus.alive(), "the bus must recover without a restart"
