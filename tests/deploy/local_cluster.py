"""Drive ``deploy/local/cluster.sh`` as a user does: ``up`` in a state directory of the
test's own on a free port, then the load balancer's URL, the replicas' ports and pids
from the state it recorded, and nginx's access log line by line.

The cluster starts its own store (PostgreSQL or Redis) and nginx; the servers
``make test`` started are not used.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local" / "cluster.sh"
# Generous: the first run on a fresh machine installs nginx and the store with apt.
UP_TIMEOUT_S = 600.0
LAST_LINE = re.compile(r"S-Bus load balancer: http://127\.0\.0\.1:(\d+)")
# The generated log_format (cluster.sh): request line, status, agent, replica(s).
ACCESS = re.compile(
    r'^\S+ \[[^\]]+\] "(?P<method>\S+) (?P<target>\S+) [^"]*" (?P<status>\d{3}) \d+ '
    r'agent="(?P<agent>[^"]*)" upstream=(?P<upstream>.*?) upstream_status=(?P<upstream_status>.*?) '
    r"rt="
)


def script_env(state: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without its ``SBUS_*`` variables (which the script passes
    on to every replica), with the state directory and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}
    env["SBUS_CLUSTER_DIR"] = str(state)
    env.update(extra or {})
    return env


def run_script(
    args: Sequence[str], env: dict[str, str], timeout: float = UP_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class Access:
    """One line of nginx's access log."""

    method: str
    target: str
    status: int
    agent: str
    upstreams: tuple[str, ...]  # every replica nginx tried, in order
    upstream_statuses: tuple[str, ...]


def parse_access(line: str) -> Access:
    match = ACCESS.match(line)
    assert match is not None, f"not the cluster's log_format: {line!r}"
    return Access(
        method=match["method"],
        target=match["target"],
        status=int(match["status"]),
        agent=match["agent"],
        upstreams=tuple(re.split(r", | : ", match["upstream"])),
        upstream_statuses=tuple(re.split(r", | : ", match["upstream_status"])),
    )


@dataclass
class Cluster:
    """A cluster ``up`` started; ``down`` stops it."""

    store: str
    state: Path
    env: dict[str, str]
    url: str
    up_output: str

    def run(self, *args: str, timeout: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return run_script(args, self.env, timeout)

    def conf(self) -> dict[str, str]:
        """``cluster.env``: what ``up`` recorded (ports, store URL, ...)."""
        values = {}
        for line in (self.state / "cluster.env").read_text().splitlines():
            name, _, value = line.partition("=")
            values[name] = value
        return values

    @property
    def replicas(self) -> int:
        return int(self.conf()["REPLICAS"])

    def replica_addresses(self) -> list[str]:
        conf = self.conf()
        return [f"127.0.0.1:{conf[f'REPLICA_PORT_{i}']}" for i in range(1, self.replicas + 1)]

    def pid(self, name: str) -> int:
        return int((self.state / "pids" / f"{name}.pid").read_text())

    def pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in (self.state / "pids").glob("*.pid")}

    def log(self, name: str) -> str:
        return (self.state / "logs" / name).read_text(errors="replace")

    def access(self) -> list[Access]:
        return [parse_access(line) for line in self.log("nginx-access.log").splitlines()]

    def replica_logs(self) -> dict[str, str]:
        return {f"replica-{i}": self.log(f"replica-{i}.log") for i in range(1, self.replicas + 1)}


def up(store: str, state: Path, port: int, extra_env: dict[str, str] | None = None) -> Cluster:
    """``cluster.sh up --store STORE --port PORT``; fails the test unless it exits 0 with
    the load balancer's address as its last line."""
    env = script_env(state, extra_env)
    done = run_script(["up", "--store", store, "--port", str(port)], env)
    output = done.stdout + done.stderr
    try:
        assert done.returncode == 0, (
            f"cluster.sh up --store {store} exited {done.returncode}:\n{output}"
        )
        lines = done.stdout.splitlines()
        assert lines, output
        match = LAST_LINE.fullmatch(lines[-1])
        assert match is not None and int(match[1]) == port, lines[-1]
    except AssertionError:
        # Whatever this up left running goes (up stops it itself when it sees a process fail).
        run_script(["down"], env)
        raise
    return Cluster(store, state, env, f"http://127.0.0.1:{port}", output)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
