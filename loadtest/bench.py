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

With PostgreSQL or Redis a reference phase runs too, in the same run:

R. ``rawcas``:    the database's own compare-and-swap rate driven directly from this
                  Python process (loadtest/cas.py): asyncpg ``UPDATE ... WHERE k = $1
                  AND version = $3`` over 64 connections, or EVALSHA of an equivalent
                  Lua CAS from 64 tasks; one row/key per task (the dedicated topology
                  with no S-Bus in between).

Deployments: ``--store sqlite|memory|postgres|redis`` (sqlite in a temp dir; postgres and
redis take ``--store-url`` or SBUS_TEST_POSTGRES_URL / SBUS_TEST_REDIS_URL, which
scripts/with-services.sh exports; PostgreSQL is migrated with ``sbus migrate`` first,
Redis must have maxmemory-policy noeviction), or ``--store-url URL`` alone for any URL
``sbus serve --store`` accepts; ``--workers N`` per replica (default: the core count for
PostgreSQL and Redis, 1 otherwise, as ``sbus serve``), ``--replicas N`` bus processes on
one shared store (agents spread round-robin), or ``--url URL[,URL...]`` to target
servers already running (they need SBUS_ADMIN_ENABLED=1). Loopback only. The CPU of the
database server (found by its port in /proc) is reported beside the bus's.

    scripts/with-services.sh .venv/bin/python loadtest/bench.py --store postgres --workers 2
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

from cas import CasResult, raw_cas

CONNECTIONS = 64
JSON_HEADERS = {"content-type": "application/json"}
CONTENT = "x" * 64
SHARED_KEYS = [f"shared/{i}" for i in range(4)]
PHASES = ("ceiling", "rawcas", "dedicated", "hotspot", "cross")
STORE_KINDS = ("sqlite", "memory", "postgres", "redis")
ENV_URLS = {"postgres": "SBUS_TEST_POSTGRES_URL", "redis": "SBUS_TEST_REDIS_URL"}
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# dedicated commits/s over the ceiling's req/s, per store (the targets in loadtest/README.md).
TARGETS = {"sqlite": 0.3, "memory": 0.3, "postgres": 0.25, "redis": 0.3}


# --------------------------------------------------------------------------- deployment


def store_kind(url: str) -> str:
    if url.startswith("sqlite"):
        return "sqlite"
    if url.startswith("memory"):
        return "memory"
    if url.startswith(("postgresql", "postgres://")):
        return "postgres"
    if url.startswith("redis://"):
        return "redis"
    return "external"


def store_url(kind: str, workdir: Path, explicit: str | None = None) -> str:
    """The store URL for a store kind: sqlite in ``workdir``, memory, or the PostgreSQL /
    Redis URL given (``--store-url``) or exported by scripts/with-services.sh."""
    if explicit:
        return explicit
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    if kind == "memory":
        return "memory://"
    if kind in ENV_URLS:
        url = os.environ.get(ENV_URLS[kind])
        if not url:
            raise SystemExit(
                f"bench: --store {kind} needs --store-url or {ENV_URLS[kind]} "
                "(scripts/with-services.sh exports it)"
            )
        return url
    raise SystemExit(f"bench: unknown --store {kind!r}; use --store-url for other stores")


def check_loopback_store(url: str) -> None:
    host = urlsplit(url.replace("+asyncpg", "")).hostname
    if store_kind(url) in ("postgres", "redis") and host not in LOOPBACK:
        raise SystemExit(f"bench: store {url} is not on loopback")


def prepare_store(url: str) -> None:
    """PostgreSQL: ``sbus migrate``. Redis: refuse unless maxmemory-policy is noeviction
    (the bus itself would stay not_ready)."""
    kind = store_kind(url)
    if kind == "postgres":
        cmd = [*sbus_command(), "migrate", "--store", url]
        done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        if done.returncode != 0:
            raise SystemExit(f"bench: sbus migrate failed: {done.stderr.decode()[-500:]}")
    elif kind == "redis":
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        finally:
            client.close()
        if policy != "noeviction":
            raise SystemExit(f"bench: Redis maxmemory-policy is {policy!r}, need noeviction")


