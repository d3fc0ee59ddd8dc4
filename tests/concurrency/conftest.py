"""Real ``sbus serve`` processes for the concurrency suite, and the helpers its tests share.

:func:`start_server` is the reusable part: it starts one bus process over any store URL
on a free loopback port, waits until ``GET /admin/health`` answers 200 and returns a
:class:`Server`. A :class:`ServerGroup` stops every process it started (SIGTERM, then
SIGKILL of its process group) and reports tracebacks and bad exit codes; the
``start_sbus`` fixture is one group per test, and every server's log is attached to the
report of a failing test.

Topologies: the ``bus`` fixture runs a test once per :data:`TOPOLOGIES` entry:

- ``sqlite-1``: one bus process over a fresh SQLite file;
- ``postgres-2``: two bus processes (``--workers 1`` each, so two replicas) on different
  ports over the one PostgreSQL server ``make test`` started (migrated, then wiped);
- ``redis-2``: the same over the shared Redis server (wiped).

Tests spread their clients over :attr:`Bus.urls` so that what one replica recorded is
checked by the other: nothing that matters may live in a bus process (protocol.md §7).
``fresh_bus`` is the same per topology, but started once per module (``module_bus``) and
emptied by ``POST /admin/reset`` before each test: for modules of many short tests.

Histories: every client :func:`new_client` makes is recorded (``tests.history``) into
the running test's history, and the autouse ``recorder`` fixture runs the isolation
checker on it at teardown (real-time ORILegal, WWSerial, Adya's graph, mandates; see
docs/isolation.md). A test that records anomalies on purpose sets
``recorder.checked_by_test`` and checks them itself.

Clients talk to ``127.0.0.1`` only, with ``trust_env=False`` so no proxy variable can
route the traffic elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from tests import backends
from tests.history.check import Summary
from tests.history.client import Recorder, answered
from tests.history.verify import verify

JSON_HEADERS = {"Content-Type": "application/json"}
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# Statuses a well-behaved bus may answer to the commits these tests send; anything else
# (a 500, a 503 from a busy store, a 422) fails the test with the body printed.
COMMIT_STATUSES = frozenset({200, 409, 410})

_SERVERS = pytest.StashKey[list["Server"]]()


@dataclass
class Server:
    """One ``sbus serve`` process. ``stop`` is idempotent."""

    base_url: str
    port: int
    store_url: str
    log_path: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(repr=False)
    killed: bool = False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (the bus drains in-flight requests), then SIGKILL of the process group
        this helper created if it has not exited within ``timeout``. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                # start_new_session=True made the server the leader of its own group, so
                # this reaches its uvicorn workers and nothing else.
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        return self.process.returncode


def free_port() -> int:
    """A port the kernel just handed out on loopback (the tiny reuse race is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def sqlite_url(directory: Path, name: str = "sbus.db") -> str:
    return f"sqlite:///{directory / name}"


def sbus_executable() -> str:
    beside = Path(sys.executable).parent / "sbus"
    if beside.exists():
        return str(beside)
    found = shutil.which("sbus")
    if found is None:
        raise RuntimeError("the `sbus` command is not installed (run `make dev`)")
    return found


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without any ``SBUS_*`` setting that could leak in, plus
    admin routes and test hooks, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SBUS_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update({"SBUS_ADMIN_ENABLED": "1", "SBUS_TEST_HOOKS": "1", "SBUS_HOST": LOOPBACK})
    if extra:
        env.update(extra)
    return env


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(base_url=server.base_url, timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(
                    f"sbus serve exited with {server.process.returncode} before it was "
                    f"healthy; log:\n{server.log_text()}"
                )
            try:
                resp = client.get("/admin/health")
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if resp.status_code == 200:
                    return
                last = f"{resp.status_code} {resp.text}"
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(
        f"sbus serve not healthy after {timeout}s (last: {last}); log:\n{server.log_text()}"
    )


def start_server(
    store_url: str,
    env: Mapping[str, str] | None = None,
    *,
    log_dir: Path,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    attempts: int = 3,
    workers: int | None = None,
) -> Server:
    """Start ``sbus serve --store store_url`` on a free loopback port and wait until it
    is healthy. Several servers may share one ``store_url`` (a shared PostgreSQL or
    Redis store); each gets its own port and log file in ``log_dir``. ``workers`` is
    passed as ``--workers`` (default: the bus's own, one per core for shared stores)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = server_env(env)
    for attempt in range(attempts):
        port = free_port()
        log_path = log_dir / f"sbus-{port}.log"
        argv = [sbus_executable(), "serve", "--port", str(port), "--store", store_url]
        if workers is not None:
            argv += ["--workers", str(workers)]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                argv,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(
            base_url=f"http://{LOOPBACK}:{port}",
            port=port,
            store_url=store_url,
            log_path=log_path,
            process=process,
            env=full_env,
        )
        try:
            _wait_healthy(server, startup_timeout)
        except RuntimeError:
            server.stop()
            if attempt + 1 < attempts and "address already in use" in server.log_text():
                continue
            raise
        return server
    raise AssertionError("unreachable")


class ServerStarter(Protocol):
    def __call__(
        self, store_url: str, env: Mapping[str, str] | None = None, *, workers: int | None = None
    ) -> Server: ...


class ServerGroup:
    """Servers started for one test (or one module); :meth:`stop_all` stops them all and
    says what went wrong. ``start`` may be called from several threads at once."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[Server] = []
        self._lock = threading.Lock()

    def start(
        self, store_url: str, env: Mapping[str, str] | None = None, *, workers: int | None = None
    ) -> Server:
        server = start_server(store_url, env, log_dir=self.log_dir, workers=workers)
        with self._lock:
            self.servers.append(server)
        return server

    def start_replicas(
        self, store_url: str, count: int, env: Mapping[str, str] | None = None
    ) -> tuple[Server, ...]:
        """``count`` single-worker processes over one store, started in parallel (each
        startup costs a second or two on a loaded machine)."""
        if count == 1:
            return (self.start(store_url, env, workers=1),)
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(self.start, store_url, env, workers=1) for _ in range(count)]
            return tuple(f.result() for f in futures)

    def stop_all(self) -> list[str]:
        """Stop every server; the problems (ignored SIGTERM, bad exit code, traceback in
        the log), empty when all is well."""
        problems: list[str] = []
        for server in self.servers:
            code = server.stop()
            if server.killed:
                problems.append(f"{server.base_url} ignored SIGTERM for {STOP_TIMEOUT_S}s")
            elif code != 0:
                # A graceful stop exits 0, with one worker or several (operations.md §6).
                problems.append(f"{server.base_url} exited with {code} after SIGTERM")
            if "Traceback" in server.log_text():
                problems.append(f"{server.base_url} logged a traceback")
        return problems

    def fail_on(self, problems: list[str]) -> None:
        if problems:
            logs = "\n".join(f"--- {s.log_path} ---\n{s.log_text()}" for s in self.servers)
            pytest.fail("; ".join(problems) + "\n" + logs)


def attach_logs(item: pytest.Item, servers: Sequence[Server]) -> None:
    """Attach these servers' logs to ``item``'s report if it fails."""
    item.stash.setdefault(_SERVERS, []).extend(servers)


@pytest.fixture
def start_sbus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerStarter]:
    """``server = start_sbus(store_url, env)``: any number of servers, all stopped at
    teardown. A server that logged a traceback fails the test."""
    group = ServerGroup(tmp_path / "logs")
    request.node.stash[_SERVERS] = group.servers
    yield group.start
    group.fail_on(group.stop_all())


