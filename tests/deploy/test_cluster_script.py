"""``deploy/local/cluster.sh`` as a command: shellcheck-clean, its help and its refusals,
``down`` with nothing up, and an ``up`` whose replicas cannot start, which must say
which process failed with the end of its log, stop what it started and exit non-zero.
The cluster itself, up, is tests/deploy/test_local_cluster.py."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.concurrency.conftest import free_port
from tests.deploy.local_cluster import SCRIPT, run_script, script_env

pytestmark = pytest.mark.concurrency


def shellcheck() -> str:
    """Debian's shellcheck, installed with apt when missing (as scripts/with-services.sh
    installs the servers): a missing linter must not pass the lint."""
    found = shutil.which("shellcheck")
    if found is None:
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        # A fresh machine may have no package lists yet.
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "shellcheck"],
        ):
            subprocess.run(argv, check=True, capture_output=True, env=env)
        found = shutil.which("shellcheck")
    assert found is not None
    return found


def test_the_script_is_shellcheck_clean() -> None:
    done = subprocess.run(
        [shellcheck(), "--severity=style", str(SCRIPT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_help_names_every_command_option_and_variable(tmp_path: Path) -> None:
    done = run_script(["--help"], script_env(tmp_path / "state"))
    assert done.returncode == 0, done.stderr
    for word in (
        "up [--store pg|redis] [--replicas N] [--port P]",
        "down",
        "restart [I]",
        "status",
        "default 3",
        "default 7080",
        "SBUS_CLUSTER_DIR",
        "XDG_STATE_HOME",
        ".venv",
        "already up",
    ):
        assert word in done.stdout, word
    assert run_script(["up", "--help"], script_env(tmp_path / "state")).stdout == done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["up", "--store", "sqlite"], "--store must be pg or redis, not 'sqlite'"),
        (["up", "--replicas", "0"], "--replicas must be a number from 1 to 32, not '0'"),
        (["up", "--replicas", "x"], "--replicas must be a number from 1 to 32, not 'x'"),
        (["up", "--port", "70000"], "--port must be a number from 1 to 65535, not '70000'"),
        (["up", "--bogus"], "unknown option for up: --bogus"),
        (["down", "now"], "down takes no arguments"),
        (["restart"], "nothing is up"),
    ],
)
def test_bad_arguments_are_refused_and_start_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    state = tmp_path / "state"
    done = run_script(args, script_env(state))
    assert done.returncode == 1, done.stdout + done.stderr
    assert message in done.stderr
    assert not (state / "pids").exists()


def test_an_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    done = run_script(["launch"], script_env(tmp_path / "state"))
    assert done.returncode == 2
    assert "unknown command 'launch'" in done.stderr


def test_down_with_nothing_up_is_harmless(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = run_script(["down"], script_env(state))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"cluster: nothing is up (no cluster state in {state})\n"
    assert not state.exists()


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = run_script(["up", "--store", "redis", "--port", str(port)], script_env(state))
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in done.stderr
    assert not (state / "pids").exists()


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


def test_a_replica_that_cannot_start_fails_up_and_stops_the_rest(tmp_path: Path) -> None:
    """The replica refuses to start (an invalid SBUS_LOG_FORMAT reaches them, as any
    SBUS_* variable does): up names the replica, shows its log, stops the Redis it had
    started and exits 1."""
    state = tmp_path / "state"
    done = run_script(
        ["up", "--store", "redis", "--replicas", "1", "--port", str(free_port())],
        script_env(state, {"SBUS_LOG_FORMAT": "bogus"}),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cluster: replica-1 exited before it was healthy" in done.stderr
    assert f"cluster: replica-1 failed; the end of {state}/logs/replica-1.log:" in done.stderr
    assert "SBUS_LOG_FORMAT" in done.stderr  # the replica's own words, from its log
    assert "S-Bus load balancer" not in done.stdout
    match = re.search(r"starting Redis on (127\.0\.0\.1:\d+)", done.stdout)
    assert match is not None, done.stdout
    assert processes_mentioning(f"redis-server {match[1]}") == []
    assert not (state / "pids").exists() and not (state / "cluster.env").exists()
    # The logs stay for the operator to read; a later down cleans them up.
    assert (state / "logs" / "replica-1.log").exists()
    assert run_script(["down"], script_env(state)).returncode == 0
    assert not state.exists()