def store_server_pids(url: str) -> list[int]:
    """The database server's root process for a loopback PostgreSQL or Redis URL, found
    by its port on the command line (the postmaster's ``-p PORT``, redis-server's
    ``HOST:PORT``); its backends are its children. Empty if not found (remote, other
    user namespace, or not Linux)."""
    kind = store_kind(url)
    if kind not in ("postgres", "redis") or not Path("/proc").exists():
        return []
    port = urlsplit(url.replace("+asyncpg", "")).port or (5432 if kind == "postgres" else 6379)
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if not words:
            continue
        exe = Path(words[0]).name
        pg = kind == "postgres" and exe == "postgres" and _has_option(words, "-p", str(port))
        rd = kind == "redis" and exe.startswith("redis-server")
        if pg or (rd and any(w.endswith(f":{port}") for w in words)):
            found.append(int(entry))
    return found


def _has_option(words: list[str], flag: str, value: str) -> bool:
    return any(w == flag and words[i + 1 : i + 2] == [value] for i, w in enumerate(words))


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
    """CPU time of the given processes and all their descendants, reaped ones included
    (Linux /proc)."""
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
        # utime, stime, and cutime, cstime: the CPU of reaped children (PostgreSQL
        # backends that closed during the window would otherwise vanish from the sum).
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        stack.extend(children.get(pid, []))
    return total / tick


@dataclass
class Deployment:
    urls: list[str]
    store: str
    workers: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: Path | None = None
    db_pids: list[int] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return store_kind(self.store)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def start_deployment(args: argparse.Namespace) -> Deployment:
    if args.url:
        urls = [u.strip().rstrip("/") for u in args.url.split(",") if u.strip()]
        for u in urls:
            if urlsplit(u).hostname not in LOOPBACK:
                raise SystemExit(f"bench: {u} is not a loopback URL")
        # --store-url beside --url names the store behind them (raw CAS, DB CPU).
        ext = args.store_url or "external"
        return Deployment(
            urls=urls, store=ext, workers=args.workers, db_pids=store_server_pids(ext)
        )
    workdir = Path(tempfile.mkdtemp(prefix="sbus-bench-"))
    try:
        url = store_url(args.store, workdir, args.store_url)
        check_loopback_store(url)
        if args.replicas > 1 and url.startswith("memory"):
            raise SystemExit("bench: the memory store cannot be shared by several replicas")
        prepare_store(url)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    env = dict(os.environ, SBUS_ADMIN_ENABLED="1", SBUS_HOST="127.0.0.1")
    dep = Deployment(
        urls=[], store=url, workers=args.workers, workdir=workdir, db_pids=store_server_pids(url)
    )
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
    db_cpu_util: float | None = None
    db_cpu_ms_per_commit: float | None = None
    ratio_commits_to_ceiling: float | None = None
    ratio_commits_to_rawcas: float | None = None
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
    async def run_rawcas(self) -> PhaseResult:
        db_pids = self.dep.db_pids

        def probe() -> float | None:
            return cpu_seconds(db_pids)

        r: CasResult = await raw_cas(
            self.dep.store, self.args.seconds, self.args.warmup, CONNECTIONS, probe
        )
        return PhaseResult(
            phase="rawcas",
            seconds=r.seconds,
            requests_per_s=r.ops_per_s,
            commits_per_s=r.ops_per_s,
            commit_attempts=r.ok + r.failed,
            commits=r.ok,
            conflicts=r.failed,
            conflict_rate=r.failed / (r.ok + r.failed) if r.ok + r.failed else 0.0,
            cross_shard_stale=0,
            errors=0,
            p50_ms=r.p50_ms,
            p99_ms=r.p99_ms,
            server_cpu_ms_per_request=None,
            server_cpu_ms_per_commit=None,
            server_cpu_util=None,
            client_cpu_util=r.client_cpu_util,
            other_commits_per_s=0.0,
            db_cpu_util=r.db_cpu_util,
            db_cpu_ms_per_commit=(
                r.db_cpu_util * r.seconds * 1000 / r.ok if r.db_cpu_util and r.ok else None
            ),
        )

    async def run_phase(self, name: str) -> PhaseResult:
        if name == "rawcas":
            return await self.run_rawcas()
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
        db0: float | None = None
        client0 = 0.0

        async def sample_start() -> None:
            nonlocal cpu0, db0, client0
            await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
            cpu0 = cpu_seconds(self.dep.pids)
            db0 = cpu_seconds(self.dep.db_pids)
            client0 = time.process_time()

        cpu1: float | None = None
        db1: float | None = None
        client1 = 0.0

        async def sample_end() -> None:
            nonlocal cpu1, db1, client1
            await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
            cpu1 = cpu_seconds(self.dep.pids)
            db1 = cpu_seconds(self.dep.db_pids)
            client1 = time.process_time()

        limit = self.args.warmup + self.args.seconds + self.args.timeout + 5
        await asyncio.wait_for(asyncio.gather(sample_start(), sample_end(), *tasks), limit)
        secs = self.args.seconds
        server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        db_cpu = None if db0 is None or db1 is None else db1 - db0
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
            db_cpu_util=db_cpu / secs if db_cpu is not None else None,
            db_cpu_ms_per_commit=(
                db_cpu * 1000 / tally.commits if db_cpu is not None and tally.commits else None
            ),
            error_samples=tuple(tally.error_samples),
        )


