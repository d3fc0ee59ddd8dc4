"""scripts/with-services.sh stops, without running its command, when a server it starts
never answers: the suite must not start against a Redis that is not there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_redis_that_never_answers_stops_the_script(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    # A redis-server that "starts" (exit 0) and never serves.
    stub = stubs / "redis-server"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    ran = tmp_path / "ran"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["scripts/with-services.sh", "touch", str(ran)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "never answered PING" in done.stderr, done.stderr
    assert not ran.exists()
