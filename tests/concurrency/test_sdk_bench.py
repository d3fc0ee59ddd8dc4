"""loadtest/sdk_bench.py runs end to end (tiny sizes, no figure checked): it starts its own
``sbus serve``, finds the SDK's requests and the raw ones byte-identical, and reports both
halves. Timing is never asserted (docs/performance.md holds the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.concurrency.conftest import server_env

pytestmark = pytest.mark.concurrency

BENCH = Path(__file__).resolve().parents[2] / "loadtest" / "sdk_bench.py"
TINY = ["--rounds", "1", "--cycles", "5", "--warmup-cycles", "1", "--agents", "2"]
TINY += ["--seconds", "0.3", "--warmup", "0.1", "--json"]


def test_the_sdk_bench_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), *TINY],
        capture_output=True,
        text=True,
        timeout=120,
        env=server_env(),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["store"] == "sqlite"
    assert report["client"]["sdk_ms_per_cycle"] > 0 and report["client"]["raw_ms_per_cycle"] > 0
    assert len(report["client"]["ratios"]) == 1
    for mode in ("plain", "idempotent"):
        assert report["server"][mode]["commits_per_s"] > 0
