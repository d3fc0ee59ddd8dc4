"""Real ``sbus serve`` processes for the concurrency suite, and the helpers its tests share.

:func:`start_server` is the reusable part: it starts one bus process over any store URL
(a fresh SQLite file here; later two processes over one shared PostgreSQL or Redis
store) on a free loopback port, waits until ``GET /admin/health`` answers 200 and
returns a :class:`Server`. The ``start_sbus`` fixture wraps it so every process a test
starts is stopped at teardown (SIGTERM, then SIGKILL of its process group) and its log
is attached to the report of a failing test.

Clients talk to ``127.0.0.1`` only, with ``trust_env=False`` so no proxy variable can
route the traffic elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

JSON_HEADERS = {"Content-Type": "application/json"}
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# Statuses a well-behaved bus may answer to the requests these tests send; anything else
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
) -> Server:
    """Start ``sbus serve --store store_url`` on a free loopback port and wait until it
    is healthy. Several servers may share one ``store_url`` (a shared PostgreSQL or
    Redis store); each gets its own port and log file in ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = server_env(env)
    for attempt in range(attempts):
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
    def __call__(self, store_url: str, env: Mapping[str, str] | None = None) -> Server: ...


@pytest.fixture
def start_sbus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerStarter]:
    """``server = start_sbus(store_url, env)``: any number of servers, all stopped at
    teardown. A server that logged a traceback fails the test."""
    servers: list[Server] = []
    request.node.stash[_SERVERS] = servers

    def start(store_url: str, env: Mapping[str, str] | None = None) -> Server:
        server = start_server(store_url, env, log_dir=tmp_path / "logs")
        servers.append(server)
        return server

    yield start
    problems: list[str] = []
    for server in servers:
        code = server.stop()
        if server.killed:
            problems.append(f"{server.base_url} ignored SIGTERM for {STOP_TIMEOUT_S}s")
        elif code not in (0, -signal.SIGTERM):
            # uvicorn re-raises the SIGTERM it handled after draining, hence -SIGTERM.
            problems.append(f"{server.base_url} exited with {code} after SIGTERM")
        if "Traceback" in server.log_text():
            problems.append(f"{server.base_url} logged a traceback")
    if problems:
        logs = "\n".join(f"--- {s.log_path} ---\n{s.log_text()}" for s in servers)
        pytest.fail("; ".join(problems) + "\n" + logs)


@pytest.fixture
def sbus_server(start_sbus: ServerStarter, tmp_path: Path) -> Server:
    """One bus process over a fresh SQLite file in the test's tmp dir."""
    return start_sbus(sqlite_url(tmp_path))


@pytest.fixture
def base_url(sbus_server: Server) -> str:
    return sbus_server.base_url


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    servers = item.stash.get(_SERVERS, [])
    if report.failed and servers:
        for server in servers:
            report.sections.append((f"sbus server log {server.base_url}", server.log_text()))
    return report


# --- client-side helpers ------------------------------------------------------------------


def new_client(base_url: str, timeout: float = 30.0) -> httpx.Client:
    """One connection per simulated agent; never a proxy."""
    return httpx.Client(base_url=base_url, headers=JSON_HEADERS, timeout=timeout, trust_env=False)


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
