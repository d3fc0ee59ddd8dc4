"""examples/langgraph runs as documented: both notes land, the model is called once per
topic, and the one forced conflict re-ran only the apply node."""

from __future__ import annotations

import subprocess
import sys

from examples.langgraph.notes import run
from sbus_client.testing import LocalBus

EXPECTED = """\
shared notes:
  - Cache embeddings by content hash.
  - Retry on 409, never on 422.
model calls: 2 (one per topic)
apply attempts: 3 (conflicts: VersionMismatch; RetryPolicy re-ran apply only)"""


def test_run_in_process() -> None:
    with LocalBus() as local:
        assert run(local.bus) == EXPECTED


def test_module_prints_the_summary() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.langgraph"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXPECTED + "\n"
