"""Where the CPU of one GET+commit cycle goes, per store: measure before choosing levers.

Two parts, each well under a minute:

* ``inproc``: the whole ASGI app driven in process without sockets (as app_cycle.py), over
  each store named in ``--stores`` (PostgreSQL and Redis when their URLs are known). One
  unprofiled run gives the CPU per cycle and the garbage collector's part; a second run
  under cProfile, timed by the event-loop thread's CPU clock, gives the top functions by
  cumulative and by own time and the own time grouped by layer (middleware and routing,
  dependency injection, validation, S-Bus api/, the engine, the store, JSON, asyncio, the
  ASGI test client). A built-in's or the standard library's own time is charged to the
  layers of the functions that called it. cProfile sees only the event-loop thread: the
  CPU of SQLite's worker thread is reported beside it from the thread clocks.
* ``services``: a real ``sbus serve`` over PostgreSQL and over Redis (URLs from
  ``--postgres-url`` / ``--redis-url`` or SBUS_TEST_POSTGRES_URL / SBUS_TEST_REDIS_URL,
  which scripts/with-services.sh exports). PostgreSQL is reached through a counting proxy
  in this process that reads the wire protocol: round trips (ReadyForQuery), statements
  executed (Execute and simple Query), statements parsed (Parse) and the text of each
  executed statement; Redis through INFO commandstats deltas. Then a short closed loop
  measures the bus's and the store server's CPU per cycle from /proc.

    scripts/with-services.sh .venv/bin/python loadtest/profile_cycle.py
    .venv/bin/python loadtest/profile_cycle.py --parts inproc --stores memory --cycles 300

The profiler slows call-heavy code more than the rest, so the layer shares are indicative;
the ms columns scale each share by the unprofiled CPU per cycle. Numbers move with the
machine's load (printed); compare shares, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import os
import pstats
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from asgi_lifespan import LifespanManager

from bench import cpu_seconds, free_port, loadavg, prepare_store, sbus_command, store_server_pids
from sbus.bootstrap import create_app
from sbus.bootstrap.lifecycle import FrozenOnceReady
from sbus.config import Settings

JSON = {"Content-Type": "application/json"}

# Layers in print order; `classify` maps a profiled function's file to one of them.
LAYERS = (
    "middleware+routing (starlette/fastapi)",
    "DI+params (fastapi dependencies)",
    "validation (pydantic)",
    "S-Bus api/",
    "S-Bus core (engine)",
    "S-Bus other (security, telemetry, bootstrap)",
    "store",
    "JSON encoding",
    "asyncio/anyio",
    "ASGI test client (httpx)",
    "other",
)
SERVER_LAYERS = (*LAYERS[:-2], "other")  # the client is the harness, not the cycle's server


def classify(filename: str, funcname: str) -> str:
    path = filename.replace("\\", "/")
    if path == "~":  # a built-in; charged to its caller by the caller
        if "json" in funcname or "orjson" in funcname:
            return "JSON encoding"
        return "other"
    rules: tuple[tuple[tuple[str, ...], str], ...] = (
        (("/sbus/api/",), "S-Bus api/"),
        (("/sbus/core/",), "S-Bus core (engine)"),
        (
            ("/sbus/storage/", "/aiosqlite/", "/sqlalchemy/", "/asyncpg/", "/redis/", "/sqlite3/"),
            "store",
        ),
        (("/sbus/",), "S-Bus other (security, telemetry, bootstrap)"),
        (("/fastapi/dependencies/",), "DI+params (fastapi dependencies)"),
        (("/starlette/", "/fastapi/"), "middleware+routing (starlette/fastapi)"),
        (
            ("/pydantic/", "/pydantic_core/", "/typing_extensions", "/annotated_types/"),
            "validation (pydantic)",
        ),
        (("/json/",), "JSON encoding"),
        (("/asyncio/", "/anyio/", "/uvloop/", "/sniffio/", "/contextvars"), "asyncio/anyio"),
        (
            ("/httpx/", "/httpcore/", "/asgi_lifespan/", "/h11/", "/loadtest/"),
            "ASGI test client (httpx)",
        ),
    )
    for needles, layer in rules:
        if any(n in path for n in needles):
            return layer
    return "other"


Key = tuple[str, int, str]


def layer_own_time(stats: dict[Key, Any]) -> dict[str, float]:
    """Own time per layer. A function of no layer (a built-in such as ``isinstance`` or
    ``dict.get``, or the standard library's ``typing``, ``re``, ``enum``...) is charged
    to its callers' layers in proportion to the time each caller edge spent in it, up the
    call graph until a layer is met: pydantic-core's Rust validation counts as
    validation, ``dict.get`` in the engine as the engine."""
    memo: dict[Key, dict[str, float]] = {}

    def shares(key: Key, seen: frozenset[Key]) -> dict[str, float]:
        if key in memo:
            return memo[key]
        layer = classify(key[0], key[2])
        callers = stats[key][4] if key in stats else {}
        if layer != "other" or not callers or key in seen:
            result = {layer: 1.0}
        else:
            weights = {c: (edge[2] or 0.0) for c, edge in callers.items()}
            total = sum(weights.values())
            if total <= 0:
                weights = {c: float(edge[0]) for c, edge in callers.items()}
                total = sum(weights.values()) or 1.0
            result = {}
            for caller, weight in weights.items():
                for name, part in shares(caller, seen | {key}).items():
                    result[name] = result.get(name, 0.0) + part * weight / total
        if not seen:
            memo[key] = result
        return result

    out: dict[str, float] = dict.fromkeys(LAYERS, 0.0)
    for key, (_cc, _nc, tt, _ct, _callers) in stats.items():
        for name, part in shares(key, frozenset()).items():
            out[name] += tt * part
    return out


def _short(key: Key) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    parts = Path(filename).parts
    tail = "/".join(parts[-3:]) if "sbus" in parts else "/".join(parts[-2:])
    return f"{tail}:{line}({name})"


# --------------------------------------------------------------------------- in process


@dataclass
class InprocResult:
    store: str
    cycles: int
    cpu_ms: float  # unprofiled, whole process (all threads), per cycle
    loop_ms: float  # unprofiled, the event-loop thread, per cycle
    gc_ms: float  # unprofiled, the cyclic garbage collector, per cycle
    gc_runs: Counter[int]  # collections per generation during the unprofiled run
    frozen: int  # objects gc.freeze() took out of the collector's generations (0: none)
    layers: dict[str, float]  # own seconds per layer under the profiler, whole run
    profiled_s: float
    calls_per_cycle: float
    top_cum: list[tuple[str, str, float, int]] = field(default_factory=list)
    top_own: list[tuple[str, str, float, int]] = field(default_factory=list)
    hottest: dict[str, list[tuple[str, float, int]]] = field(default_factory=dict)


class GcClock:
    """Thread CPU spent in the cyclic garbage collector (its pauses land inside whatever
    function allocated, so a profile cannot show them as one line)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.runs: Counter[int] = Counter()
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._start
            self.runs[info["generation"]] += 1


@contextlib.contextmanager
def gc_clock() -> Iterator[GcClock]:
    clock = GcClock()
    gc.callbacks.append(clock)
    try:
        yield clock
    finally:
        gc.callbacks.remove(clock)


@contextlib.asynccontextmanager
async def running_app(store_url: str, freeze: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """The app as a ``sbus serve`` worker runs it: with ``freeze``, what start-up built is
    frozen once the store is ready (FrozenOnceReady), and unfrozen when the run ends."""
    app = create_app(Settings(store=store_url))
    runtime = app.state.runtime
    if freeze:
        runtime.lifecycle = FrozenOnceReady(runtime.lifecycle)
    try:
        async with LifespanManager(app) as manager:
            for _ in range(1000):  # the store connects in the background; 10 s at most
                if runtime.ready and (gc.get_freeze_count() or not freeze):
                    break
                await asyncio.sleep(0.01)
            else:
                raise SystemExit(f"profile: the {store_url} store never became ready")
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                yield client
    finally:
        gc.unfreeze()


async def _cycle(client: httpx.AsyncClient, key: str, agent: str, version: int) -> int:
    read = await client.get(f"/shard/{key}", params={"agent_id": agent})
    read.raise_for_status()
    body = {"key": key, "expected_version": version, "delta": str(version), "agent_id": agent}
    commit = await client.post("/commit/v2", json=body, headers=JSON)
    commit.raise_for_status()
    return version + 1


async def _inproc(
    store_url: str, label: str, cycles: int, warmup: int, top: int, freeze: bool = True
) -> InprocResult:
    async with running_app(store_url, freeze) as client:
        # A fresh key per run: PostgreSQL and Redis keep what earlier runs wrote.
        key = f"profile/{os.getpid()}/{time.monotonic_ns()}"
        created = await client.post("/shard", json={"key": key, "content": "0"}, headers=JSON)
        created.raise_for_status()
        version = 0
        for _ in range(warmup):
            version = await _cycle(client, key, "A", version)
        frozen = gc.get_freeze_count()
        with gc_clock() as in_gc:
            cpu0, loop0 = time.process_time(), time.thread_time()
            for _ in range(cycles):
                version = await _cycle(client, key, "A", version)
            cpu_ms = (time.process_time() - cpu0) / cycles * 1000
            loop_ms = (time.thread_time() - loop0) / cycles * 1000
        # The event-loop thread's CPU clock: time blocked in epoll is not CPU.
        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
        for _ in range(cycles):
            version = await _cycle(client, key, "A", version)
        profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
    layers = layer_own_time(raw)
    calls = sum(v[1] for v in raw.values())
    rows = [(k, v) for k, v in raw.items()]
    by_cum = sorted(rows, key=lambda kv: kv[1][3], reverse=True)[:top]
    by_own = by_own_all(rows)[:top]
    hottest: dict[str, list[tuple[str, float, int]]] = {}
    for fkey, value in by_own_all(rows):
        layer = classify(fkey[0], fkey[2])
        if fkey[0] != "~" and len(hottest.setdefault(layer, [])) < 3:
            hottest[layer].append((_short(fkey), value[2], value[1]))
    return InprocResult(
        hottest=hottest,
        store=label,
        cycles=cycles,
        cpu_ms=cpu_ms,
        loop_ms=loop_ms,
        gc_ms=in_gc.seconds / cycles * 1000,
        gc_runs=in_gc.runs,
        frozen=frozen,
        layers=layers,
        profiled_s=sum(layers.values()),
        calls_per_cycle=calls / cycles,
        top_cum=[(_short(k), classify(k[0], k[2]), v[3], v[1]) for k, v in by_cum],
        top_own=[(_short(k), classify(k[0], k[2]), v[2], v[1]) for k, v in by_own],
    )


def by_own_all(rows: list[tuple[Key, Any]]) -> list[tuple[Key, Any]]:
    return sorted(rows, key=lambda kv: kv[1][2], reverse=True)


def print_inproc(res: InprocResult) -> None:
    print(f"\n## in process, {res.store} store: {res.cycles} cycles")
    print(
        f"unprofiled CPU per cycle {res.cpu_ms:.3f} ms (event-loop thread {res.loop_ms:.3f} ms, "
        f"other threads {max(res.cpu_ms - res.loop_ms, 0.0):.3f} ms); "
        f"{res.calls_per_cycle:.0f} Python calls per cycle"
    )
    runs = ", ".join(f"gen{g} x{n}" for g, n in sorted(res.gc_runs.items())) or "none"
    print(
        f"garbage collector: {res.gc_ms:.3f} ms per cycle ({runs}; "
        f"{res.frozen} start-up objects frozen)"
    )
    harness = res.layers["ASGI test client (httpx)"]
    server = res.profiled_s - harness
    print(
        f"ASGI test client (httpx) share of the profiled time: {harness / res.profiled_s:.0%} "
        "(excluded below)"
    )
    print(
        "| layer (own time, built-ins charged to their caller) | share of server side | ms/cycle |"
    )
    print("|---|---|---|")
    # The unprofiled loop-thread time minus the client's share estimates the server's.
    server_ms = res.loop_ms * (server / res.profiled_s)
    for layer in SERVER_LAYERS:
        share = res.layers[layer] / server if server else 0.0
        print(f"| {layer} | {share:.1%} | {server_ms * share:.3f} |")
    print(f"| (server side, loop thread) | 100% | {server_ms:.3f} |")
    print("\nhottest Python functions per layer by own time (profiled seconds, calls):")
    for layer in SERVER_LAYERS:
        for name, seconds, calls in res.hottest.get(layer, []):
            print(f"  {seconds:8.3f} s {calls:8d}  [{layer}] {name}")
    for title, rows in (("cumulative", res.top_cum), ("own", res.top_own)):
        print(f"\ntop by {title} time (profiled seconds over the run, calls):")
        for name, layer, seconds, calls in rows:
            print(f"  {seconds:8.3f} s {calls:8d}  [{layer}] {name}")


# --------------------------------------------------------------------------- PostgreSQL wire


SSL_REQUEST = 80877103
GSS_REQUEST = 80877104


@dataclass
class PgCounts:
    round_trips: int = 0  # ReadyForQuery from the server
    executes: int = 0  # Execute + simple Query from the client
    parses: int = 0  # Parse (a statement prepared, named or not)
    texts: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> PgCounts:
        return PgCounts(self.round_trips, self.executes, self.parses, Counter(self.texts))

    def minus(self, other: PgCounts) -> PgCounts:
        return PgCounts(
            self.round_trips - other.round_trips,
            self.executes - other.executes,
            self.parses - other.parses,
            self.texts - other.texts,
        )


class _LoopbackProxy:
    """A listener on a free loopback port; each accepted connection goes to ``_serve``,
    which the counting proxies below implement."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class PgCountingProxy(_LoopbackProxy):
    """A loopback TCP proxy in front of PostgreSQL that parses both directions of the
    v3 protocol to count round trips and statements; bytes pass through unchanged."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.counts = PgCounts()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        try:
            # Untyped start-up: SSL/GSS requests (each answered by one byte, 'N' on a
            # server without TLS) and then the startup message; typed messages follow.
            while True:
                head = await reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
                up_writer.write(head + await reader.readexactly(length - 8))
                await up_writer.drain()
                if code not in (SSL_REQUEST, GSS_REQUEST):
                    break
                answer = await up_reader.readexactly(1)
                if answer != b"N":
                    raise RuntimeError("profile: the PostgreSQL proxy cannot count over TLS")
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            up_writer.close()
            return
        tasks = [
            asyncio.create_task(self._client_side(reader, up_writer)),
            asyncio.create_task(self._server_side(up_reader, writer)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the run is over and its loop is closing: nothing left to forward
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.close()

    async def _client_side(self, reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
        names: dict[bytes, str] = {}  # prepared statement name -> text, per connection
        unnamed = ""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(5)
                kind = head[:1]
                body = await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
                out.write(head + body)
                if kind == b"P":
                    self.counts.parses += 1
                    name, _, rest = body.partition(b"\0")
                    text = rest.partition(b"\0")[0].decode(errors="replace")
                    names[name] = text
                    if not name:
                        unnamed = text
                elif kind == b"B":
                    _portal, _, rest = body.partition(b"\0")
                    stmt = rest.partition(b"\0")[0]
                    unnamed = names.get(stmt, "?") if stmt else names.get(b"", unnamed)
                elif kind == b"E":
                    self.counts.executes += 1
                    self.counts.texts[_squash(unnamed)] += 1
                elif kind == b"Q":
                    self.counts.executes += 1
                    self.counts.texts[_squash(body.rstrip(b"\0").decode(errors="replace"))] += 1
                await out.drain()

    async def _server_side(self, reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
                out.write(head + body)
                if head[:1] == b"Z":
                    self.counts.round_trips += 1
                await out.drain()


class RedisCountingProxy(_LoopbackProxy):
    """A loopback TCP proxy in front of Redis that parses the clients' RESP commands:
    what the bus sends itself (commands by name) and in how many bursts (each read from
    the client's socket is one round trip: a pipeline or MULTI/EXEC block arrives in one
    write). Commands run inside scripts never cross the wire; INFO commandstats has them."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.round_trips = 0
        self.sent: Counter[str] = Counter()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        tasks = [
            asyncio.create_task(self._client_side(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the run is over and its loop is closing: nothing left to forward
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.close()

    async def _client_side(self, reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
        buffer = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 16):
                out.write(chunk)
                self.round_trips += 1
                buffer += chunk
                while (parsed := _resp_command(buffer)) is not None:
                    name, buffer = parsed
                    self.sent[name] += 1
                await out.drain()


def _resp_command(buffer: bytes) -> tuple[str, bytes] | None:
    """The first complete RESP array command in ``buffer``: its lower-case name and the
    rest; None while incomplete."""
    end = buffer.find(b"\r\n")
    if end < 0 or not buffer.startswith(b"*"):
        return None
    count, pos, name = int(buffer[1:end]), end + 2, ""
    for i in range(count):
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(buffer[pos + 1 : end])
        start = end + 2
        if len(buffer) < start + size + 2:
            return None
        if i == 0:
            name = buffer[start : start + size].decode(errors="replace").lower()
        pos = start + size + 2
    return name, buffer[pos:]


async def _pipe(reader: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(1 << 16):
            out.write(chunk)
            await out.drain()


def _squash(sql: str) -> str:
    """One line per statement shape: whitespace folded and literals (dollar-quoted or
    single-quoted) elided, so statements that inline their arguments count as one."""
    text = " ".join(sql.split())
    text = re.sub(r"\$(\w*)\$.*?\$\1\$", r"$\1$..$\1$", text)
    text = re.sub(r"'(?:[^']|'')*'", "'..'", text)
    return text if len(text) <= 160 else text[:100] + " ... " + text[-55:]


# --------------------------------------------------------------------------- services


@dataclass
class ServicesResult:
    store: str
    workers: int
    requests: int
    per_get: dict[str, float]
    per_commit: dict[str, float]
    get_texts: list[tuple[str, float]]
    commit_texts: list[tuple[str, float]]
    cycles_s: float
    bus_ms: float | None
    store_ms: float | None
    background: dict[str, float]


def _spawn(cmd: list[str], env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def bus_server(store_url: str, workers: int) -> AsyncIterator[str]:
    workdir = Path(tempfile.mkdtemp(prefix="sbus-profile-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}
    env |= {"SBUS_HOST": "127.0.0.1"}
    cmd = [*sbus_command(), "serve", "--port", str(port), "--store", store_url]
    cmd += ["--workers", str(workers)]
    log = (workdir / "server.log").open("wb")
    proc = _spawn(cmd, env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"profile: sbus serve exited: {(workdir / 'server.log').read_text()[-800:]}"
                )
            # Asynchronous: the PostgreSQL proxy runs on this event loop.
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=2) as probe:
                    if (await probe.get(f"{url}/admin/health")).status_code == 200:
                        break
            if time.monotonic() > deadline:
                raise SystemExit("profile: sbus serve not ready after 30 s")
            await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


class RedisCounter:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)

    def commandstats(self) -> Counter[str]:
        info: dict[str, Any] = self.client.info("commandstats")
        return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()})


async def _services(
    kind: str, store_url: str, workers: int, requests: int, seconds: float, clients: int
) -> ServicesResult:
    prepare_store(store_url)
    parts = urlsplit(store_url)
    proxy: PgCountingProxy | RedisCountingProxy
    if kind == "postgres":
        proxy = PgCountingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    else:
        proxy = RedisCountingProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    redis_counter = RedisCounter(store_url) if kind == "redis" else None
    await proxy.start()
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    serve_url = urlunsplit(
        parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host)
    )
    db_pids = store_server_pids(store_url)
    run = f"prof{os.getpid()}x{int(time.time())}"

    def counts() -> Any:
        if isinstance(proxy, PgCountingProxy):
            return proxy.counts.snapshot()
        assert redis_counter is not None
        return (proxy.round_trips, Counter(proxy.sent), redis_counter.commandstats())

    def delta(after: Any, before: Any) -> tuple[dict[str, float], list[tuple[str, float]]]:
        if isinstance(after, PgCounts):
            d = after.minus(before)
            per = {
                "round trips": d.round_trips / requests,
                "statements": d.executes / requests,
                "parses": d.parses / requests,
            }
            return per, [(t, n / requests) for t, n in d.texts.most_common(8)]
        sent, executed = after[1] - before[1], after[2] - before[2]
        per = {
            "round trips": (after[0] - before[0]) / requests,
            "commands sent": sum(sent.values()) / requests,
            "commands executed (scripts' included)": sum(executed.values()) / requests,
        }
        listed = [(f"sent {c}", n / requests) for c, n in sent.most_common(6)]
        listed += [(f"executed {c}", n / requests) for c, n in executed.most_common(10)]
        return per, listed

    try:
        async with bus_server(serve_url, workers) as url:
            bus_pid = [p for p in _children_of_self_named("sbus")]
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                keys = [f"{run}/k{i}" for i in range(requests)]
                for key in keys:
                    r = await client.post("/shard", json={"key": key, "content": "0"}, headers=JSON)
                    r.raise_for_status()
                idle0 = counts()
                await asyncio.sleep(1.0)
                background, _ = delta(counts(), idle0)  # upkeep traffic in 1 s, per `requests`
                background = {k: v * requests for k, v in background.items()}
                c0 = counts()
                # One agent per key, so each commit checks a one-entry DeliveryLog, as in
                # the closed loops of bench.py and peers.py.
                for i, key in enumerate(keys):
                    (
                        await client.get(f"/shard/{key}", params={"agent_id": f"{run}-a{i}"})
                    ).raise_for_status()
                c1 = counts()
                for i, key in enumerate(keys):
                    body = {
                        "key": key,
                        "expected_version": 0,
                        "delta": "1",
                        "agent_id": f"{run}-a{i}",
                    }
                    (await client.post("/commit/v2", json=body, headers=JSON)).raise_for_status()
                c2 = counts()
                per_get, get_texts = delta(c1, c0)
                per_commit, commit_texts = delta(c2, c1)

                # CPU: `clients` closed-loop agents on their own keys for `seconds`.
                done = 0
                stop_at = 0.0

                async def agent(i: int) -> None:
                    nonlocal done
                    key, name = keys[i], f"{run}-cpu{i}"
                    version = 1
                    async with httpx.AsyncClient(base_url=url, timeout=10) as own:
                        while time.monotonic() < stop_at:
                            (
                                await own.get(f"/shard/{key}", params={"agent_id": name})
                            ).raise_for_status()
                            body = {
                                "key": key,
                                "expected_version": version,
                                "delta": "x",
                                "agent_id": name,
                            }
                            (
                                await own.post("/commit/v2", json=body, headers=JSON)
                            ).raise_for_status()
                            version += 1
                            done += 1

                bus0, db0 = cpu_seconds(bus_pid), cpu_seconds(db_pids)
                start = time.monotonic()
                stop_at = start + seconds
                await asyncio.gather(*(agent(i) for i in range(min(clients, len(keys)))))
                elapsed = time.monotonic() - start
                bus1, db1 = cpu_seconds(bus_pid), cpu_seconds(db_pids)
    finally:
        await proxy.stop()
    bus_ms = (bus1 - bus0) / done * 1000 if bus0 is not None and bus1 is not None and done else None
    store_ms = (db1 - db0) / done * 1000 if db0 is not None and db1 is not None and done else None
    return ServicesResult(
        store=kind,
        workers=workers,
        requests=requests,
        per_get=per_get,
        per_commit=per_commit,
        get_texts=get_texts,
        commit_texts=commit_texts,
        cycles_s=done / elapsed,
        bus_ms=bus_ms,
        store_ms=store_ms,
        background=background,
    )


def _children_of_self_named(name: str) -> list[int]:
    """This process's direct children whose command names ``name`` (the bus we started)."""
    me = os.getpid()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            if ppid == me and name.encode() in argv:
                found.append(int(entry))
    return found


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_services(res: ServicesResult) -> None:
    print(
        f"\n## sbus serve over {res.store} ({res.workers} worker(s)), "
        f"{res.requests} GETs then {res.requests} commits"
    )
    for title, per, texts in (
        ("per GET", res.per_get, res.get_texts),
        ("per commit", res.per_commit, res.commit_texts),
    ):
        figures = ", ".join(f"{k} {v:.2f}" for k, v in per.items())
        print(f"{title}: {figures}")
        for text, n in texts:
            print(f"    {n:5.2f}  {text}")
    idle = ", ".join(f"{k} {v:.0f}" for k, v in res.background.items())
    print(f"background (upkeep) in 1 s idle: {idle}")
    print(
        f"closed loop: {res.cycles_s:.0f} cycles/s; CPU per cycle: bus {_fmt(res.bus_ms)} ms, "
        f"{res.store} server {_fmt(res.store_ms)} ms"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="inproc,services", help="inproc, services or both")
    parser.add_argument("--stores", default="memory,sqlite,postgres,redis", help="which stores")
    parser.add_argument("--cycles", type=int, default=2000, help="in process: measured cycles")
    parser.add_argument("--warmup", type=int, default=200, help="in process: unmeasured first")
    parser.add_argument("--top", type=int, default=15, help="functions listed per ranking")
    parser.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="in process: freeze start-up's objects once ready, as sbus serve does",
    )
    parser.add_argument(
        "--requests", type=int, default=200, help="services: GETs and commits counted"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="services: closed loop length")
    parser.add_argument("--clients", type=int, default=8, help="services: closed-loop agents")
    parser.add_argument("--workers", type=int, default=1, help="services: bus workers")
    parser.add_argument("--postgres-url", default=os.environ.get("SBUS_TEST_POSTGRES_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("SBUS_TEST_REDIS_URL"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    print(f"# profile_cycle: load average {loadavg()}, {os.cpu_count()} CPUs, pid {os.getpid()}")
    if "inproc" in parts:
        for store in stores:
            with tempfile.TemporaryDirectory(prefix="sbus-profile-") as tmp:
                url = {
                    "memory": "memory://",
                    "sqlite": f"sqlite:///{Path(tmp) / 'p.db'}",
                    "postgres": args.postgres_url,
                    "redis": args.redis_url,
                }.get(store)
                if not url:
                    print(f"\n## in process, {store}: skipped (no URL)")
                    continue
                if store in ("postgres", "redis"):
                    prepare_store(url)
                res = asyncio.run(
                    _inproc(url, store, args.cycles, args.warmup, args.top, args.gc_freeze)
                )
            print_inproc(res)
    if "services" in parts:
        for store in (s for s in stores if s in ("postgres", "redis")):
            url = args.postgres_url if store == "postgres" else args.redis_url
            if not url:
                print(f"\n## {store}: skipped (no URL; run under scripts/with-services.sh)")
                continue
            res_s = asyncio.run(
                _services(store, url, args.workers, args.requests, args.seconds, args.clients)
            )
            print_services(res_s)
    print(f"# done: load average {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
