"""What the Python client SDK costs its caller, and what an Idempotency-Key costs the bus.

Both halves run against a real ``sbus serve`` process this script starts (SQLite in a temp
dir, one worker; ``--store postgres|redis`` takes the URL scripts/with-services.sh
exports), in one run, so every ratio compares figures measured on the same server and
machine load:

1. ``client``: CPU of THIS process per GET+commit cycle (``Session.read`` then
   ``Session.commit``) through ``sbus_client``, and through plain httpx sending
   byte-identical requests: the raw requests are built from what the SDK sent (method,
   path and query, every header, a fresh ``Idempotency-Key`` of the SDK's format, the
   body bytes), and the script checks that equality on one cycle before timing anything.
   The server's CPU is not in these figures (another process). Rounds alternate the two
   and the median of the per-round ratios SDK ÷ raw is reported; the target is <= 1.15.
2. ``server``: commits/s and the bus process's CPU per commit (from /proc, the process
   and its workers; the PostgreSQL or Redis server's beside it) for single-key commits with
   and without an ``Idempotency-Key``:
   ``--agents`` concurrent clients commit their own keys in a closed loop; rounds
   alternate the two modes and report medians and the ratio with ÷ without.

    .venv/bin/python loadtest/sdk_bench.py
    scripts/with-services.sh .venv/bin/python loadtest/sdk_bench.py --store postgres

Nothing here gates anything: the figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench import (
    STORE_KINDS,
    Deployment,
    cpu_seconds,
    loadavg,
    start_deployment,
    stop_deployment,
    wait_ready,
)

KEY = "bench/cycle"
AGENT = "bench-agent"
TARGET = 1.15


# --------------------------------------------------------------------------- server half


@dataclass
class ServerRound:
    mode: str  # "plain" or "idempotent"
    commits: int
    seconds: float
    server_cpu_s: float | None
    db_cpu_s: float | None  # the PostgreSQL or Redis server's, when found in /proc

    @property
    def per_second(self) -> float:
        return self.commits / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_commit(self) -> float | None:
        return self._per_commit(self.server_cpu_s)

    @property
    def db_ms_per_commit(self) -> float | None:
        return self._per_commit(self.db_cpu_s)

    def _per_commit(self, seconds: float | None) -> float | None:
        if seconds is None or not self.commits:
            return None
        return seconds / self.commits * 1000


async def commit_loop(
    client: httpx.AsyncClient, key: str, idempotent: bool, until: float, counted_from: float
) -> int:
    """Commit ``key`` again and again until ``until``; the commits answered after
    ``counted_from`` are counted. Each commit is a 200 (the key is this agent's own)."""
    resp = await client.get(f"/shard/{key}", params={"record": "false"})
    resp.raise_for_status()
    version: int = resp.json()["version"]
    counted = 0
    while time.monotonic() < until:
        headers = {"Content-Type": "application/json"}
        if idempotent:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        body = {"key": key, "expected_version": version, "delta": f"v{version}", "agent_id": key}
        resp = await client.post("/commit/v2", content=json.dumps(body), headers=headers)
        if resp.status_code != 200:
            raise SystemExit(f"sdk_bench: commit answered {resp.status_code}: {resp.text}")
        version += 1
        if time.monotonic() >= counted_from:
            counted += 1
    return counted


async def server_round(
    dep: Deployment, mode: str, agents: int, seconds: float, warmup: float
) -> ServerRound:
    url = dep.urls[0]
    clients = [httpx.AsyncClient(base_url=url, timeout=10.0) for _ in range(agents)]
    try:
        keys = [f"idem/{mode}/{uuid.uuid4().hex[:8]}/{i}" for i in range(agents)]
        for client, key in zip(clients, keys, strict=True):
            resp = await client.post("/shard", json={"key": key, "content": ""})
            resp.raise_for_status()
        start = time.monotonic()
        counted_from = start + warmup
        until = counted_from + seconds

        async def sample_at(moment: float) -> tuple[float | None, float | None]:
            await asyncio.sleep(max(0.0, moment - time.monotonic()))
            return cpu_seconds(dep.pids), cpu_seconds(dep.db_pids)

        cpu_task = asyncio.gather(sample_at(counted_from), sample_at(until))
        counts = await asyncio.gather(
            *(
                commit_loop(c, k, mode == "idempotent", until, counted_from)
                for c, k in zip(clients, keys, strict=True)
            )
        )
        (bus_start, db_start), (bus_end, db_end) = await cpu_task
    finally:
        for client in clients:
            await client.aclose()
    return ServerRound(
        mode, sum(counts), seconds, difference(bus_start, bus_end), difference(db_start, db_end)
    )


def difference(start: float | None, end: float | None) -> float | None:
    return end - start if start is not None and end is not None else None


# --------------------------------------------------------------------------- client half


@dataclass(frozen=True)
class Sent:
    """One request as it left the client: what the bus sees of it."""

    method: str
    target: str  # path and query
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    @classmethod
    def of(cls, request: httpx.Request) -> Sent:
        return cls(
            request.method,
            request.url.raw_path.decode(),
            tuple(request.headers.raw),
            request.read(),
        )


class RawClient:
    """Plain httpx, sending what the SDK sends: built from one SDK cycle's requests."""

    def __init__(self, http: httpx.Client, read: Sent, commit: Sent) -> None:
        self.http = http
        self.read_target = read.target
        self.read_headers = _sendable(read.headers)
        self.commit_target = commit.target
        self.commit_headers = _sendable(commit.headers)
        self.commit_fields = json.loads(commit.body)  # the SDK's field order
        self.idem_at = [k.lower() for k, _ in self.commit_headers].index("idempotency-key")

    def build_commit(self, version: int, content: str, idem_key: str) -> httpx.Request:
        body = dict(self.commit_fields, expected_version=version, delta=content)
        headers = list(self.commit_headers)
        headers[self.idem_at] = (headers[self.idem_at][0], idem_key)
        return self.http.build_request(
            "POST",
            self.commit_target,
            headers=headers,
            content=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
        )

    def build_read(self) -> httpx.Request:
        return self.http.build_request("GET", self.read_target, headers=self.read_headers)

    def cycle(self) -> None:
        """GET then commit at that version, reading the answers as the SDK does."""
        resp = self.http.send(self.build_read())
        if resp.status_code != 200:
            raise SystemExit(f"sdk_bench: raw GET answered {resp.status_code}: {resp.text}")
        shard = resp.json()
        version: int = shard["version"]
        resp = self.http.send(self.build_commit(version, f"v{version + 1}", uuid.uuid4().hex))
        if resp.status_code != 200:
            raise SystemExit(f"sdk_bench: raw commit answered {resp.status_code}: {resp.text}")
        resp.json()


def _sendable(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]]:
    """Headers to hand httpx, which adds Host and Content-Length itself (where it put
    them is checked by the byte-for-byte comparison)."""
    skip = {b"host", b"content-length"}
    return [(k.decode(), v.decode()) for k, v in raw if k.lower() not in skip]


