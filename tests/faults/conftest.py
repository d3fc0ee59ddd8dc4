"""Fault injection: private PostgreSQL and Redis servers this suite may restart and kill,
bus processes it may start before their store or SIGKILL, and a commit load whose
outcome is checked against the store's history afterwards.

Every test owns its servers (free loopback ports, a fresh temp dir), so restarting them
disturbs no other test. PostgreSQL runs as the ``postgres`` user (it refuses root) with
``fsync=off`` for speed but ``synchronous_commit=on``: an immediate shutdown kills the
server processes, not the machine, so every acknowledged commit is in the kernel's page
cache and must survive. Redis runs with ``appendonly yes``, ``appendfsync always`` and
``noeviction``, the durability S-Bus requires of it.

The load (:func:`run_load`): agent threads loop read-then-commit on a few hot shards,
some commits over two keys through ``/commit/multi``. Each logical attempt carries a
fresh ``Idempotency-Key`` and is retried with THE SAME key until the bus gives a non-503
answer; a 409 ends the attempt (the next one re-reads). :func:`verify_history` then
checks the lost-update oracle and multi-key atomicity over the final outcomes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from tests.backends import missing
from tests.concurrency.conftest import (
    LOOPBACK,
    Server,
    free_port,
    new_client,
    recorder,
    sbus_executable,
    server_env,
)

SERVICE_TIMEOUT_S = 30.0
# The bus retries its store with capped exponential backoff (at most 5 s between tries).
RECOVERY_TIMEOUT_S = 20.0
REQUEST_TIMEOUT_S = 10.0
RETRY_PAUSE_S = 0.05
# Enough history that /history shows every commit a bounded load can make.
BUS_ENV = {"SBUS_HISTORY_DEPTH": "50000"}

INITDB_OPTIONS = ("-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

# The autouse fixture that records every request of these tests and runs the isolation
# checker on the history (tests/history): answers lost to a crash are "info" operations.
__all__ = ["recorder"]

_BUSES = pytest.StashKey[list[Server]]()


def unavailable(reason: str) -> NoReturn:
    """FAIL (skip only under SBUS_TEST_ALLOW_SKIP=1), so a missing server never passes."""
    missing(f"fault suite cannot run: {reason}")


# --- PostgreSQL ----------------------------------------------------------------------


def pg_bindir() -> Path:
    configured = os.environ.get("SBUS_TEST_PGBIN")
    candidates = [Path(configured)] if configured else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")],
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    unavailable("no PostgreSQL binaries (SBUS_TEST_PGBIN or /usr/lib/postgresql/*/bin)")


def _as_postgres(argv: Sequence[str]) -> list[str]:
    # The server refuses to run as root: run its tools as the postgres user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return list(argv)


@dataclass
class Postgres:
    """One private cluster. ``initdb`` at construction; not started."""

    bindir: Path
    root: Path
    port: int

    def __post_init__(self) -> None:
        self.datadir = self.root / "pg"
        self.logfile = self.root / "pg.log"
        self._pg(["initdb", "-D", str(self.datadir), *INITDB_OPTIONS])

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@{LOOPBACK}:{self.port}/postgres"

    def _pg(self, argv: list[str], timeout: float = SERVICE_TIMEOUT_S + 10) -> None:
        cmd = _as_postgres([str(self.bindir / argv[0]), *argv[1:]])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({done.returncode}): {done.stderr}\n{self.log_text()}"
            )

    def _ctl(self) -> list[str]:
        return ["pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "30"]

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except (FileNotFoundError, PermissionError):
            return "<no PostgreSQL log>"

    def start(self, settings: str = "-c fsync=off -c synchronous_commit=on") -> None:
        """Start with ``settings`` (server options; the default is fast but keeps every
        acknowledged commit across a server crash)."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={LOOPBACK} "
            f"-c max_connections=200 {settings}"
        )
        self._pg([*self._ctl(), "-o", options, "start"])

    def restart_immediate(self) -> None:
        """Kill every server process without a checkpoint (a crash), then start again
        with the same options; the restart runs crash recovery from the WAL."""
        self._pg([*self._ctl(), "-m", "immediate", "restart"])

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._pg(["pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop"])

    def migrate(self) -> None:
        done = subprocess.run(
            [sbus_executable(), "migrate", "--store", self.url],
            capture_output=True,
            text=True,
            timeout=60,
            env=server_env(),
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sbus migrate failed ({done.returncode}): {done.stderr}")


@pytest.fixture
def service_root() -> Iterator[Path]:
    """A temp dir the postgres user can reach (pytest's tmp_path is root-only)."""
    root = Path(tempfile.mkdtemp(prefix="sbus-faults-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres(service_root: Path) -> Iterator[Postgres]:
    """A private PostgreSQL, initialised but NOT started (the test decides when)."""
    bindir = pg_bindir()
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        unavailable("runuser is missing: cannot run PostgreSQL as the postgres user")
    try:
        pg = Postgres(bindir, service_root, free_port())
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        unavailable(f"initdb failed: {exc}")
    yield pg
    pg.stop()


@pytest.fixture
def running_postgres(postgres: Postgres) -> Postgres:
    """A private PostgreSQL, started and migrated."""
    try:
        postgres.start()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        unavailable(f"PostgreSQL did not start: {exc}")
    postgres.migrate()
    return postgres


# --- Redis ---------------------------------------------------------------------------


def redis_ping(port: int) -> bool:
    """True once the server answers PING with PONG (not -LOADING while it replays AOF)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One private, durable Redis. Not started at construction."""

    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def logfile(self) -> Path:
        return self.root / "redis.log"

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return "<no Redis log>"

    def start(self) -> None:
        """Start (again) over the same --dir, so a restart replays the same AOF."""
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.starts += 1
        self.process = subprocess.Popen(
            [
                binary,
                *("--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.root)),
                *("--logfile", str(self.logfile), "--daemonize", "no", "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always"),
                *("--maxmemory-policy", "noeviction"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + SERVICE_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited {self.process.returncode}:\n" + self.log_text()
                )
            if redis_ping(self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not answering after {SERVICE_TIMEOUT_S}s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final AOF rewrite; what was fsynced is what survives."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=SERVICE_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=SERVICE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def redis_server(service_root: Path) -> Iterator[RedisServer]:
    """A private Redis, NOT started (the test decides when)."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    server = RedisServer(service_root / "redis", free_port())
    server.root.mkdir()
    yield server
    server.stop()


@pytest.fixture
def running_redis(redis_server: RedisServer) -> RedisServer:
    try:
        redis_server.start()
    except RuntimeError as exc:
        unavailable(f"Redis did not start: {exc}")
    return redis_server


# --- bus processes -------------------------------------------------------------------


def spawn_bus(store_url: str, env: Mapping[str, str], *, log_dir: Path) -> Server:
    """Start ``sbus serve`` on a free port; do not wait for anything."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = server_env({**BUS_ENV, **env})
    port = free_port()
    log_path = log_dir / f"sbus-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sbus_executable(), "serve", "--port", str(port), "--store", store_url],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(f"http://{LOOPBACK}:{port}", port, store_url, log_path, process, full_env)


def wait_live(server: Server) -> None:
    """Wait until the listener answers ``/livez`` (the store may not exist yet)."""
    deadline = time.monotonic() + SERVICE_TIMEOUT_S
    with httpx.Client(base_url=server.base_url, timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"sbus serve exited early; log:\n{server.log_text()}")
            try:
                if client.get("/livez").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"sbus serve never answered /livez; log:\n{server.log_text()}")


def kill_bus(server: Server) -> None:
    """SIGKILL the bus and every worker of it (its own process group): a crash."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=SERVICE_TIMEOUT_S)


class Buses:
    """Bus processes a test starts; all stopped at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[Server] = []

    def launch(
        self, store_url: str, env: Mapping[str, str] | None = None, *, count: int = 1
    ) -> list[Server]:
        """``count`` buses over one store, started together; returns once each answers
        ``/livez`` (not waiting for the store)."""
        started = [spawn_bus(store_url, env or {}, log_dir=self.log_dir) for _ in range(count)]
        self.servers.extend(started)
        for server in started:
            wait_live(server)
        return started

    def start(
        self, store_url: str, env: Mapping[str, str] | None = None, *, count: int = 1
    ) -> list[Server]:
        """Like :meth:`launch`, then wait until each one's ``/admin/health`` is 200."""
        started = self.launch(store_url, env, count=count)
        for server in started:
            wait_healthy(server.base_url, SERVICE_TIMEOUT_S)
        return started

    def tracebacks(self) -> int:
        return sum(s.log_text().count("Traceback") for s in self.servers)


@pytest.fixture
def buses(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Buses]:
    tracker = Buses(tmp_path / "logs")
    request.node.stash[_BUSES] = tracker.servers
    yield tracker
    for server in tracker.servers:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for server in item.stash.get(_BUSES, []):
            report.sections.append((f"sbus log {server.base_url}", server.log_text()))
    return report


def wait_healthy(base_url: str, timeout: float, *, streak: int = 5) -> float:
    """Seconds until ``/admin/health`` answered 200 ``streak`` times in a row, each on a
    new connection. Fails the test if that takes longer than ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    good = 0
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with httpx.Client(base_url=base_url, timeout=2.0, trust_env=False) as client:
                resp = client.get("/admin/health")
            last = f"{resp.status_code} {resp.text}"
            good = good + 1 if resp.status_code == 200 else 0
        except httpx.TransportError as exc:
            last, good = repr(exc), 0
        if good >= streak:
            return time.monotonic() - start
        time.sleep(0.05)
    pytest.fail(f"{base_url} not healthy within {timeout}s (last: {last})", pytrace=False)


def problem_of_503(resp: httpx.Response) -> str | None:
    """Why a 503 is not a well-formed StoreUnavailable problem (or None)."""
    media = resp.headers.get("content-type", "").split(";")[0].strip()
    retry_after = resp.headers.get("retry-after")
    try:
        body = resp.json()
    except ValueError:
        return f"503 with a non-JSON body: {resp.text!r}"
    wrong = []
    if media != "application/problem+json":
        wrong.append(f"content-type {media!r}")
    if retry_after is None or not retry_after.isdigit():
        wrong.append(f"Retry-After {retry_after!r}")
    if not isinstance(body, dict) or body.get("error") != "StoreUnavailable":
        wrong.append("error is not StoreUnavailable")
    elif body.get("status") != 503 or not isinstance(body.get("detail"), str):
        wrong.append("status/detail fields")
    elif body.get("outcome") not in ("not_applied", "unknown"):
        wrong.append(f"outcome {body.get('outcome')!r}")
    if wrong:
        return f"{resp.request.method} {resp.request.url.path} -> 503 ({', '.join(wrong)}): " + (
            resp.text
        )
    return None


# --- the load ------------------------------------------------------------------------

HOT_KEYS = ("hot/a", "hot/b", "hot/c")
PAIRS = (("hot/a", "hot/b"), ("hot/b", "hot/c"))


@dataclass
class Attempt:
    """One logical commit attempt: one Idempotency-Key, any number of sends."""

    agent: str
    seq: int
    writes: tuple[tuple[str, int, str], ...]  # (key, expected_version, delta)
    idem_key: str
    started_at: float
    trail: list[str] = field(default_factory=list)  # one entry per send
    status: int | None = None  # the final, non-503 status; None = never resolved
    commit_id: str | None = None
    replayed: bool = False

    @property
    def multi(self) -> bool:
        return len(self.writes) > 1


@dataclass
class Load:
    """Shared state of one load run."""

    urls: list[str]
    failover: bool  # a transport error moves the agent to the next bus (else: a violation)
    stop: threading.Event = field(default_factory=threading.Event)
    hard_deadline: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: list[Attempt] = field(default_factory=list)
    tally: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        with self.lock:
            self.tally[what] += 1

    def violation(self, what: str) -> None:
        with self.lock:
            self.violations.append(what)

    def successes_after(self, moment: float) -> int:
        """Fresh (not replayed) 200s of attempts first sent after ``moment``."""
        return sum(
            1 for a in self.attempts if a.status == 200 and not a.replayed and a.started_at > moment
        )


class Agent:
    """One agent thread: its own identity, a client per bus, a preferred bus."""

    def __init__(self, load: Load, index: int, multi_share: float) -> None:
        self.load = load
        self.name = f"agent-{index}"
        self.rng = random.Random(index)
        self.multi_share = multi_share
        self.bus = index % len(load.urls)
        self.clients = [new_client(url, timeout=REQUEST_TIMEOUT_S) for url in load.urls]

    def _transport_error(self, what: str, exc: httpx.TransportError) -> None:
        self.load.note(f"transport:{what}:{self.load.urls[self.bus]}")
        if not self.load.failover:
            self.load.violation(f"{self.name} {what} on {self.load.urls[self.bus]}: {exc!r}")
        self.bus = (self.bus + 1) % len(self.clients)
        time.sleep(RETRY_PAUSE_S)

    def _overdue(self, what: str) -> bool:
        if time.monotonic() > self.load.hard_deadline:
            self.load.violation(f"{self.name}: no non-503 answer to {what} before the deadline")
            return True
        return False

    def read_version(self, key: str) -> int | None:
        """The shard's current version (an unrecorded read); None if the run is over."""
        while not self.load.stop.is_set() and not self._overdue(f"GET {key}"):
            try:
                resp = self.clients[self.bus].get(f"/shard/{key}", params={"record": "false"})
            except httpx.TransportError as exc:
                self._transport_error("read", exc)
                continue
            if resp.status_code == 200:
                version: int = resp.json()["version"]
                return version
            if resp.status_code == 503:
                self._record_503("read", resp)
                continue
            self.load.violation(f"{self.name} GET {key} -> {resp.status_code}: {resp.text}")
            return None
        return None

    def _record_503(self, kind: str, resp: httpx.Response) -> str:
        problem = problem_of_503(resp)
        if problem is not None:
            self.load.violation(problem)
            outcome = "malformed"
        else:
            outcome = str(resp.json()["outcome"])
        self.load.note(f"503:{kind}:{outcome}")
        time.sleep(RETRY_PAUSE_S)
        return outcome

    def run(self) -> None:
        seq = 0
        try:
            while not self.load.stop.is_set():
                if self.rng.random() < self.multi_share:
                    keys: tuple[str, ...] = self.rng.choice(PAIRS)
                else:
                    keys = (self.rng.choice(HOT_KEYS),)
                versions = [self.read_version(k) for k in keys]
                if any(v is None for v in versions):
                    return
                kind = "multi" if len(keys) > 1 else "single"
                writes = tuple(
                    (k, v, f"{kind}:{self.name}:{seq}:{k}")
                    for k, v in zip(keys, versions, strict=True)
                    if v is not None
                )
                attempt = Attempt(
                    self.name, seq, writes, uuid.uuid4().hex, started_at=time.monotonic()
                )
                with self.load.lock:
                    self.load.attempts.append(attempt)
                self.resolve(attempt)
                seq += 1
        finally:
            for client in self.clients:
                client.close()

    def resolve(self, attempt: Attempt) -> None:
        """Send until a non-503 answer, always with the attempt's Idempotency-Key."""
        session = "+".join(k for k, _, _ in attempt.writes)
        if attempt.multi:
            path = "/commit/multi"
            body: dict[str, Any] = {
                "agent_id": self.name,
                "session_id": session,
                "writes": [
                    {"key": k, "expected_version": v, "delta": d} for k, v, d in attempt.writes
                ],
            }
        else:
            path = "/commit"
            key, expected, delta = attempt.writes[0]
            body = {
                "key": key,
                "expected_version": expected,
                "delta": delta,
                "agent_id": self.name,
                "session_id": session,
            }
        headers = {"Idempotency-Key": attempt.idem_key}
        while not self._overdue(f"{path} {attempt.idem_key} (trail {attempt.trail[-6:]})"):
            try:
                resp = self.clients[self.bus].post(path, json=body, headers=headers)
            except httpx.TransportError as exc:
                attempt.trail.append(f"transport:{type(exc).__name__}")
                self._transport_error("commit", exc)
                continue
            if resp.status_code == 503:
                attempt.trail.append("503:" + self._record_503("commit", resp))
                continue
            attempt.trail.append(str(resp.status_code))
            attempt.status = resp.status_code
            self._judge(attempt, resp)
            return

    def _judge(self, attempt: Attempt, resp: httpx.Response) -> None:
        load, status = self.load, resp.status_code
        replayed = resp.headers.get("idempotent-replayed") == "true"
        after_fault = any(not t.isdigit() for t in attempt.trail[:-1])
        if status == 200:
            data = resp.json()
            attempt.commit_id = str(data["commit_id"])
            attempt.replayed = replayed
            if attempt.multi:
                got = [(r["key"], r["new_version"]) for r in data["results"]]
            else:
                got = [(attempt.writes[0][0], data["new_version"])]
            want = [(k, v + 1) for k, v, _ in attempt.writes]
            if got != want:
                load.violation(f"{attempt.agent}#{attempt.seq} 200 with {got}, wanted {want}")
            if replayed and not after_fault:
                load.violation(f"{attempt.agent}#{attempt.seq} replayed on its first send")
            load.note(f"200:{'replayed' if replayed else 'fresh'}")
        elif status == 409:
            code = resp.json().get("error")
            if code != "VersionMismatch":
                load.violation(f"{attempt.agent}#{attempt.seq} 409 {code}: {resp.text}")
            load.note("409")
        else:
            load.violation(
                f"{attempt.agent}#{attempt.seq} {resp.request.method} {resp.request.url.path}"
                f" -> {status}: {resp.text}"
            )
            load.note(str(status))
        if after_fault:
            load.note(f"resolved-after-fault:{status}:{'replayed' if replayed else 'fresh'}")


def seed_shards(base_url: str) -> None:
    with new_client(base_url) as client:
        for key in HOT_KEYS:
            resp = client.post("/shard", json={"key": key, "content": ""})
            assert resp.status_code == 201, resp.text


def run_load(
    urls: Sequence[str],
    fault: Callable[[Load], None],
    *,
    agents: int = 6,
    multi_share: float = 0.3,
    failover: bool = False,
    hard_timeout: float = 40.0,
    settle_timeout: float = 15.0,
) -> Load:
    """Run agent threads while ``fault(load)`` runs in this thread; stop them when it
    returns. An attempt still without a non-503 answer ``settle_timeout`` seconds after
    the fault ends (or ``hard_timeout`` after the start) is a violation: no recovery."""
    load = Load(list(urls), failover, hard_deadline=time.monotonic() + hard_timeout)
    workers = [Agent(load, i, multi_share) for i in range(agents)]
    threads = [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        fault(load)
    finally:
        load.hard_deadline = min(load.hard_deadline, time.monotonic() + settle_timeout)
        load.stop.set()
        for thread in threads:
            thread.join(max(0.0, load.hard_deadline - time.monotonic()) + REQUEST_TIMEOUT_S)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        load.violation(f"agent threads still running: {stuck}")
    return load


# --- verification --------------------------------------------------------------------


def history(client: httpx.Client, key: str) -> dict[int, dict[str, Any]]:
    """Every retained history entry of ``key`` by version."""
    entries: dict[int, dict[str, Any]] = {}
    before: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if before is not None:
            params["before"] = before
        resp = client.get(f"/history/{key}", params=params)
        assert resp.status_code == 200, resp.text
        page: list[dict[str, Any]] = resp.json()["entries"]
        for entry in page:
            entries[entry["version"]] = entry
        if not page or page[-1]["version"] == 0:
            return entries
        before = page[-1]["version"]


def verify_history(base_url: str, load: Load) -> list[str]:
    """The lost-update oracle and multi-key atomicity over the final outcomes.

    For each hot shard: the expected_versions of the 200-answered writes are exactly
    0..final-1, each once; version v in /history is the write that expected v-1 (its
    delta, its commit_id), so no acknowledged commit is lost and none is applied twice;
    the final content is the last success's delta. Every history entry belongs to an
    attempt the client saw answered 200 (no commit applied behind a 409 or a lost
    answer), and a multi commit's commit_id is in the history of both its keys."""
    problems: list[str] = []
    by_name = {(a.agent, a.seq): a for a in load.attempts}
    with new_client(base_url) as client:
        finals: dict[str, dict[str, Any]] = {}
        for key in HOT_KEYS:
            resp = client.get(f"/shard/{key}", params={"record": "false"})
            assert resp.status_code == 200, resp.text
            finals[key] = resp.json()
        hist = {key: history(client, key) for key in HOT_KEYS}
    for key in HOT_KEYS:
        final = int(finals[key]["version"])
        wins = sorted(
            (v, d, a.commit_id)
            for a in load.attempts
            if a.status == 200
            for k, v, d in a.writes
            if k == key
        )
        expected = [v for v, _, _ in wins]
        if expected != list(range(final)):
            dup = sorted(v for v, n in Counter(expected).items() if n > 1)
            gaps = sorted(set(range(final)) - set(expected))
            problems.append(
                f"{key}: final version {final} but successful expected_versions have "
                f"duplicates {dup[:10]} and gaps {gaps[:10]} ({len(expected)} successes)"
            )
            continue
        if final and finals[key]["content"] != wins[-1][1]:
            problems.append(
                f"{key}: final content {finals[key]['content']!r}, last success {wins[-1][1]!r}"
            )
        if sorted(hist[key]) != list(range(final + 1)):
            problems.append(f"{key}: history versions {sorted(hist[key])[:5]}... of 0..{final}")
            continue
        for v, delta, commit_id in wins:
            entry = hist[key][v + 1]
            if entry["content"] != delta or entry["commit_id"] != commit_id:
                problems.append(
                    f"{key} v{v + 1}: history has {entry['content']!r} {entry['commit_id']}, "
                    f"the client got 200 for {delta!r} {commit_id}"
                )
    for key in HOT_KEYS:
        for version, entry in sorted(hist[key].items()):
            if version == 0:
                continue
            parts = str(entry["content"]).split(":")
            attempt = by_name.get((parts[1], int(parts[2]))) if len(parts) == 4 else None
            if attempt is None:
                problems.append(f"{key} v{version}: {entry['content']!r} was never sent")
                continue
            if attempt.status != 200:
                problems.append(
                    f"{key} v{version}: {entry['content']!r} is applied but its client got "
                    f"{attempt.status} (trail {attempt.trail})"
                )
            for other, _, delta in attempt.writes:
                partner = [e for e in hist[other].values() if e["commit_id"] == entry["commit_id"]]
                if len(partner) != 1 or partner[0]["content"] != delta:
                    problems.append(
                        f"half-applied multi {entry['commit_id']}: in {key} v{version} but "
                        f"{other} has {[(e['version'], e['content']) for e in partner]}"
                    )
    return problems


def summary(load: Load) -> str:
    resolved = Counter(str(a.status) for a in load.attempts)
    multi = sum(1 for a in load.attempts if a.multi and a.status == 200)
    return (
        f"{len(load.attempts)} attempts, final statuses {dict(resolved)}, "
        f"{multi} multi commits; tally {dict(sorted(load.tally.items()))}"
    )