# --- topologies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """``replicas`` bus processes over one ``store`` ("sqlite", "postgres" or "redis")."""

    name: str
    store: str
    replicas: int

    def __str__(self) -> str:
        return self.name


SQLITE_1 = Topology("sqlite-1", "sqlite", 1)
POSTGRES_2 = Topology("postgres-2", "postgres", 2)
REDIS_2 = Topology("redis-2", "redis", 2)
TOPOLOGIES = (SQLITE_1, POSTGRES_2, REDIS_2)
SHARED_TOPOLOGIES = (POSTGRES_2, REDIS_2)


def prepare_store(topology: Topology, tmp_path: Path) -> str:
    """The store URL for ``topology``, ready and empty: a fresh SQLite file, or the shared
    server (the test fails when it is unreachable, see tests/backends.py), migrated once per run
    (PostgreSQL) and wiped."""
    if topology.store == "sqlite":
        return sqlite_url(tmp_path)
    asyncio.run(backends.require(topology.store))
    asyncio.run(backends.wipe(topology.store))
    return backends.POSTGRES_URL if topology.store == "postgres" else backends.REDIS_URL


@dataclass(frozen=True)
class Bus:
    """The replicas of one topology; ``url(i)`` spreads client ``i`` over them."""

    topology: Topology
    servers: tuple[Server, ...]

    @property
    def urls(self) -> list[str]:
        return [s.base_url for s in self.servers]

    @property
    def replicas(self) -> int:
        return len(self.servers)

    def url(self, i: int) -> str:
        return self.servers[i % len(self.servers)].base_url


@pytest.fixture(params=TOPOLOGIES, ids=str)
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bus]:
    """The bus for one topology (all of :data:`TOPOLOGIES` unless a test parametrizes
    ``bus`` indirectly), stopped at teardown."""
    topology: Topology = request.param
    group = ServerGroup(tmp_path / "logs")
    request.node.stash[_SERVERS] = group.servers
    try:
        store = prepare_store(topology, tmp_path)
        servers = group.start_replicas(store, topology.replicas)
    except BaseException:
        group.stop_all()
        raise
    yield Bus(topology, servers)
    group.fail_on(group.stop_all())


