"""Run loadtest/locustfile.py headless against a bus this script starts (``make loadtest``).

    .venv/bin/python loadtest/locust_run.py                       # SQLite, 60 s, 20 users
    .venv/bin/python loadtest/locust_run.py --seconds 10 --users 10 --out /tmp/lc
    .venv/bin/python loadtest/locust_run.py --store-url redis://127.0.0.1:6379/0 --workers 2
    .venv/bin/python loadtest/locust_run.py --token --seconds 20      # the token scenario

It starts ``sbus serve`` (open mode, loopback, a free port; SQLite in a temporary
directory unless ``--store-url`` names another store), runs Locust as its own process
(it patches the standard library with gevent) and writes ``<out>/sbus_stats.csv``,
``sbus_failures.csv``, ``sbus_stats_history.csv``, ``sbus_exceptions.csv`` and
``sbus.html``; then stops the bus. The exit code is Locust's: 1 when a request failed.

``--token`` runs the token scenario instead (``--tags token``): the bus serves in token
mode with a fresh ``SBUS_SECRET``, and ``sbus token issue`` makes the users' token (agent
``locust-token``, read, write and create on ``locust/**``), handed to Locust in
``SBUS_LOCUST_TOKEN``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from peerlib import ServerProc, free_port, sbus_command, start_bus

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
SCENARIOS = ("dedicated", "hot", "readheavy", "multikey", "mandates")


def run_locust(
    host: str,
    out: Path,
    seconds: int,
    users: int,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    locust = Path(sys.executable).parent / "locust"
    cmd = [str(locust)] if locust.exists() else [sys.executable, "-m", "locust"]
    cmd += ["-f", str(LOCUSTFILE), "--host", host, "--headless", "--only-summary"]
    cmd += ["-u", str(users), "-r", str(max(1, users)), "-t", f"{seconds}s"]
    cmd += ["--stop-timeout", "5", "--csv", str(out / "sbus"), "--html", str(out / "sbus.html")]
    cmd += extra or []
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(cmd, timeout=seconds + 120, check=False, env=full_env)
    return done.returncode


def issue_token(bus_env: dict[str, str]) -> str:
    """A token for the token scenario, signed with the bus's secret."""
    cmd = [*sbus_command(), "token", "issue", "--agent", "locust-token"]
    cmd += ["--allow", "read,write,create:locust/**", "--ttl", "1d", "--json"]
    done = subprocess.run(
        cmd, env={**os.environ, **bus_env}, capture_output=True, text=True, timeout=60, check=True
    )
    token: str = json.loads(done.stdout)["token"]
    return token


def stats_by_name(out: Path) -> dict[str, tuple[int, int]]:
    """(requests, failures) per request name from Locust's ``sbus_stats.csv``."""
    rows: dict[str, tuple[int, int]] = {}
    with (out / "sbus_stats.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            rows[row["Name"]] = (int(row["Request Count"]), int(row["Failure Count"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--users", type=int, default=20, help="Locust users, spread over scenarios")
    ap.add_argument("--store-url", default=None, help="default: SQLite in a temporary directory")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--token", action="store_true", help="token mode and the token scenario")
    ap.add_argument("locust_args", nargs="*", help="passed to Locust (after --)")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sbus-locust-"))
    bus: ServerProc | None = None
    try:
        url = args.store_url or f"sqlite:///{workdir / 'locust.db'}"
        bus_env: dict[str, str] = {}
        locust_env: dict[str, str] = {}
        extra = list(args.locust_args)
        if args.token:
            bus_env = {"SBUS_AUTH": "token", "SBUS_SECRET": secrets.token_hex(32)}
            locust_env = {
                "SBUS_LOCUST_TOKEN": issue_token(bus_env),
                "SBUS_LOCUST_PREFIX": f"locust/{secrets.token_hex(5)}/",
            }
            extra += ["--tags", "token"]
        bus = start_bus(
            url, free_port(), args.workers, workdir / "bus.log", sbus_command(), env=bus_env
        )
        code = run_locust(bus.url, args.out, args.seconds, args.users, extra, locust_env)
        print(f"locust_run: exit {code}; CSV and HTML in {args.out}")
        return code
    finally:
        if bus is not None:
            bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
