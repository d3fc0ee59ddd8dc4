"""loadtest/peers.py runs end to end. ``make test`` runs the SQLite row (etcd, the bus on
SQLite, the open loop: a few seconds); the whole ``--quick`` form (etcd, durable
PostgreSQL and Redis, the bus on each store and the two baselines: every row, about a
minute on a quiet machine, two on a busy one) is marked slow (``pytest -m slow
tests/loadtest/test_peers.py``). No figure or timing is checked (docs/performance.md
holds them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.concurrency

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"


def peers(out: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}
    done = subprocess.run(
        [sys.executable, str(LOADTEST / "peers.py"), "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / "peers.json").read_text())
    return report


def test_the_sqlite_peer_row_runs(tmp_path: Path) -> None:
    report = peers(tmp_path, "--stores", "sqlite")
    row = report["peers"]["sqlite"]
    for phase in ("etcd_dedicated", "etcd_hot", "bus_dedicated", "bus_hot"):
        assert row[phase]["commits"] > 0 and row[phase]["errors"] == 0, (phase, row[phase])
    assert set(row["bus_dedicated"]["server_cpu_ms"]) == {"bus"}
    assert set(row["etcd_dedicated"]["server_cpu_ms"]) == {"etcd"}
    assert row["openloop"]["cycles"] > 0 and row["openloop"]["failures"] == 0
    assert "| sqlite (1 worker) |" in (tmp_path / "peers.md").read_text()


@pytest.mark.slow
def test_the_quick_peer_comparison_runs(tmp_path: Path) -> None:
    report = peers(tmp_path)
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
