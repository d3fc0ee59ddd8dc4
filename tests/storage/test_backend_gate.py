"""A run that cannot reach its PostgreSQL or Redis fails; it skips only when told to.

The storage suites run in a child pytest whose URLs point at loopback ports nobody
listens on, with no ``CI`` variable (a developer's machine): it must exit non-zero and
name the unreachable servers, and only ``SBUS_TEST_ALLOW_SKIP=1`` turns that into skips.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITES = ["tests/storage/test_postgres.py", "tests/storage/test_redis.py"]


def closed_port() -> int:
    """A loopback port that was free a moment ago and that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_storage_suites(**extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_") and k != "CI"}
    env["SBUS_TEST_POSTGRES_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/x"
    env["SBUS_TEST_REDIS_URL"] = f"redis://127.0.0.1:{closed_port()}/0"
    env.update(extra)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", *SUITES]
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_unreachable_servers_fail_the_run_without_ci() -> None:
    done = run_storage_suites()
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "PostgreSQL at postgresql+asyncpg://" in out and "unreachable" in out, out
    assert "Redis at redis://127.0.0.1:" in out, out
    assert "set SBUS_TEST_ALLOW_SKIP=1 to skip it instead" in out, out
    last = out.strip().splitlines()[-1]
    assert " failed" in last and " error" in last and " skipped" not in last, out


def test_allow_skip_is_the_one_way_to_skip_them() -> None:
    done = run_storage_suites(SBUS_TEST_ALLOW_SKIP="1")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    last = out.strip().splitlines()[-1]
    assert " skipped" in last and "failed" not in last and "error" not in last, out
    assert "(skipped: SBUS_TEST_ALLOW_SKIP=1)" in out, out
