"""Token + mandate overhead per commit, against open mode, on PostgreSQL and Redis.

Two parts, both in ONE run per store, so every ratio compares figures from the same
machine load:

1. ``http``: an open-mode server, then a token-mode server (``SBUS_AUTH=token``), each
   ``sbus serve --workers 2`` on the same store, one at a time, the store wiped before
   each. The same generator (64 agents over 64 one-connection httpx clients, as
   ``bench.py``) drives the dedicated topology: each agent GETs its own shard ``pay/i``
   and commits it with ``POST /commit/v2``. In token mode every request carries the
   agent's bearer token, the shards are created with ``policy: {require_mandate: true}``
   and every commit carries a fresh mandate (holder = the agent, keys ``pay/*``, its own
   context), all issued through ``POST /mandates`` BEFORE the measured phase (issuing
   is not timed; the pool is sized from the open-mode commit count). Reported: p50/p99
   commit latency and commits/s per mode, and token p50 / open p50 against <= 1.25x.

2. ``span``: in process, no HTTP: the store object (``open_store(url, Limits())``) and
   ``Mandates.from_settings``. The span is what the server runs for a mandated commit
   after parsing: ``store.now_ms()`` + ``verify_mandate(...)`` + ``store.apply(commit_txn(
   ..., mandate=MandateRef(...)))``. First the highest sustained commit rate (closed loop,
   ``--tasks`` concurrent tasks each on its own shard, plain and mandated), then an open
   loop (fixed arrival schedule, one task per arrival on a free shard) at half that rate
   for ``--span-seconds``: p50/p99 of the span against p99 < 3.8 ms, and the plain apply
   (no mandate, shards without the policy) at the same rate for comparison.

    scripts/with-services.sh .venv/bin/python loadtest/auth_bench.py --store postgres
    scripts/with-services.sh .venv/bin/python loadtest/auth_bench.py --store redis --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import (
    JSON_HEADERS,
    check_loopback_store,
    cpu_seconds,
    free_port,
    loadavg,
    percentile,
    prepare_store,
    sbus_command,
    store_url,
)
from sbus.config import Settings
from sbus.core.engine import commit_txn, new_commit_id
from sbus.core.rights import ALL_RIGHTS, Capabilities, Identity, Right, Scope
from sbus.core.store import Store
from sbus.core.types import CreateOp, Limits, MandateRef, WriteOp
from sbus.security.mandates import Mandates
from sbus.security.tokens import Issuer
from sbus.storage.factory import open_store

CONNECTIONS = 64
SECRET = "auth-bench-secret-" + "s" * 32
CONTENT = "x" * 64
TTL_S = 900
HTTP_TARGET = 1.25  # token+mandate p50 / open p50
SPAN_TARGET_MS = 3.8  # p99 of verification + consumption


def token_settings() -> Settings:
    return Settings(auth="token", secret=SECRET)


# --------------------------------------------------------------------------- part 1: HTTP


@dataclass
class HttpResult:
    mode: str
    seconds: float
    commits: int
    commits_per_s: float
    p50_ms: float
    p99_ms: float
    read_p50_ms: float
    errors: int
    mandates_issued: int = 0
    mandates_left: int = 0
    agents_out_of_mandates: int = 0
    issue_seconds: float = 0.0
    server_cpu_ms_per_commit: float | None = None
    client_cpu_util: float = 0.0
    error_samples: list[str] = field(default_factory=list)
    round: int = 0


async def wipe(url: str) -> None:
    store = open_store(url, Limits())
    await store.start()
    try:
        await store.reset_all()
    finally:
        await store.close()


def start_server(
    url: str, mode: str, workers: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ, SBUS_HOST="127.0.0.1", SBUS_AUTH=mode)
    if mode == "token":
        env["SBUS_SECRET"] = SECRET
    else:
        env.pop("SBUS_SECRET", None)
    port = free_port()
    cmd = [*sbus_command(), "serve", "--port", str(port), "--store", url]
    cmd += ["--workers", str(workers)]
    log = (workdir / f"server-{mode}.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


async def wait_ready(proc: subprocess.Popen[bytes], base: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"auth_bench: server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{base}/admin/health")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"auth_bench: {base} not ready after {limit_s:.0f}s")
            await asyncio.sleep(0.1)


class HttpRun:
    """One mode's server: set-up, mandate issuing, then the measured dedicated phase."""

    def __init__(self, base: str, mode: str, args: argparse.Namespace) -> None:
        self.base = base
        self.mode = mode
        self.args = args
        ctx = ssl.create_default_context()
        timeout = httpx.Timeout(args.timeout)
        self.clients = [
            httpx.AsyncClient(
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                timeout=timeout,
                verify=ctx,
            )
            for _ in range(CONNECTIONS)
        ]
        self.headers: list[dict[str, str]] = [dict(JSON_HEADERS) for _ in range(args.agents)]
        self.root = dict(JSON_HEADERS)
        self.grantor = dict(JSON_HEADERS)
        if mode == "token":
            issuer = Issuer.from_settings(token_settings())
            for i in range(args.agents):
                value, _ = issuer.issue(f"agent-{i}", [Scope("**", ALL_RIGHTS)], TTL_S)
                self.headers[i]["authorization"] = f"Bearer {value}"
            value, _ = issuer.issue("root", [Scope("**", ALL_RIGHTS)], TTL_S)
            self.root["authorization"] = f"Bearer {value}"
            value, _ = issuer.issue("grantor", [Scope.of("pay/*", Right.MANDATE)], TTL_S)
            self.grantor["authorization"] = f"Bearer {value}"
        self.mandates: list[list[tuple[str, dict[str, Any]]]] = [[] for _ in range(args.agents)]

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()

    def client(self, i: int) -> httpx.AsyncClient:
        return self.clients[i % CONNECTIONS]

    async def create_shards(self) -> None:
        sem = asyncio.Semaphore(16)

        async def create(i: int) -> None:
            body: dict[str, Any] = {"key": f"pay/{i}", "content": CONTENT}
            if self.mode == "token":
                body["policy"] = {"require_mandate": True}
            else:
                body["agent_id"] = "bench-setup"
            async with sem:
                # /admin/health answers for one worker; another may still be starting.
                for _ in range(100):
                    r = await self.client(i).post(
                        f"{self.base}/shard", content=orjson.dumps(body), headers=self.root
                    )
                    if r.status_code != 503:
                        break
                    await asyncio.sleep(0.1)
            if r.status_code != 201:
                raise SystemExit(f"auth_bench: create pay/{i}: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(create(i) for i in range(self.args.agents)))

    async def issue_mandates(self, per_agent: int) -> float:
        """``per_agent`` mandates for each agent through POST /mandates (not timed in the
        phase); returns the seconds it took."""
        t0 = time.perf_counter()

        async def issue_for(i: int) -> None:
            c = self.client(i)
            for n in range(per_agent):
                context = {"order": n, "agent": i}
                body = {
                    "holder": f"agent-{i}",
                    "keys": ["pay/*"],
                    "context": context,
                    "ttl_s": TTL_S,
                }
                r = await c.post(
                    f"{self.base}/mandates", content=orjson.dumps(body), headers=self.grantor
                )
                if r.status_code != 201:
                    raise SystemExit(f"auth_bench: POST /mandates: {r.status_code} {r.text[:200]}")
                self.mandates[i].append((orjson.loads(r.content)["mandate"], context))

        await asyncio.gather(*(issue_for(i) for i in range(self.args.agents)))
        return time.perf_counter() - t0

    async def measure(self, pids: list[int]) -> HttpResult:
        args = self.args
        now = time.perf_counter()
        start, end = now + args.warmup, now + args.warmup + args.seconds
        lat: list[float] = []
        reads: list[float] = []
        errors: list[str] = []
        error_count = 0
        out_of_mandates = 0

        async def agent(i: int) -> None:
            nonlocal error_count, out_of_mandates
            key, name, c, headers = f"pay/{i}", f"agent-{i}", self.client(i), self.headers[i]
            pool = self.mandates[i]
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                r = await c.get(
                    f"{self.base}/shard/{key}", params={"agent_id": name}, headers=headers
                )
                if start <= t0 < end:
                    reads.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    error_count += 1
                    if len(errors) < 5:
                        errors.append(f"GET: {r.status_code} {r.text[:120]}")
                    await asyncio.sleep(0.01)
                    continue
                body: dict[str, Any] = {
                    "key": key,
                    "expected_version": orjson.loads(r.content)["version"],
                    "delta": CONTENT,
                    "agent_id": name,
                }
                if self.mode == "token":
                    if not pool:
                        out_of_mandates += 1
                        return
                    body["mandate"], body["context"] = pool.pop()
                t0 = time.perf_counter()
                r = await c.post(
                    f"{self.base}/commit/v2", content=orjson.dumps(body), headers=headers
                )
                t1 = time.perf_counter()
                if not start <= t0 < end:
                    continue
                if r.status_code == 200:
                    lat.append((t1 - t0) * 1000)
                else:
                    error_count += 1
                    if len(errors) < 5:
                        errors.append(f"commit: {r.status_code} {r.text[:160]}")

        cpu: list[float | None] = []

        async def sample(at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            cpu.append(cpu_seconds(pids))
            cpu.append(time.process_time())

        limit = args.warmup + args.seconds + args.timeout + 5
        await asyncio.wait_for(
            asyncio.gather(sample(start), sample(end), *(agent(i) for i in range(args.agents))),
            limit,
        )
        c0, g0, c1, g1 = cpu
        server_cpu = c1 - c0 if c0 is not None and c1 is not None else None
        return HttpResult(
            mode=self.mode,
            seconds=args.seconds,
            commits=len(lat),
            commits_per_s=len(lat) / args.seconds,
            p50_ms=percentile(lat, 0.5),
            p99_ms=percentile(lat, 0.99),
            read_p50_ms=percentile(reads, 0.5),
            errors=error_count,
            agents_out_of_mandates=out_of_mandates,
            mandates_left=sum(len(p) for p in self.mandates),
            server_cpu_ms_per_commit=(
                server_cpu * 1000 / len(lat) if server_cpu is not None and lat else None
            ),
            client_cpu_util=((g1 or 0.0) - (g0 or 0.0)) / args.seconds,
            error_samples=errors,
        )


async def http_mode(
    url: str, mode: str, args: argparse.Namespace, workdir: Path, per_agent: int
) -> HttpResult:
    await wipe(url)
    proc, base = start_server(url, mode, args.workers, workdir)
    try:
        await wait_ready(proc, base)
        run = HttpRun(base, mode, args)
        try:
            await run.create_shards()
            issue_s = 0.0
            if mode == "token":
                issue_s = await run.issue_mandates(per_agent)
            result = await run.measure([proc.pid])
            result.issue_seconds = issue_s
            result.mandates_issued = per_agent * args.agents if mode == "token" else 0
            return result
        finally:
            await run.close()
    finally:
        stop_server(proc)


async def http_part(url: str, args: argparse.Namespace, workdir: Path) -> list[HttpResult]:
    """``--rounds`` rounds of open then token mode; the mandate pool of each token run is
    sized from the open-mode commit count of the same round."""
    out: list[HttpResult] = []
    for n in range(args.rounds):
        opened = await http_mode(url, "open", args, workdir, 0)
        # One mandate per planned commit: the open-mode commit count over warm-up +
        # window, with a margin (token mode is not expected to be faster).
        planned = opened.commits_per_s * (args.warmup + args.seconds) * args.mandate_margin
        per_agent = max(8, math.ceil(planned / args.agents))
        token = await http_mode(url, "token", args, workdir, per_agent)
        opened.round = token.round = n + 1
        out += [opened, token]
    await wipe(url)
    return out


def http_ratios(http: list[HttpResult]) -> list[float]:
    return [t.p50_ms / o.p50_ms for o, t in zip(http[::2], http[1::2], strict=True)]


# --------------------------------------------------------------------------- part 2: span


@dataclass
class SpanStats:
    phase: str
    rate_per_s: float
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    now_p50_ms: float | None = None
    verify_p50_ms: float | None = None
    apply_p50_ms: float | None = None
    apply_p99_ms: float | None = None
    late_p99_ms: float | None = None  # open loop: start of the span after its due time
    target_rate_per_s: float | None = None
    errors: int = 0


@dataclass
class Sample:
    total: list[float] = field(default_factory=list)
    now: list[float] = field(default_factory=list)
    verify: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)
    errors: int = 0


class SpanBench:
    def __init__(self, store: Store, args: argparse.Namespace) -> None:
        self.store = store
        self.args = args
        self.mandates = Mandates.from_settings(token_settings())
        self.grantor = Identity("grantor", Capabilities((Scope.of("pay/*", Right.MANDATE),)))
        self.versions: dict[str, int] = {}

    async def setup(self, keys: int) -> None:
        await self.store.reset_all()
        for i in range(keys):
            for key, policy in ((f"pay/{i}", True), (f"open/{i}", False)):
                await self.store.create(
                    CreateOp(key, CONTENT, "", policy, "setup", new_commit_id())
                )
                self.versions[key] = 0

    async def issue(self, agent: str, n: int) -> list[tuple[str, dict[str, Any]]]:
        now = await self.store.now_ms()
        out = []
        for k in range(n):
            context = {"order": k, "agent": agent}
            token, _ = self.mandates.issue_mandate(
                self.grantor, agent, ["pay/*"], context, TTL_S, now_ms=now
            )
            out.append((token, context))
        return out

    async def one(
        self, key: str, agent: str, mandate: tuple[str, dict[str, Any]] | None, s: Sample
    ) -> None:
        """One commit on ``key``; with a mandate the span is now_ms + verify + apply."""
        store = self.store
        t0 = time.perf_counter()
        ref: MandateRef | None = None
        t1 = t2 = t0
        try:
            if mandate is not None:
                now = await store.now_ms()
                t1 = time.perf_counter()
                claims = self.mandates.verify_mandate(
                    mandate[0], agent=agent, written_keys=[key], context=mandate[1], now_ms=now
                )
                ref = MandateRef(
                    claims.jti, claims.expires_at_ms, claims.retain_until_ms(self.mandates.leeway)
                )
                t2 = time.perf_counter()
            txn = commit_txn(
                op="commit",
                agent_id=agent,
                session_id="",
                writes=[WriteOp(key, self.versions[key], "commit", CONTENT)],
                read_set=[],
                rationale=None,
                idem=None,
                mandate=ref,
            )
            out = await store.apply(txn)
        except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
            s.errors += 1
            if s.errors <= 3:
                print(f"auth_bench: apply failed: {exc!r}", file=sys.stderr)
            return
        t3 = time.perf_counter()
        if out.body is not None:
            self.versions[key] = out.body["new_version"]
        s.total.append((t3 - t0) * 1000)
        s.now.append((t1 - t0) * 1000)
        s.verify.append((t2 - t1) * 1000)
        s.apply.append((t3 - t2) * 1000)

    async def closed_loop(self, mandated: bool, seconds: float, expect: float) -> SpanStats:
        """``--tasks`` tasks, each committing its own shard back to back."""
        tasks = self.args.tasks
        s = Sample()
        pools: list[list[tuple[str, dict[str, Any]]]] = []
        if mandated:
            per = max(16, math.ceil(expect * (seconds + 1) * 1.2 / tasks))
            pools = [await self.issue(f"agent-{t}", per) for t in range(tasks)]
        warm_end = time.perf_counter() + 1.0
        end = warm_end + seconds
        counted = 0

        async def loop(t: int) -> None:
            nonlocal counted
            prefix = "pay" if mandated else "open"
            key, agent = f"{prefix}/{t}", f"agent-{t}"
            while time.perf_counter() < end:
                m = None
                if mandated:
                    if not pools[t]:
                        return
                    m = pools[t].pop()
                t0 = time.perf_counter()
                await self.one(key, agent, m, s if t0 >= warm_end else Sample())
                if t0 >= warm_end and time.perf_counter() < end:
                    counted += 1

        await asyncio.gather(*(loop(t) for t in range(tasks)))
        return stats(f"closed-{'mandate' if mandated else 'plain'}", counted / seconds, s)

    async def open_loop(self, mandated: bool, rate: float, seconds: float) -> SpanStats:
        """Arrivals every 1/rate s on a fixed schedule; each takes a free shard."""
        # At most --inflight commits in flight (the store pools hold 32 PostgreSQL / 64
        # Redis connections); an arrival that finds none free waits, and that wait shows
        # as lateness, not as span.
        keys = min(self.args.keys, self.args.inflight)
        prefix = "pay" if mandated else "open"
        free: asyncio.Queue[int] = asyncio.Queue()
        for k in range(keys):
            free.put_nowait(k)
        total = int(rate * seconds)
        pool: list[tuple[str, dict[str, Any]]] = []
        if mandated:
            # One holder per shard slot; mandates name pay/*, so any holder's works on any
            # shard, but the holder must be the committing agent: one agent for all.
            pool = await self.issue("agent-open", total + 16)
        s = Sample()
        running: set[asyncio.Task[None]] = set()

        async def arrival(due: float) -> None:
            k = await free.get()
            try:
                s.late.append((time.perf_counter() - due) * 1000)
                m = pool.pop() if mandated else None
                await self.one(f"{prefix}/{k}", "agent-open", m, s)
            finally:
                free.put_nowait(k)

        start = time.perf_counter() + 0.05
        for n in range(total):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(arrival(due))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.wait_for(asyncio.gather(*running), self.args.timeout + seconds)
        st = stats(f"open-{'mandate' if mandated else 'plain'}", len(s.total) / seconds, s)
        st.target_rate_per_s = rate
        return st


def stats(phase: str, rate: float, s: Sample) -> SpanStats:
    return SpanStats(
        phase=phase,
        rate_per_s=rate,
        samples=len(s.total),
        p50_ms=percentile(s.total, 0.5),
        p99_ms=percentile(s.total, 0.99),
        max_ms=max(s.total) if s.total else float("nan"),
        now_p50_ms=percentile(s.now, 0.5),
        verify_p50_ms=percentile(s.verify, 0.5),
        apply_p50_ms=percentile(s.apply, 0.5),
        apply_p99_ms=percentile(s.apply, 0.99),
        late_p99_ms=percentile(s.late, 0.99) if s.late else None,
        errors=s.errors,
    )


async def span_part(url: str, args: argparse.Namespace) -> list[SpanStats]:
    store = open_store(url, Limits())
    await store.start()
    try:
        bench = SpanBench(store, args)
        await bench.setup(max(args.keys, args.tasks))
        plain = await bench.closed_loop(False, args.closed_seconds, 0.0)
        mandated = await bench.closed_loop(True, args.closed_seconds, plain.rate_per_s)
        best = max(plain.rate_per_s, mandated.rate_per_s)
        rate = max(1.0, best / 2)
        open_m = await bench.open_loop(True, rate, args.span_seconds)
        open_p = await bench.open_loop(False, rate, args.span_seconds)
        return [plain, mandated, open_m, open_p]
    finally:
        with contextlib.suppress(Exception):
            await store.reset_all()
        await store.close()


# --------------------------------------------------------------------------- report


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(
    kind: str, http: list[HttpResult], spans: list[SpanStats], args: argparse.Namespace
) -> list[str]:
    lines = [
        f"S-Bus auth bench: store {kind}, {args.workers} workers, {args.agents} agents over "
        f"{CONNECTIONS} connections, {args.seconds:g}s after {args.warmup:g}s warm-up, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    ]
    if http:
        lines.append(
            f"{'round':<6}{'mode':<14}{'commits/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'GET p50':>8}"
            f"{'srv ms/c':>9}{'gen cpu':>8}{'errors':>7}{'mandates':>9}{'left':>7}{'issue s':>8}"
        )
        for r in http:
            label = "open" if r.mode == "open" else "token+mandate"
            lines.append(
                f"{r.round:<6}{label:<14}{r.commits_per_s:>10,.0f}{r.p50_ms:>8.2f}{r.p99_ms:>8.2f}"
                f"{r.read_p50_ms:>8.2f}{_f(r.server_cpu_ms_per_commit, '.2f'):>9}"
                f"{r.client_cpu_util:>8.2f}{r.errors:>7}{r.mandates_issued:>9}"
                f"{r.mandates_left:>7}{r.issue_seconds:>8.1f}"
            )
            for e in r.error_samples:
                lines.append(f"  {r.mode} error: {e}")
            if r.agents_out_of_mandates:
                lines.append(f"  {r.agents_out_of_mandates} agents ran out of mandates")
        for o, t in zip(http[::2], http[1::2], strict=True):
            ratio = t.p50_ms / o.p50_ms
            verdict = "met" if ratio <= HTTP_TARGET else "MISSED"
            lines.append(
                f"round {o.round} ({kind}) token+mandate p50 / open p50 <= {HTTP_TARGET}x: "
                f"{ratio:.2f}x ({verdict}); p99 ratio {t.p99_ms / o.p99_ms:.2f}x, "
                f"commits/s ratio {t.commits_per_s / o.commits_per_s:.2f}x"
            )
        ratios = http_ratios(http)
        med = statistics.median(ratios)
        lines.append(
            f"target ({kind}) median over rounds {med:.2f}x "
            f"({'met' if med <= HTTP_TARGET else 'MISSED'})"
        )
    if spans:
        lines.append("")
        lines.append(
            f"{'span phase':<16}{'rate/s':>8}{'target':>8}{'n':>7}{'p50 ms':>8}{'p99 ms':>9}"
            f"{'max ms':>8}{'now p50':>8}{'verify':>8}{'apply50':>8}{'apply99':>9}"
            f"{'late99':>9}{'err':>5}"
        )
        for s in spans:
            lines.append(
                f"{s.phase:<16}{s.rate_per_s:>8,.0f}{_f(s.target_rate_per_s, ',.0f'):>8}"
                f"{s.samples:>7}{s.p50_ms:>8.3f}{s.p99_ms:>9.3f}{s.max_ms:>8.2f}"
                f"{_f(s.now_p50_ms, '.3f'):>8}{_f(s.verify_p50_ms, '.3f'):>8}"
                f"{_f(s.apply_p50_ms, '.3f'):>8}{_f(s.apply_p99_ms, '.3f'):>9}"
                f"{_f(s.late_p99_ms, '.1f'):>9}{s.errors:>5}"
            )
        om = next(s for s in spans if s.phase == "open-mandate")
        op = next(s for s in spans if s.phase == "open-plain")
        verdict = "met" if om.p99_ms < SPAN_TARGET_MS else "MISSED"
        lines.append(
            f"target ({kind}) span p99 < {SPAN_TARGET_MS} ms at half the highest closed-loop "
            f"rate ({_f(om.target_rate_per_s, ',.0f')}/s): {om.p99_ms:.3f} ms ({verdict}); "
            f"plain apply at the same rate p99 {op.p99_ms:.3f} ms, span p50 / plain p50 "
            f"{om.p50_ms / op.p50_ms:.2f}x"
        )
        lines.append(
            "span = store.now_ms + verify_mandate + store.apply with the mandate (consumed "
            "in the atomic step); late99: p99 of span start after its scheduled arrival."
        )
    return lines


async def amain(args: argparse.Namespace) -> int:
    load_before = loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="sbus-authbench-"))
    try:
        url = store_url(args.store, workdir, args.store_url)
        check_loopback_store(url)
        prepare_store(url)
        http = await http_part(url, args, workdir) if "http" in args.parts else []
        if not args.json and http:
            print("  http: done", file=sys.stderr)
        spans = await span_part(url, args) if "span" in args.parts else []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    kind = args.store
    if args.json:
        doc = {
            "store": kind,
            "workers": args.workers,
            "agents": args.agents,
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "http": [asdict(r) for r in http],
            "http_p50_ratios": http_ratios(http),
            "span": [asdict(s) for s in spans],
        }
        print(json.dumps(doc, indent=2))
    else:
        for line in report(kind, http, spans, args):
            print(line)
        print(f"load average before/after: {load_before} / {loadavg()} (2 cores is 2.0)")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--store", choices=("postgres", "redis"), default="postgres")
    p.add_argument("--store-url", default=None, help="explicit loopback store URL")
    p.add_argument("--parts", default="http,span", help="http, span or both")
    p.add_argument("--workers", type=int, default=2, help="server worker processes")
    p.add_argument("--agents", type=int, default=64, help="HTTP agents (one shard each)")
    p.add_argument("--seconds", type=float, default=10.0, help="HTTP measured seconds per mode")
    p.add_argument("--warmup", type=float, default=2.0, help="HTTP unmeasured seconds per mode")
    p.add_argument("--rounds", type=int, default=2, help="HTTP rounds of open then token")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (s)")
    p.add_argument(
        "--mandate-margin", type=float, default=1.5, help="mandates per open-mode commit"
    )
    p.add_argument("--tasks", type=int, default=16, help="span: closed-loop concurrent tasks")
    p.add_argument("--keys", type=int, default=256, help="span: shards for the open loop")
    p.add_argument("--inflight", type=int, default=32, help="span: open-loop in-flight cap")
    p.add_argument("--closed-seconds", type=float, default=5.0, help="span: closed-loop seconds")
    p.add_argument("--span-seconds", type=float, default=10.0, help="span: open-loop seconds")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not args.parts <= {"http", "span"}:
        p.error("--parts takes http and/or span")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner: Callable[[Awaitable[int]], int] = asyncio.run  # type: ignore[assignment]
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            runner = uvloop.run  # type: ignore[assignment]
    return runner(amain(args))


if __name__ == "__main__":
    sys.exit(main())
