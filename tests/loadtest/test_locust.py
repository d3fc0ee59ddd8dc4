"""loadtest/locustfile.py runs headless for 10 s against a bus that locust_run.py starts
(SQLite): every open-mode scenario made requests and none failed (a 409 counts as a
success under its own name). The token scenario stays out unless selected. No figure is
checked."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.concurrency

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"
SCENARIOS = ("dedicated", "hot", "readheavy", "multikey", "mandates")


def plain_env() -> dict[str, str]:
    """This environment without any SBUS_* setting: a default open-mode bus, no admin."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}


def test_the_locust_scenarios_run_without_failures(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(LOADTEST / "locust_run.py"),
            "--seconds",
            "10",
            "--users",
            "10",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=plain_env(),
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (tmp_path / "sbus_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    for scenario in SCENARIOS:
        mine = [r for name, r in rows.items() if name.startswith(f"{scenario}: ")]
        assert sum(int(r["Request Count"]) for r in mine) > 0, scenario
        assert all(int(r["Failure Count"]) == 0 for r in mine), scenario
    assert not any(name.startswith("token") for name in rows)
    assert (tmp_path / "sbus.html").stat().st_size > 0


def test_the_token_scenario_needs_its_token(tmp_path: Path) -> None:
    env = plain_env()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOADTEST / "locustfile.py"),
            "--host",
            "http://127.0.0.1:9",
            "--headless",
            "-t",
            "1s",
            "--tags",
            "token",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode != 0
    assert "SBUS_LOCUST_TOKEN" in done.stdout + done.stderr


def test_the_token_scenario_runs_in_token_mode(tmp_path: Path) -> None:
    """``locust_run.py --token``: the bus in token mode, the users carrying a token issued
    for the run; only the token scenario runs, and nothing fails."""
    done = subprocess.run(
        [
            sys.executable,
            str(LOADTEST / "locust_run.py"),
            "--token",
            "--seconds",
            "4",
            "--users",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=plain_env(),
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (tmp_path / "sbus_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["token: POST /commit"]["Request Count"]) > 0
    assert {name.split(":")[0] for name in rows} == {"token", "Aggregated"}