@pytest.fixture(scope="module", params=TOPOLOGIES, ids=str)
def module_bus(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bus]:
    """Like ``bus``, but started once per topology for a whole module (a bus process
    costs seconds to start); tests take it through ``fresh_bus``."""
    topology: Topology = request.param
    tmp_path = tmp_path_factory.mktemp(f"bus-{topology.name}")
    group = ServerGroup(tmp_path / "logs")
    try:
        store = prepare_store(topology, tmp_path)
        servers = group.start_replicas(store, topology.replicas)
    except BaseException:
        group.stop_all()
        raise
    yield Bus(topology, servers)
    group.fail_on(group.stop_all())


@pytest.fixture
def fresh_bus(request: pytest.FixtureRequest, module_bus: Bus) -> Bus:
    """The module's bus for one test, emptied first by ``POST /admin/reset`` (shards,
    history, sessions, counters, idempotency records and the test clock, protocol.md
    section 2.9), so the test sees a fresh bus; its logs go with the test's report."""
    attach_logs(request.node, module_bus.servers)
    with new_client(module_bus.url(0)) as client:
        expect(client.post("/admin/reset"), [200])
    return module_bus


def assert_replicas_agree(bus: Bus) -> dict[str, Any]:
    """``/stats`` from every replica; they must be identical (the counters live in the
    store). Returns them."""
    answers = []
    for url in bus.urls:
        with new_client(url) as client:
            answers.append(get_stats(client))
    for url, stats in zip(bus.urls[1:], answers[1:], strict=True):
        assert stats == answers[0], f"{url} disagrees with {bus.urls[0]}: {stats} != {answers[0]}"
    return answers[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    servers = item.stash.get(_SERVERS, [])
    if report.failed and servers:
        for server in servers:
            report.sections.append((f"sbus server log {server.base_url}", server.log_text()))
    return report


# --- client-side helpers ------------------------------------------------------------------


_RECORDING: list[Recorder] = []  # the running test's recorder, if any


def _sent(client_key: int, request: httpx.Request) -> None:
    # Looked up per request: a client made by a module-scoped fixture records into
    # whichever test is running.
    if _RECORDING:
        _RECORDING[-1].sent(client_key, request)


def new_client(base_url: str, timeout: float = 30.0) -> httpx.Client:
    """One connection per simulated agent; never a proxy. Its requests are recorded
    into the running test's history."""
    client = httpx.Client(base_url=base_url, headers=JSON_HEADERS, timeout=timeout, trust_env=False)
    key = id(client)
    client.event_hooks = {"request": [lambda r: _sent(key, r)], "response": [answered]}
    return client


@pytest.fixture(autouse=True)
def recorder(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """This test's history; checked when the test ends (unless it checks it itself)."""
    current = Recorder()
    _RECORDING.append(current)
    try:
        yield current
    finally:
        _RECORDING.remove(current)
    if current.checked_by_test:
        return
    for part, recorded in enumerate(current.histories()):
        if len(recorded):
            label = f"{request.node.nodeid}-{part}" if part else request.node.nodeid
            summary: Summary = verify(recorded.ops, label=label)
            print(f"\nhistory {label}: {summary}")


def expect(resp: httpx.Response, allowed: frozenset[int] | Sequence[int]) -> int:
    """The status, or a test failure that shows the request and the whole body."""
    if resp.status_code not in allowed:
        pytest.fail(
            f"{resp.request.method} {resp.request.url} -> {resp.status_code} "
            f"(allowed {sorted(allowed)}): {resp.text}",
            pytrace=False,
        )
    return resp.status_code


def create_shard(client: httpx.Client, key: str, content: str = "") -> int:
    resp = client.post("/shard", json={"key": key, "content": content})
    expect(resp, [201])
    version: int = resp.json()["version"]
    return version


def get_stats(client: httpx.Client) -> dict[str, Any]:
    resp = client.get("/stats")
    expect(resp, [200])
    stats: dict[str, Any] = resp.json()
    return stats


def run_threads(
    targets: Sequence[Callable[[], None]],
    *,
    timeout: float,
    on_error: Callable[[], None] | None = None,
) -> None:
    """Run each target in its own thread and re-raise the first failure.

    ``on_error`` runs as soon as any thread fails (abort barriers, set stop events) so
    the others cannot wait forever for a partner that is gone. Threads still running at
    ``timeout`` fail the test."""
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                with lock:
                    errors.append(exc)
                if on_error is not None:
                    on_error()

        return run

    threads = [
        threading.Thread(target=wrap(t), name=f"agent-{i}", daemon=True)
        for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck and on_error is not None:
        on_error()
    # Real failures first: a stuck thread is usually waiting for one that failed.
    primary = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if primary or errors:
        raise (primary or errors)[0]
    if stuck:
        pytest.fail(f"threads still running after {timeout}s: {stuck}", pytrace=False)
