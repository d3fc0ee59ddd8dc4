"""A Redis Cluster master is killed (SIGKILL) under a commit load with replica
acknowledgement on (``SBUS_REDIS_WAIT_REPLICAS=1``): two bus deployments, each over its own
namespace, their slots on two different masters; the master of the first is killed, the
cluster promotes its replica and the bus follows it without a restart. Every commit a
client saw acknowledged is in the history afterwards, none is applied twice, none is
half-applied (:func:`tests.faults.conftest.verify_history`); the other namespace carries
on. docs/redis.md states the guarantee ("Replica acknowledgement").

It runs on the shared test cluster (``scripts/with-services.sh``) and leaves it as it found
it: the killed node is started again over its own configuration file once its replica is
promoted, and rejoins as the new master's replica. Until then the new master has no replica,
so every write to it answers 503 unknown (WAIT 1 cannot be met): the clients resend with
their Idempotency-Keys until it is back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time

import pytest
from redis.crc import key_slot

from tests import backends
from tests import redis_cluster as rc
from tests.faults.conftest import (
    Buses,
    Load,
    run_load,
    seed_shards,
    summary,
    verify_history,
    wait_healthy,
)
from tests.history.client import Recorder

pytestmark = pytest.mark.faults

WARMUP_S = 2.0
AFTER_S = 2.0
ENV = {"SBUS_REDIS_WAIT_REPLICAS": "1", "SBUS_REDIS_WAIT_TIMEOUT_MS": "1000", "SBUS_WORKERS": "1"}


def _on_two_masters() -> tuple[str, str]:
    """Two namespaces whose slots two different masters own."""

    async def pick() -> tuple[str, str]:
        await backends.require("redis-cluster")
        await rc.wait_for("every master has a replica", rc.healthy)
        owners: dict[str, str] = {}
        for i in range(64):
            name = f"failover{i}"
            address = (await rc.owner(key_slot(("{sbus:" + name + "}").encode()))).address
            if owners and address not in owners.values():
                return next(iter(owners)), name
            owners.setdefault(name, address)
        raise AssertionError("64 namespaces all on one master")

    return asyncio.run(pick())


def test_a_killed_master_loses_no_acknowledged_commit(buses: Buses, recorder: Recorder) -> None:
    # The recorder would merge both namespaces' keys (same names, two stores) into one
    # history; verify_history checks each namespace against its own load instead.
    recorder.checked_by_test = True
    asyncio.run(backends.wipe("redis-cluster"))
    hit, spared = _on_two_masters()
    slot = key_slot(("{sbus:" + hit + "}").encode())
    victim = asyncio.run(rc.owner(slot))
    heir = asyncio.run(rc.replica_of(victim))
    config = asyncio.run(rc.info(victim.address, "server"))["config_file"]
    victim_pid = asyncio.run(rc.pid(victim.address))
    bus_hit, bus_spared = (
        buses.start(backends.REDIS_CLUSTER_URL, {**ENV, "SBUS_NAMESPACE": name})[0]
        for name in (hit, spared)
    )
    seed_shards(bus_hit.base_url)
    seed_shards(bus_spared.base_url)
    killed_at = promoted_at = recovered_at = 0.0
    done = threading.Event()
    spared_loads: list[Load] = []

    def until_done(_: Load) -> None:
        done.wait(60)

    def spared_load() -> None:
        spared_loads.append(run_load([bus_spared.base_url], until_done))

    other = threading.Thread(target=spared_load, daemon=True)
    other.start()

    def fault(load: Load) -> None:
        nonlocal killed_at, promoted_at, recovered_at
        time.sleep(WARMUP_S)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()

        async def promoted() -> bool:
            listed = await rc.nodes()
            return any(n.address == heir.address and n.master and n.owns(slot) for n in listed)

        asyncio.run(rc.wait_for("the replica is promoted", promoted))
        promoted_at = time.monotonic()
        # The promoted master has no replica left, so with WAIT 1 every write answers 503
        # unknown until one is back: the killed node returns, as the new master's replica.
        subprocess.run(["redis-server", config], check=True, capture_output=True)
        asyncio.run(rc.wait_for("every master has a replica", rc.healthy, 60))
        deadline = time.monotonic() + 30  # a bound on a bus that never recovers
        while not load.successes_after(promoted_at) and time.monotonic() < deadline:
            time.sleep(0.05)
        recovered_at = time.monotonic()
        time.sleep(AFTER_S)

    try:
        load = run_load([bus_hit.base_url], fault)
    finally:
        done.set()
        other.join(60)
        if not asyncio.run(rc.healthy()):  # the fault failed midway: leave a whole cluster
            subprocess.run(["redis-server", config], check=False, capture_output=True)
            asyncio.run(rc.wait_for("every master has a replica", rc.healthy, 60))
    (spared_run,) = spared_loads
    failover_s = promoted_at - killed_at
    print(
        f"\nRedis Cluster master killed: failover {failover_s:.1f} s, first fresh commit "
        f"{recovered_at - killed_at:.1f} s after the kill; "
        f"{hit} (master killed): {summary(load)}; "
        f"{spared} (other master): {summary(spared_run)}; bus tracebacks {buses.tracebacks()}"
    )
    assert load.violations == [] and spared_run.violations == []
    wait_healthy(bus_hit.base_url, 10.0)
    assert verify_history(bus_hit.base_url, load) == []
    assert verify_history(bus_spared.base_url, spared_run) == []
    assert sum(n for k, n in load.tally.items() if k.startswith("503:")) > 0, (
        "the failover never reached the clients: the fault did not happen"
    )
    assert load.successes_after(promoted_at) > 0, "no fresh commit after the failover"
    assert load.tally["503:commit:unknown"] > 0  # the writes while no replica was back
    assert spared_run.successes_after(killed_at) > 0
    assert bus_hit.alive() and bus_spared.alive(), "the bus must follow without a restart"