def with_ratios(results: list[PhaseResult]) -> list[PhaseResult]:
    ceiling = next((r for r in results if r.phase == "ceiling"), None)
    rawcas = next((r for r in results if r.phase == "rawcas"), None)
    if ceiling is None or ceiling.requests_per_s == 0:
        return results
    out = []
    for r in results:
        base = asdict(r)
        base["error_samples"] = r.error_samples
        if rawcas is not None and rawcas.commits_per_s and r.phase not in ("ceiling", "rawcas"):
            base["ratio_commits_to_rawcas"] = r.commits_per_s / rawcas.commits_per_s
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
        f"{'db cpu':>7}{'db ms/c':>8}{'xcas':>6}"
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
            f"{_fmt(r.db_cpu_util, '.2f'):>7}{_fmt(r.db_cpu_ms_per_commit, '.3f'):>8}"
            f"{_fmt(r.ratio_commits_to_rawcas, '.2f'):>6}"
        )
    yield ""
    yield "p50/p99: commit latency (ceiling: /livez latency). conflict: 409s / commit attempts."
    yield "xceil: successful commits/s / ceiling req/s. srv/gen cpu: cores busy (server, load gen)."
    yield (
        "srv ms/req, ms/commit: server CPU (all its processes) per request / per successful "
        "commit; cpu xceil: ceiling ms/req / ms/commit (the ratio if the server were the "
        "bottleneck)."
    )
    yield (
        "rawcas: the database's own CAS from Python (64 conns/tasks, no S-Bus). db cpu: cores "
        "busy in the database server; db ms/c: its CPU per successful commit; xcas: "
        "commits/s / rawcas ops/s."
    )
    for r in results:
        if r.phase == "cross":
            yield f"cross: shared-shard writers committed {r.other_commits_per_s:.1f}/s."
        for sample in r.error_samples:
            yield f"{r.phase} error: {sample}"
    target = TARGETS.get(dep.kind)
    for r in results:
        if r.ratio_commits_to_ceiling is not None and r.phase == "dedicated" and target:
            verdict = "met" if r.ratio_commits_to_ceiling >= target else "MISSED"
            yield (
                f"target ({dep.kind}) dedicated commits/s >= {target}x ceiling: "
                f"{r.ratio_commits_to_ceiling:.2f}x ({verdict}); "
                f"server-CPU-bound estimate (cpu xceil) "
                f"{_fmt(r.cpu_ratio_commits_to_ceiling, '.2f')}x"
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
            phases = list(args.phases)
            if dep.kind not in ("postgres", "redis") and "rawcas" in phases:
                phases.remove("rawcas")
                if args.phases_given:
                    print("bench: rawcas needs a PostgreSQL or Redis store", file=sys.stderr)
            for name in phases:
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
            "store_kind": dep.kind,
            "target": TARGETS.get(dep.kind),
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
    p.add_argument(
        "--store",
        default="sqlite",
        choices=STORE_KINDS,
        help="store kind (postgres/redis: URL from --store-url or SBUS_TEST_*_URL)",
    )
    p.add_argument("--store-url", default=None, help="explicit store URL (overrides --store)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes per replica (default: cores for postgres/redis, else 1)",
    )
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
    p.add_argument(
        "--phases",
        default=None,
        help=f"comma-separated subset of {','.join(PHASES)} (rawcas: postgres/redis only)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    args.phases_given = args.phases is not None
    args.phases = [x.strip() for x in (args.phases or ",".join(PHASES)).split(",") if x.strip()]
    kind = store_kind(args.store_url) if args.store_url else args.store
    if args.workers is None:
        args.workers = (os.cpu_count() or 1) if kind in ("postgres", "redis") else 1
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
