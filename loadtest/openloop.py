"""Open-loop commit latency: cycles sent on a fixed schedule, latency from the schedule.

    .venv/bin/python loadtest/openloop.py --rate 300 --seconds 10          # SQLite bus it starts
    .venv/bin/python loadtest/openloop.py --url http://127.0.0.1:7000 --rate 100 --json

Cycle ``i`` is due at ``t0 + i / rate``: a recorded GET of a key then a commit at the
version read (loop.py's client). ``--threads`` senders each own one key, so cycles never
conflict; a sender takes the next due cycle, waits for its time if early, and starts at
once if late. The latency of a cycle is measured from when it was DUE, not from when it
was sent, so a server (or a generator) that falls behind shows it in the figures instead
of slowing the schedule down (no coordinated omission). ``late`` is how long after its due
time a cycle was sent: when it grows, the senders (or the client itself) are the limit.

Reported: the rate achieved, the p50/p99/p99.9 of the commit's completion after the
cycle's due time, and the p50/p99 of the lateness. Without ``--url`` it starts
``sbus serve`` on SQLite in a temporary directory (1 worker).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loop import SBus
from peerlib import ServerProc, free_port, sbus_command, start_bus


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def setup_keys(url: str, keys: list[str]) -> None:
    client = SBus(url, 30)
    for key in keys:
        body = json.dumps({"key": key, "content": "0", "agent_id": "openloop-setup"}).encode()
        status, answer = client.call("POST", "/shard", body)
        if status != 201:
            raise RuntimeError(f"create {key}: {status} {answer}")
    client.conn.close()


def run(url: str, rate: float, seconds: float, threads: int, timeout: float) -> dict[str, Any]:
    tag = f"ol-{int(time.time() * 1000) % 10**9}"
    keys = [f"{tag}/{i}" for i in range(threads)]
    setup_keys(url, keys)
    total = max(1, int(rate * seconds))
    t0 = time.perf_counter() + 0.2
    lock = threading.Lock()
    state = {"next": 0}
    latencies: list[float] = []
    late: list[float] = []
    failures: list[str] = []

    def sender(n: int) -> None:
        client = SBus(url, timeout)
        key, agent = keys[n], f"{tag}-agent-{n}"
        mine_lat, mine_late = [], []
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= total:
                break
            due = t0 + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sent = time.perf_counter()
            try:
                version, value = client.read(key, agent)
                if not client.commit(key, agent, version, value + 1):
                    raise RuntimeError("409 on a key no one else writes")
            except (OSError, RuntimeError, ValueError) as exc:
                with lock:
                    failures.append(str(exc)[:200])
                client.conn.close()
                continue
            done = time.perf_counter()
            mine_lat.append((done - due) * 1000)
            mine_late.append((sent - due) * 1000)
        client.conn.close()
        with lock:
            latencies.extend(mine_lat)
            late.extend(mine_late)

    workers = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds * 3 + timeout + 30)
    elapsed = time.perf_counter() - t0
    return {
        "rate": rate,
        "achieved_rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "cycles": len(latencies),
        "failures": len(failures),
        "failure_samples": failures[:5],
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "p999_ms": percentile(latencies, 0.999),
        "late_p50_ms": percentile(late, 0.5),
        "late_p99_ms": percentile(late, 0.99),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="a running bus (loopback); default: start one")
    ap.add_argument("--rate", type=float, default=100.0, help="cycles per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=64, help="senders, one key each")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    workdir: Path | None = None
    server: ServerProc | None = None
    try:
        url = args.url
        if url is None:
            workdir = Path(tempfile.mkdtemp(prefix="sbus-openloop-"))
            store = f"sqlite:///{workdir / 'openloop.db'}"
            server = start_bus(store, free_port(), 1, workdir / "bus.log", sbus_command())
            url = server.url
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"openloop: {url} is not a loopback URL")
        result = run(url, args.rate, args.seconds, args.threads, args.timeout)
    finally:
        if server is not None:
            server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>16}: {value}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
