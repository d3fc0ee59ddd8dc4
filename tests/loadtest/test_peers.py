"""loadtest/peers.py --quick runs end to end: etcd, durable PostgreSQL and Redis, the bus
on each store and the two baselines, one client for all. The peer table has a row per
store, the sweep a point per system and topology, and no update was lost. No figure or
timing is checked (docs/performance.md holds them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.concurrency

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"


def test_the_quick_peer_comparison_runs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}
    done = subprocess.run(
        [sys.executable, str(LOADTEST / "peers.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "peers.json").read_text())
    assert list(report["peers"]) == ["sqlite", "redis", "postgres"]
    for store, row in report["peers"].items():
        for phase in ("etcd_dedicated", "etcd_hot", "bus_dedicated", "bus_hot"):
            assert row[phase]["commits"] > 0, (store, phase)
            assert row[phase]["errors"] == 0, (store, phase, row[phase]["error_samples"])
        assert set(row["bus_dedicated"]["server_cpu_ms"]) == (
            {"bus"} if store == "sqlite" else {"bus", "store"}
        )
        if store in ("sqlite", "redis"):
            assert row["openloop"]["cycles"] > 0 and row["openloop"]["failures"] == 0
    points = {(p["system"], p["phase"].split("-")[0]) for p in report["sweep"]}
    systems = ("bus-postgres", "serializable", "bus-redis", "watch")
    assert points == {(s, t) for s in systems for t in ("shared", "dedicated")}
    assert all(p["lost_updates"] == 0 and p["errors"] == 0 for p in report["sweep"])
    assert all(p["commits"] > 0 for p in report["sweep"])
    table = (tmp_path / "peers.md").read_text()
    for store in ("sqlite (1 worker)", "redis (2 workers)", "postgres (2 workers)"):
        assert f"| {store} |" in table