def sdk_cycle(session: Any) -> None:
    shard = session.read(KEY)
    session.commit(KEY, f"v{shard.version + 1}", expected=shard)


def cpu_per_cycle(cycle: Callable[[], None], cycles: int) -> float:
    """Milliseconds of this process's CPU per cycle."""
    start = time.process_time()
    for _ in range(cycles):
        cycle()
    return (time.process_time() - start) / cycles * 1000


def client_rounds(url: str, rounds: int, cycles: int, warmup: int) -> list[tuple[float, float]]:
    """(SDK ms, raw ms) per round, after checking that both send the same bytes."""
    from sbus_client import Bus

    sent: list[Sent] = []

    def capture(request: httpx.Request) -> None:
        sent.append(Sent.of(request))

    with (
        httpx.Client(base_url=url, timeout=10.0) as sdk_http,
        httpx.Client(base_url=url, timeout=10.0) as raw_http,
    ):
        resp = raw_http.post("/shard", json={"key": KEY, "content": "v0"})
        resp.raise_for_status()
        bus = Bus(url, agent_id=AGENT, http_client=sdk_http)
        with bus.session(keep=True) as session:
            sdk_cycle(session)  # the version check happens on the first call: not timed
            sdk_http.event_hooks["request"] = [capture]
            sdk_cycle(session)
            sdk_http.event_hooks["request"] = []
            read, commit = sent[-2:]
            raw = RawClient(raw_http, read, commit)
            check_identical(raw, read, commit)
            for _ in range(warmup):
                sdk_cycle(session)
                raw.cycle()
            results = []
            for r in range(rounds):
                # Alternate which goes first so a drift in machine load favours neither.
                if r % 2 == 0:
                    sdk_ms = cpu_per_cycle(lambda: sdk_cycle(session), cycles)
                    raw_ms = cpu_per_cycle(raw.cycle, cycles)
                else:
                    raw_ms = cpu_per_cycle(raw.cycle, cycles)
                    sdk_ms = cpu_per_cycle(lambda: sdk_cycle(session), cycles)
                results.append((sdk_ms, raw_ms))
    return results


def check_identical(raw: RawClient, read: Sent, commit: Sent) -> None:
    """The raw client's requests for the SDK's inputs are the SDK's requests, byte for
    byte: the same method, target, headers (names, values, order) and body."""
    body = json.loads(commit.body)
    idem = dict((k.lower(), v) for k, v in commit.headers)[b"idempotency-key"].decode()
    pairs = [
        ("GET", Sent.of(raw.build_read()), read),
        (
            "commit",
            Sent.of(raw.build_commit(body["expected_version"], body["delta"], idem)),
            commit,
        ),
    ]
    for what, mine, theirs in pairs:
        if mine != theirs:
            raise SystemExit(f"sdk_bench: the raw {what} differs from the SDK's:\n{mine}\n{theirs}")
    fresh = uuid.uuid4().hex
    if len(fresh) != len(idem) or not all(c in "0123456789abcdef" for c in idem):
        raise SystemExit(f"sdk_bench: the SDK's Idempotency-Key {idem!r} has another format")


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


