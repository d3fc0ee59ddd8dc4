"""HTTP load benchmark: commit throughput against the trivial-endpoint ceiling.

One asyncio load generator (httpx, a FIXED pool of 64 connections shared by 64
concurrent agents) drives one S-Bus deployment through four phases in ONE run, so
every ratio compares figures measured on the same server, worker count and machine
load:

0. ``ceiling``:   GET /livez at full concurrency (what the HTTP stack alone allows).
1. ``dedicated``: each agent GETs its own shard (with agent_id) and commits it.
2. ``hotspot``:   every agent GETs then commits the same shard; a 409 means re-read
                  and retry (counted as a conflict).
3. ``cross``:     each agent GETs 4 shared shards plus its own and commits its own
                  with the 4 shared ones as explicit read_set (its DeliveryLog holds
                  them too); one extra writer agent (own connection) commits a shared
                  shard once per 256 agent commits, so some commits fail 409
                  CrossShardStale and are retried after re-reading.

Each phase: POST /admin/reset, set-up, a warm-up (not measured), then a fixed
measuring window; every loop checks a deadline, every request has a timeout.
Reported per phase: commits/s (successful), requests/s, p50/p99 commit latency,
conflict rate (409s / commit attempts), server CPU per request (when this script
started the server) and the ratio commit-throughput / ceiling req/s.

Deployments are described by a store kind and a replica count so later stores slot
in: ``--store sqlite|memory`` (temp dir, default sqlite) or ``--store-url URL`` for
any URL ``sbus serve --store`` accepts (e.g. a PostgreSQL or Redis DSN), ``--workers
N`` per replica, ``--replicas N`` bus processes on one shared store (agents are
spread round-robin over replicas), or ``--url URL[,URL...]`` to target servers that
are already running (they need SBUS_ADMIN_ENABLED=1). Loopback only.

    .venv/bin/python loadtest/bench.py [--store sqlite] [--workers 1] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

CONNECTIONS = 64
JSON_HEADERS = {"content-type": "application/json"}
CONTENT = "x" * 64
SHARED_KEYS = [f"shared/{i}" for i in range(4)]
PHASES = ("ceiling", "dedicated", "hotspot", "cross")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
TARGET_RATIO = 0.3


# --------------------------------------------------------------------------- deployment


def store_url(kind: str, workdir: Path) -> str:
    """The store URL for a store kind. A later issue adds postgres/redis here (or passes
    --store-url with a DSN started by the recipes in notes/services.md)."""
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    if kind == "memory":
        return "memory://"
    raise SystemExit(f"bench: unknown --store {kind!r}; use --store-url for other stores")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sbus_command() -> list[str]:
    exe = Path(sys.executable).parent / "sbus"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("sbus")
    if found:
        return [found]
    return [sys.executable, "-c", "from sbus.cli import main; main()"]


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def cpu_seconds(root_pids: list[int]) -> float | None:
    """utime + stime of the given processes and all their descendants (Linux /proc)."""
    if not root_pids or not Path("/proc/self/stat").exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    children = _proc_children()
    total = 0
    stack = list(root_pids)
    while stack:
        pid = stack.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
        stack.extend(children.get(pid, []))
    return total / tick


@dataclass
class Deployment:
    urls: list[str]
    store: str
    workers: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def start_deployment(args: argparse.Namespace) -> Deployment:
    if args.url:
        urls = [u.strip().rstrip("/") for u in args.url.split(",") if u.strip()]
        for u in urls:
            if urlsplit(u).hostname not in LOOPBACK:
                raise SystemExit(f"bench: {u} is not a loopback URL")
        return Deployment(urls=urls, store="external", workers=args.workers)
    workdir = Path(tempfile.mkdtemp(prefix="sbus-bench-"))
    url = args.store_url or store_url(args.store, workdir)
    if args.replicas > 1 and url.startswith("memory"):
        shutil.rmtree(workdir, ignore_errors=True)
        raise SystemExit("bench: the memory store cannot be shared by several replicas")
    env = dict(os.environ, SBUS_ADMIN_ENABLED="1", SBUS_HOST="127.0.0.1")
    dep = Deployment(urls=[], store=url, workers=args.workers, workdir=workdir)
    for i in range(args.replicas):
        port = free_port()
        cmd = [*sbus_command(), "serve", "--port", str(port), "--store", url]
        cmd += ["--workers", str(args.workers)]
        log = (workdir / f"server-{i}.log").open("wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        dep.procs.append(proc)
        dep.urls.append(f"http://127.0.0.1:{port}")
    return dep


async def wait_ready(dep: Deployment, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        for url in dep.urls:
            while True:
                for proc in dep.procs:
                    if proc.poll() is not None:
                        raise SystemExit(f"bench: server exited with {proc.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(f"{url}/admin/health")
                    if r.status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {url} not ready after {limit_s:.0f}s")
                await asyncio.sleep(0.1)


def stop_deployment(dep: Deployment) -> None:
    for proc in dep.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in dep.procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if dep.workdir is not None:
        shutil.rmtree(dep.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- measuring


@dataclass
class Window:
    """The measuring window of a phase: only requests that start inside it count."""

    start: float
    end: float

    def inside(self, t0: float) -> bool:
        return self.start <= t0 < self.end


@dataclass
class Tally:
    requests: int = 0
    commit_attempts: int = 0
    commits: int = 0
    conflicts: int = 0
    stale: int = 0
    errors: int = 0
    commit_latency_ms: list[float] = field(default_factory=list)
    request_latency_ms: list[float] = field(default_factory=list)
    other_commits: int = 0  # commits by the cross phase's shared-shard writers
    all_commits: int = 0  # successful agent commits, warm-up included
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    seconds: float
    requests_per_s: float
    commits_per_s: float
    commit_attempts: int
    commits: int
    conflicts: int
    conflict_rate: float
    cross_shard_stale: int
    errors: int
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_request: float | None
    server_cpu_ms_per_commit: float | None
    server_cpu_util: float | None
    client_cpu_util: float
    other_commits_per_s: float
    ratio_commits_to_ceiling: float | None = None
    ratio_requests_to_ceiling: float | None = None
    # ceiling's server CPU per /livez over this phase's server CPU per successful commit:
    # the commits/ceiling ratio a CPU-bound server would show, whatever the generator.
    cpu_ratio_commits_to_ceiling: float | None = None
    error_samples: tuple[str, ...] = ()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class Bench:
    def __init__(self, dep: Deployment, args: argparse.Namespace) -> None:
        self.dep = dep
        self.args = args
        timeout = httpx.Timeout(args.timeout)
        ctx = ssl.create_default_context()
        if args.pool == "shared":
            # One pool of 64. httpcore 1.0's pool bookkeeping is quadratic in the pool
            # size (``_assign_requests_to_connections``): at 64 busy connections it
            # burns the generator's CPU and caps it near 100 req/s here.
            shared = httpx.AsyncClient(
                limits=httpx.Limits(
                    max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS
                ),
                timeout=timeout,
            )
            self.clients = [shared]
        else:
            # The same 64 connections as 64 pools of one (a client per connection).
            # Plain http only, so one SSL context is built and shared (each client
            # would otherwise load the CA bundle: ~50 ms apiece).
            self.clients = [
                httpx.AsyncClient(
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                    timeout=timeout,
                    verify=ctx,
                )
                for _ in range(CONNECTIONS)
            ]
        self.client = self.clients[0]
        # The cross phase's shared-shard writers are "other agents" with their own
        # connection each, outside the 64 measured ones.
        self.writer_clients = [
            httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=timeout, verify=ctx)
            for _ in range(args.shared_writers)
        ]

    async def close(self) -> None:
        for client in self.clients + self.writer_clients:
            await client.aclose()

    def url_for(self, agent: int) -> str:
        return self.dep.urls[agent % len(self.dep.urls)]

    def client_for(self, agent: int) -> httpx.AsyncClient:
        return self.clients[agent % len(self.clients)]

    # -- helpers ----------------------------------------------------------------
    async def post(
        self, client: httpx.AsyncClient, base: str, path: str, body: dict[str, Any]
    ) -> httpx.Response:
        return await client.post(f"{base}{path}", content=orjson.dumps(body), headers=JSON_HEADERS)

    async def reset_and_create(self, keys: list[str]) -> None:
        base = self.dep.urls[0]
        r = await self.post(self.client, base, "/admin/reset", {})
        if r.status_code != 200:
            raise SystemExit(f"bench: /admin/reset answered {r.status_code}: {r.text[:200]}")
        sem = asyncio.Semaphore(16)

        async def create(n: int, key: str) -> None:
            async with sem:
                body = {"key": key, "content": CONTENT, "agent_id": "bench-setup"}
                r = await self.post(self.clients[n % len(self.clients)], base, "/shard", body)
                if r.status_code != 201:
                    raise SystemExit(f"bench: create {key} answered {r.status_code}: {r.text}")

        await asyncio.gather(*(create(n, k) for n, k in enumerate(keys)))

    async def read(
        self, client: httpx.AsyncClient, base: str, key: str, agent: str, tally: Tally, w: Window
    ) -> int | None:
        t0 = time.perf_counter()
        r = await client.get(f"{base}/shard/{key}", params={"agent_id": agent})
        if w.inside(t0):
            tally.requests += 1
            tally.request_latency_ms.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                tally.error(f"GET {key}: {r.status_code} {r.text[:120]}")
        if r.status_code != 200:
            return None
        version: int = orjson.loads(r.content)["version"]
        return version

    async def commit(
        self,
        client: httpx.AsyncClient,
        base: str,
        body: dict[str, Any],
        tally: Tally,
        w: Window,
    ) -> tuple[int, dict[str, Any]]:
        t0 = time.perf_counter()
        r = await self.post(client, base, "/commit", body)
        t1 = time.perf_counter()
        payload: dict[str, Any] = orjson.loads(r.content) if r.content else {}
        if r.status_code == 200:
            tally.all_commits += 1
        if w.inside(t0):
            tally.requests += 1
            tally.commit_attempts += 1
            tally.request_latency_ms.append((t1 - t0) * 1000)
            if r.status_code == 200:
                tally.commits += 1
                tally.commit_latency_ms.append((t1 - t0) * 1000)
            elif r.status_code == 409:
                tally.conflicts += 1
                if payload.get("error") == "CrossShardStale":
                    tally.stale += 1
            else:
                tally.error(f"commit: {r.status_code} {r.text[:120]}")
        return r.status_code, payload

    # -- agent loops ------------------------------------------------------------
    async def ceiling_agent(self, i: int, tally: Tally, w: Window) -> None:
        url = f"{self.url_for(i)}/livez"
        get = self.client_for(i).get
        while time.perf_counter() < w.end:
            t0 = time.perf_counter()
            r = await get(url)
            if w.inside(t0):
                tally.requests += 1
                tally.request_latency_ms.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    tally.error(f"livez: {r.status_code}")

    async def dedicated_agent(self, i: int, tally: Tally, w: Window) -> None:
        base, agent, key = self.url_for(i), f"agent-{i}", f"own/{i}"
        c = self.client_for(i)
        while time.perf_counter() < w.end:
            version = await self.read(c, base, key, agent, tally, w)
            if version is None:
                await asyncio.sleep(0.01)
                continue
            body = {"key": key, "expected_version": version, "delta": CONTENT, "agent_id": agent}
            await self.commit(c, base, body, tally, w)

    async def hotspot_agent(self, i: int, tally: Tally, w: Window) -> None:
        base, agent, key = self.url_for(i), f"agent-{i}", "hot"
        c = self.client_for(i)
        while time.perf_counter() < w.end:
            version = await self.read(c, base, key, agent, tally, w)
            if version is None:
                await asyncio.sleep(0.01)
                continue
            body = {"key": key, "expected_version": version, "delta": CONTENT, "agent_id": agent}
            await self.commit(c, base, body, tally, w)  # a 409 loops back to the re-read

    async def cross_agent(self, i: int, tally: Tally, w: Window) -> None:
        base, agent, key = self.url_for(i), f"agent-{i}", f"own/{i}"
        c = self.client_for(i)
        while time.perf_counter() < w.end:
            versions: dict[str, int] = {}
            for shared in SHARED_KEYS:
                v = await self.read(c, base, shared, agent, tally, w)
                if v is not None:
                    versions[shared] = v
            own = await self.read(c, base, key, agent, tally, w)
            if own is None or len(versions) != len(SHARED_KEYS):
                await asyncio.sleep(0.01)
                continue
            body = {
                "key": key,
                "expected_version": own,
                "delta": CONTENT,
                "agent_id": agent,
                "read_set": [{"key": k, "version_at_read": v} for k, v in versions.items()],
            }
            await self.commit(c, base, body, tally, w)  # stale: loop back and re-read all

    async def shared_writer(self, i: int, tally: Tally, w: Window) -> None:
        """Commits one shared shard after every --shared-every successful agent commits
        (counted from the start of the phase), so the rate of stale-making commits is a
        fixed fraction of the agents' own, whatever the machine's speed. One agent
        identity per key, so its own DeliveryLog never makes its commits stale."""
        base = self.url_for(i)
        c = self.writer_clients[i]
        every = self.args.shared_every * max(1, self.args.shared_writers)
        n = i
        threshold = (i + 1) * self.args.shared_every
        quiet = Tally()  # its GETs and commits are not part of the agents' figures
        while time.perf_counter() < w.end:
            if tally.all_commits < threshold:
                await asyncio.sleep(0.005)
                continue
            threshold += every
            key = SHARED_KEYS[n % len(SHARED_KEYS)]
            agent = f"writer-{i}-{key}"
            n += 1
            v = await self.read(c, base, key, agent, quiet, w)
            if v is not None:
                body = {"key": key, "expected_version": v, "delta": CONTENT, "agent_id": agent}
                status, _ = await self.commit(c, base, body, quiet, w)
                if status == 200 and w.inside(time.perf_counter()):
                    tally.other_commits += 1
                elif status != 200:
                    tally.error(f"shared writer commit: {status}")

    # -- phases -----------------------------------------------------------------
    async def run_phase(self, name: str) -> PhaseResult:
        agents = self.args.agents
        loops: list[Callable[[int, Tally, Window], Awaitable[None]]]
        if name == "ceiling":
            loops = [self.ceiling_agent] * agents
        elif name == "dedicated":
            await self.reset_and_create([f"own/{i}" for i in range(agents)])
            loops = [self.dedicated_agent] * agents
        elif name == "hotspot":
            await self.reset_and_create(["hot"])
            loops = [self.hotspot_agent] * agents
        elif name == "cross":
            await self.reset_and_create(SHARED_KEYS + [f"own/{i}" for i in range(agents)])
            loops = [self.cross_agent] * agents
        else:
            raise ValueError(name)
        writers = self.args.shared_writers if name == "cross" else 0
        now = time.perf_counter()
        window = Window(now + self.args.warmup, now + self.args.warmup + self.args.seconds)
        tally = Tally()
        tasks = [loop(i, tally, window) for i, loop in enumerate(loops)]
        tasks += [self.shared_writer(j, tally, window) for j in range(writers)]
        await asyncio.sleep(0)
        cpu0: float | None = None
        client0 = 0.0

        async def sample_start() -> None:
            nonlocal cpu0, client0
            await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
            cpu0 = cpu_seconds(self.dep.pids)
            client0 = time.process_time()

        cpu1: float | None = None
        client1 = 0.0

        async def sample_end() -> None:
            nonlocal cpu1, client1
            await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
            cpu1 = cpu_seconds(self.dep.pids)
            client1 = time.process_time()

        limit = self.args.warmup + self.args.seconds + self.args.timeout + 5
        await asyncio.wait_for(asyncio.gather(sample_start(), sample_end(), *tasks), limit)
        secs = self.args.seconds
        server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        return PhaseResult(
            phase=name,
            seconds=secs,
            requests_per_s=tally.requests / secs,
            commits_per_s=tally.commits / secs,
            commit_attempts=tally.commit_attempts,
            commits=tally.commits,
            conflicts=tally.conflicts,
            conflict_rate=tally.conflicts / tally.commit_attempts if tally.commit_attempts else 0,
            cross_shard_stale=tally.stale,
            errors=tally.errors,
            p50_ms=percentile(
                tally.commit_latency_ms if name != "ceiling" else tally.request_latency_ms, 0.5
            ),
            p99_ms=percentile(
                tally.commit_latency_ms if name != "ceiling" else tally.request_latency_ms, 0.99
            ),
            server_cpu_ms_per_request=(
                server_cpu * 1000 / tally.requests if server_cpu and tally.requests else None
            ),
            server_cpu_ms_per_commit=(
                server_cpu * 1000 / tally.commits if server_cpu and tally.commits else None
            ),
            server_cpu_util=server_cpu / secs if server_cpu is not None else None,
            client_cpu_util=(client1 - client0) / secs,
            other_commits_per_s=tally.other_commits / secs,
            error_samples=tuple(tally.error_samples),
        )


def with_ratios(results: list[PhaseResult]) -> list[PhaseResult]:
    ceiling = next((r for r in results if r.phase == "ceiling"), None)
    if ceiling is None or ceiling.requests_per_s == 0:
        return results
    out = []
    for r in results:
        base = asdict(r)
        base["error_samples"] = r.error_samples
        if r.phase != "ceiling":
            base["ratio_commits_to_ceiling"] = r.commits_per_s / ceiling.requests_per_s
            if ceiling.server_cpu_ms_per_request and r.server_cpu_ms_per_commit:
                base["cpu_ratio_commits_to_ceiling"] = (
                    ceiling.server_cpu_ms_per_request / r.server_cpu_ms_per_commit
                )
        base["ratio_requests_to_ceiling"] = r.requests_per_s / ceiling.requests_per_s
        out.append(PhaseResult(**base))
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[PhaseResult], dep: Deployment, args: argparse.Namespace) -> Iterator[str]:
    yield (
        f"S-Bus HTTP bench: store {dep.store}, {len(dep.urls)} replica(s) x {dep.workers} "
        f"worker(s), {args.agents} agents over {CONNECTIONS} connections, "
        f"{args.seconds:g}s per phase after {args.warmup:g}s warm-up, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{args.loop} loop, {args.pool} pool"
    )
    header = (
        f"{'phase':<10}{'commits/s':>10}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'conflict':>9}{'stale':>7}{'errors':>7}{'xceil':>7}{'req/ceil':>9}"
        f"{'srv ms/req':>11}{'ms/commit':>10}{'cpu xceil':>10}{'srv cpu':>8}{'gen cpu':>8}"
    )
    yield header
    yield "-" * len(header)
    for r in results:
        commits = "-" if r.phase == "ceiling" else f"{r.commits_per_s:,.0f}"
        conflict = "-" if r.phase == "ceiling" else f"{r.conflict_rate:.1%}"
        yield (
            f"{r.phase:<10}{commits:>10}{r.requests_per_s:>9,.0f}{r.p50_ms:>8.1f}"
            f"{r.p99_ms:>8.1f}{conflict:>9}{r.cross_shard_stale:>7}{r.errors:>7}"
            f"{_fmt(r.ratio_commits_to_ceiling, '.2f'):>7}"
            f"{_fmt(r.ratio_requests_to_ceiling, '.2f'):>9}"
            f"{_fmt(r.server_cpu_ms_per_request, '.3f'):>11}"
            f"{_fmt(r.server_cpu_ms_per_commit, '.2f'):>10}"
            f"{_fmt(r.cpu_ratio_commits_to_ceiling, '.3f'):>10}"
            f"{_fmt(r.server_cpu_util, '.2f'):>8}{r.client_cpu_util:>8.2f}"
        )
    yield ""
    yield "p50/p99: commit latency (ceiling: /livez latency). conflict: 409s / commit attempts."
    yield "xceil: successful commits/s / ceiling req/s. srv/gen cpu: cores busy (server, load gen)."
    yield (
        "srv ms/req, ms/commit: server CPU (all its processes) per request / per successful "
        "commit; cpu xceil: ceiling ms/req / ms/commit (the ratio if the server were the "
        "bottleneck)."
    )
    for r in results:
        if r.phase == "cross":
            yield f"cross: shared-shard writers committed {r.other_commits_per_s:.1f}/s."
        for sample in r.error_samples:
            yield f"{r.phase} error: {sample}"
    for r in results:
        if r.ratio_commits_to_ceiling is not None and r.phase == "dedicated":
            verdict = "met" if r.ratio_commits_to_ceiling >= TARGET_RATIO else "MISSED"
            yield (
                f"target dedicated commits/s >= {TARGET_RATIO}x ceiling: "
                f"{r.ratio_commits_to_ceiling:.2f}x ({verdict})"
            )


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


async def amain(args: argparse.Namespace) -> int:
    load_before = loadavg()
    dep = start_deployment(args)
    try:
        await wait_ready(dep)
        bench = Bench(dep, args)
        try:
            results = []
            for name in args.phases:
                results.append(await bench.run_phase(name))
                if not args.json:
                    print(f"  {name}: done", file=sys.stderr)
            with contextlib.suppress(httpx.HTTPError):
                await bench.post(bench.client, dep.urls[0], "/admin/reset", {})
        finally:
            await bench.close()
    finally:
        stop_deployment(dep)
    results = with_ratios(results)
    load_after = loadavg()
    if args.json:
        doc = {
            "store": dep.store,
            "replicas": len(dep.urls),
            "workers": dep.workers,
            "agents": args.agents,
            "connections": CONNECTIONS,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loop": args.loop,
            "pool": args.pool,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "phases": [asdict(r) for r in results],
        }
        print(json.dumps(doc, indent=2))
    else:
        for line in table(results, dep, args):
            print(line)
        print(f"load average before/after: {load_before} / {load_after} (2 cores is 2.0)")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--store", default="sqlite", help="store kind started in a temp dir")
    p.add_argument("--store-url", default=None, help="explicit store URL (overrides --store)")
    p.add_argument("--workers", type=int, default=1, help="worker processes per replica")
    p.add_argument("--replicas", type=int, default=1, help="bus processes on one store")
    p.add_argument("--url", default=None, help="comma-separated running server URL(s)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per phase")
    p.add_argument("--agents", type=int, default=64, help="concurrent agents")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (s)")
    p.add_argument("--shared-writers", type=int, default=1, help="cross: shared-shard writers")
    p.add_argument(
        "--shared-every",
        type=int,
        default=256,
        help="cross: one shared-shard commit per this many successful agent commits",
    )
    p.add_argument(
        "--pool",
        choices=("per-agent", "shared"),
        default="per-agent",
        help="64 one-connection clients, or one httpx pool of 64 (slow: see docs)",
    )
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    for name in args.phases:
        if name not in PHASES:
            p.error(f"unknown phase {name!r}")
    if args.seconds <= 0 or args.seconds > 600 or args.warmup < 0 or args.warmup > 60:
        p.error("--seconds must be in (0, 600] and --warmup in [0, 60]")
    if args.replicas < 1 or args.workers < 1 or args.agents < 1:
        p.error("--replicas, --workers and --agents must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            args.loop = "asyncio"
        else:
            return uvloop.run(amain(args))
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
