"""A run that cannot reach its PostgreSQL or Redis fails; it skips only when told to.

``pytest tests/storage`` runs in a child whose URLs point at loopback ports nobody
listens on, with none of the variables that could change the outcome (``CI``,
``SBUS_TEST_ALLOW_SKIP`` and every other ``SBUS_`` variable, ``PYTHONPATH``,
``PYTEST_ADDOPTS``): it must exit non-zero, skip nothing, and fail every test that needs
a server; only ``SBUS_TEST_ALLOW_SKIP=1`` turns those failures into skips (shown on the
PostgreSQL and Redis modules).

The child runs the whole directory but two modules, neither of which connects to a
server: this one (it would start itself again, without end) and
``test_services_script.py`` (it gives ``scripts/with-services.sh`` a stub Redis).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_IN_CHILD = ["tests/storage/test_backend_gate.py", "tests/storage/test_services_script.py"]
# The modules that talk to PostgreSQL or Redis, exactly: each must fail, and a failure in
# any other module (a new one that needs a server, say) makes the test name it.
NEED_A_SERVER = {
    "test_audit_store.py",
    "test_change_log.py",
    "test_conformance.py",
    "test_migrations.py",
    "test_pg_pool.py",
    "test_postgres.py",
    "test_redis.py",
    "test_redis_cluster.py",
}
CONFORMANCE = "tests/storage/test_conformance.py::"
OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(\S+)", re.MULTILINE)


def closed_port() -> int:
    """A loopback port that was free a moment ago and that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_storage_suites(*selection: str, **extra: str) -> subprocess.CompletedProcess[str]:
    dropped = {"CI", "PYTHONPATH", "PYTEST_ADDOPTS"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_") and k not in dropped}
    env["SBUS_TEST_POSTGRES_URL"] = f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/x"
    env["SBUS_TEST_REDIS_URL"] = f"redis://127.0.0.1:{closed_port()}/0"
    env["SBUS_TEST_REDIS_CLUSTER_URL"] = f"redis+cluster://127.0.0.1:{closed_port()}"
    env.update(extra)
    ignored = [f"--ignore={path}" for path in NOT_IN_CHILD]
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *ignored]
    return subprocess.run(
        [*argv, *(selection or ["tests/storage"])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def outcomes(out: str) -> dict[str, set[str]]:
    """Test ids by outcome, from the -rA summary."""
    found: dict[str, set[str]] = {
        "PASSED": set(),
        "FAILED": set(),
        "ERROR": set(),
        "SKIPPED": set(),
    }
    for outcome, test in OUTCOME.findall(out):
        found[outcome].add(test)
    return found


def on_a_server(test: str) -> bool:
    """A test parametrized over the stores, run on PostgreSQL or Redis."""
    return "[postgres" in test or "[redis" in test


def test_unreachable_servers_fail_the_run_without_ci() -> None:
    done = run_storage_suites()
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "PostgreSQL at postgresql+asyncpg://" in out and "unreachable" in out, out
    assert "Redis at redis://127.0.0.1:" in out, out
    assert "Redis Cluster at redis+cluster://127.0.0.1:" in out, out
    assert "set SBUS_TEST_ALLOW_SKIP=1 to skip it instead" in out, out
    last = out.strip().splitlines()[-1]
    assert " failed" in last and " error" in last and " skipped" not in last, out
    found = outcomes(out)
    assert not found["SKIPPED"], found["SKIPPED"]
    refused = found["FAILED"] | found["ERROR"]
    modules = {test.split("::")[0].rsplit("/", 1)[-1] for test in refused}
    assert modules == NEED_A_SERVER, (modules, out)
    # No store test on a server got through, and the memory and SQLite ones all pass.
    assert not {test for test in found["PASSED"] if on_a_server(test)}, out
    conformance = {test for test in refused if test.startswith(CONFORMANCE)}
    assert conformance and all(on_a_server(test) for test in conformance), out


def test_allow_skip_is_the_one_way_to_skip_them() -> None:
    # The two modules that need nothing but the servers are enough to see the skips
    # (a run of the whole directory takes twice as long, the memory and SQLite tests
    # doing again what the suite itself does).
    done = run_storage_suites(
        "tests/storage/test_postgres.py", "tests/storage/test_redis.py", SBUS_TEST_ALLOW_SKIP="1"
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    last = out.strip().splitlines()[-1]
    assert " skipped" in last and "failed" not in last and "error" not in last, out
    assert "(skipped: SBUS_TEST_ALLOW_SKIP=1)" in out, out
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", out, re.MULTILINE)
    assert skips, out
    # Every skip is a missing server's, under the one variable that allows it.
    assert all("(skipped: SBUS_TEST_ALLOW_SKIP=1)" in skip for skip in skips), skips