async def amain(args: argparse.Namespace) -> int:
    load_before = loadavg()
    dep = start_deployment(args)
    try:
        await wait_ready(dep)
        report: dict[str, Any] = {"store": dep.kind, "loadavg_before": load_before}
        if "client" in args.parts:
            pairs = await asyncio.to_thread(
                client_rounds, dep.urls[0], args.rounds, args.cycles, args.warmup_cycles
            )
            ratios = [s / r for s, r in pairs]
            report["client"] = {
                "sdk_ms_per_cycle": statistics.median(s for s, _ in pairs),
                "raw_ms_per_cycle": statistics.median(r for _, r in pairs),
                "ratio_median": statistics.median(ratios),
                "ratios": ratios,
                "target": TARGET,
            }
        if "server" in args.parts:
            rounds: list[ServerRound] = []
            for r in range(args.rounds):
                order = ("plain", "idempotent") if r % 2 == 0 else ("idempotent", "plain")
                for mode in order:
                    rounds.append(
                        await server_round(dep, mode, args.agents, args.seconds, args.warmup)
                    )
            report["server"] = {mode: summarize(rounds, mode) for mode in ("plain", "idempotent")}
            plain, idem = report["server"]["plain"], report["server"]["idempotent"]
            report["server"]["commits_ratio"] = ratio(idem["commits_per_s"], plain["commits_per_s"])
            report["server"]["cpu_ratio"] = ratio(
                idem["cpu_ms_per_commit"], plain["cpu_ms_per_commit"]
            )
            report["server"]["db_ratio"] = ratio(
                idem["db_ms_per_commit"], plain["db_ms_per_commit"]
            )
        report["loadavg_after"] = loadavg()
    finally:
        stop_deployment(dep)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


def summarize(rounds: list[ServerRound], mode: str) -> dict[str, Any]:
    mine = [r for r in rounds if r.mode == mode]
    cpu = [c for r in mine if (c := r.cpu_ms_per_commit) is not None]
    db = [c for r in mine if (c := r.db_ms_per_commit) is not None]
    return {
        "commits_per_s": statistics.median(r.per_second for r in mine),
        "cpu_ms_per_commit": statistics.median(cpu) if cpu else None,
        "db_ms_per_commit": statistics.median(db) if db else None,
        "rounds": [(round(r.per_second, 1), r.cpu_ms_per_commit) for r in mine],
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"store {report['store']}, load average before {report['loadavg_before']}")
    client = report.get("client")
    if client:
        print(
            f"client CPU per GET+commit cycle: SDK {client['sdk_ms_per_cycle']:.3f} ms, "
            f"raw httpx {client['raw_ms_per_cycle']:.3f} ms; SDK ÷ raw median "
            f"{client['ratio_median']:.3f} (rounds "
            f"{', '.join(f'{x:.2f}' for x in client['ratios'])}; target <= {TARGET})"
        )
    server = report.get("server")
    if server:
        for mode in ("plain", "idempotent"):
            row = server[mode]
            print(
                f"server, {mode:>10} commits: {row['commits_per_s']:.0f} commits/s, "
                f"{fmt(row['cpu_ms_per_commit'], '.3f')} ms bus CPU per commit, "
                f"{fmt(row['db_ms_per_commit'], '.3f')} ms database CPU per commit"
            )
        print(
            f"with ÷ without Idempotency-Key: commits/s {fmt(server['commits_ratio'], '.3f')}, "
            f"bus CPU per commit {fmt(server['cpu_ratio'], '.3f')}, "
            f"database CPU per commit {fmt(server['db_ratio'], '.3f')}"
        )
    print(f"load average after: {report['loadavg_after']} (2 cores is 2.0)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--store", default="sqlite", choices=STORE_KINDS, help="store kind")
    p.add_argument("--store-url", default=None, help="explicit store URL (overrides --store)")
    p.add_argument("--parts", default="client,server", help="client, server or both")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds per part")
    p.add_argument("--cycles", type=int, default=2000, help="client: timed cycles per round")
    p.add_argument("--warmup-cycles", type=int, default=200, help="client: untimed cycles")
    p.add_argument("--agents", type=int, default=16, help="server: concurrent committers")
    p.add_argument("--seconds", type=float, default=5.0, help="server: measured s per round")
    p.add_argument("--warmup", type=float, default=1.0, help="server: unmeasured s per round")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or any(x not in ("client", "server") for x in args.parts):
        p.error("--parts takes client, server or client,server")
    if min(args.rounds, args.cycles, args.agents) < 1 or args.seconds <= 0 or args.warmup < 0:
        p.error("--rounds, --cycles and --agents must be >= 1, --seconds > 0")
    # What bench.start_deployment reads: one replica, one worker, a server it starts.
    args.url, args.replicas, args.workers = None, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
