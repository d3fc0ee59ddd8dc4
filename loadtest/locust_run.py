"""Run loadtest/locustfile.py headless against a bus this script starts (``make loadtest``).

    .venv/bin/python loadtest/locust_run.py                       # SQLite, 60 s, 20 users
    .venv/bin/python loadtest/locust_run.py --seconds 10 --users 10 --out /tmp/lc
    .venv/bin/python loadtest/locust_run.py --store-url redis://127.0.0.1:6379/0 --workers 2

It starts ``sbus serve`` (open mode, loopback, a free port; SQLite in a temporary
directory unless ``--store-url`` names another store), runs Locust as its own process
(it patches the standard library with gevent) and writes ``<out>/sbus_stats.csv``,
``sbus_failures.csv``, ``sbus_stats_history.csv``, ``sbus_exceptions.csv`` and
``sbus.html``; then stops the bus. The exit code is Locust's: 1 when a request failed.
"""

from __future__ import annotations

import argparse
import csv
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
    host: str, out: Path, seconds: int, users: int, extra: list[str] | None = None
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    locust = Path(sys.executable).parent / "locust"
    cmd = [str(locust)] if locust.exists() else [sys.executable, "-m", "locust"]
    cmd += ["-f", str(LOCUSTFILE), "--host", host, "--headless", "--only-summary"]
    cmd += ["-u", str(users), "-r", str(max(1, users)), "-t", f"{seconds}s"]
    cmd += ["--stop-timeout", "5", "--csv", str(out / "sbus"), "--html", str(out / "sbus.html")]
    cmd += extra or []
    done = subprocess.run(cmd, timeout=seconds + 120, check=False)
    return done.returncode


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
    ap.add_argument("locust_args", nargs="*", help="passed to Locust (after --)")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sbus-locust-"))
    bus: ServerProc | None = None
    try:
        url = args.store_url or f"sqlite:///{workdir / 'locust.db'}"
        bus = start_bus(url, free_port(), args.workers, workdir / "bus.log", sbus_command())
        code = run_locust(bus.url, args.out, args.seconds, args.users, args.locust_args)
        print(f"locust_run: exit {code}; CSV and HTML in {args.out}")
        return code
    finally:
        if bus is not None:
            bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
