"""``sbus serve`` stopped by SIGTERM (docs/operations.md section 6), on real processes.

- A request in flight when the signal comes finishes with its answer (``Connection:
  close``) and its commit is stored, while a new connection is already refused; the
  process exits 0, one worker or several, and on PostgreSQL none of its connections is
  left. The requests are made slow without any hook in the server: on SQLite a POST whose
  body the client holds back (``Expect: 100-continue`` proves the app is reading it), on
  PostgreSQL a commit waiting on a row lock the test holds.
- ``SBUS_SHUTDOWN_DELAY``: /admin/health answers 503 "shutting down" on every worker
  while the routes still serve, every answer carries ``Connection: close`` (a connection
  idle in keep-alive serves one more request, then closes; one still idle when the
  delay ends is closed), and a second Ctrl-C (SIGINT to the process group) skips the
  rest of the delay.
- ``SBUS_DRAIN_TIMEOUT`` exceeded: the request is cut (its client sees the connection
  reset: an unknown outcome) and the process exits 4, without a traceback.

That an open ``GET /watch`` stream ends at once on SIGTERM is tested in
test_watch_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from sbus import __version__
from sbus.core.types import Limits
from sbus.storage.factory import open_store
from sbus.storage.sql.postgres import asyncpg_dsn
from tests import backends
from tests.concurrency.conftest import (
    JSON_HEADERS,
    LOOPBACK,
    Server,
    ServerStarter,
    attach_logs,
    free_port,
    sbus_executable,
    sqlite_url,
    start_server,
)

pytestmark = pytest.mark.concurrency

KEY = "drain/k"
STOP_S = 30.0  # a generous bound on any stop below
# The role the bus logs in as on PostgreSQL, so its backends can be told from the test's.
ROLE = "sbus_drain_test"
CUT_EXIT = 4


# --- raw HTTP (a request the test can hold half-sent) ------------------------------------


def refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_refused(server: Server) -> None:
    deadline = time.monotonic() + STOP_S
    while not refused(server.port):
        if time.monotonic() > deadline:
            pytest.fail(f"port {server.port} still accepts {STOP_S}s after SIGTERM")
        time.sleep(0.05)


def commit_body(delta: str = "v1") -> bytes:
    body = {"key": KEY, "expected_version": 0, "delta": delta, "agent_id": "A"}
    return json.dumps(body).encode()


def begin_commit(port: int, body: bytes) -> socket.socket:
    """A POST /commit whose headers are sent and whose body is not: returns once the
    server answered ``100 Continue``, which it does when the app reads the body."""
    sock = socket.create_connection((LOOPBACK, port), timeout=STOP_S)
    head = (
        "POST /commit HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, f"connection closed before 100 Continue: {interim!r}"
        interim += chunk
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_one_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
    while len(data) - len(head) - 4 < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-body: {data!r}"
        data += chunk
    return data


def livez_on(sock: socket.socket, port: int) -> bytes:
    """GET /livez on an open connection, kept alive: the whole answer."""
    sock.sendall(f"GET /livez HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode())
    return read_one_response(sock)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, json.loads(body)


def get_once(server: Server, path: str) -> httpx.Response:
    """One request on a fresh connection (with several workers, any of them may take it)."""
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=10) as client:
        return client.get(path)


# --- stores -------------------------------------------------------------------------------


async def stored(store_url: str) -> tuple[int, str]:
    """(version, content) of KEY as the store has it, read without a server."""
    store = open_store(store_url, Limits())
    await store.start()
    try:
        shard = await store.read(KEY, None, "", False)
    finally:
        await store.close()
    return shard.version, shard.content


def role_url() -> str:
    """The shared PostgreSQL's URL with ROLE as the user."""
    parts = urlsplit(backends.POSTGRES_URL)
    return parts._replace(netloc=f"{ROLE}@{parts.hostname}:{parts.port}").geturl()


async def prepared_postgres() -> asyncpg.Connection:
    """An admin connection to the shared PostgreSQL, wiped, with ROLE existing."""
    await backends.require("postgres")
    await backends.wipe("postgres")
    admin = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
    exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", ROLE)
    if not exists:
        await admin.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER")
    return admin


async def drop_role(admin: asyncpg.Connection) -> None:
    """Leave no superuser behind (it fails harmlessly while a session of it is left)."""
    with contextlib.suppress(asyncpg.PostgresError):
        await admin.execute(f"DROP ROLE IF EXISTS {ROLE}")


async def bus_backends(admin: asyncpg.Connection) -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", ROLE
    )
    return count


async def wait_for(what: str, check: Any) -> None:
    deadline = time.monotonic() + STOP_S
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {STOP_S}s")
        await asyncio.sleep(0.05)


async def lock_the_shard(admin: asyncpg.Connection) -> tuple[asyncpg.Connection, Any]:
    """A connection holding KEY's row lock in an open transaction."""
    locker = await asyncpg.connect(asyncpg_dsn(backends.POSTGRES_URL))
    transaction = locker.transaction()
    await transaction.start()
    assert await locker.fetch("SELECT key FROM sbus_shards FOR UPDATE")
    return locker, transaction


async def commit_waits_on_the_lock(
    admin: asyncpg.Connection, commit: asyncio.Task[httpx.Response]
) -> None:
    async def waiting() -> bool:
        if commit.done():
            pytest.fail(f"the commit did not wait for the lock: {commit.result().text}")
        found = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'",
            ROLE,
        )
        return bool(found)

    await wait_for("the bus's commit waiting on the row lock", waiting)


async def no_bus_backends(admin: asyncpg.Connection) -> None:
    async def none_left() -> bool:
        return await bus_backends(admin) == 0

    await wait_for("the bus's PostgreSQL connections gone", none_left)


# --- the tests ----------------------------------------------------------------------------


def test_sqlite_request_in_flight_finishes_after_the_delay_two_workers(
    start_sbus: ServerStarter, tmp_path: Path
) -> None:
    store_url = sqlite_url(tmp_path)
    # (idle connections outlive the test unless the stop closes them)
    env = {"SBUS_SHUTDOWN_DELAY": "1", "SBUS_KEEPALIVE_TIMEOUT": "120"}
    server = start_sbus(store_url, env, workers=2)
    with httpx.Client(base_url=server.base_url, trust_env=False) as client:
        assert client.post("/shard", json={"key": KEY, "content": "v0"}).status_code == 201
    body = commit_body()
    idle = socket.create_connection((LOOPBACK, server.port), timeout=STOP_S)
    assert livez_on(idle, server.port).startswith(b"HTTP/1.1 200 ")  # kept alive, now idle
    with idle, begin_commit(server.port, body) as sock:
        server.process.send_signal(signal.SIGTERM)  # to the supervisor
        # Once the delay is over nothing new is accepted, while a worker still drains
        # (the supervisor let go of its copy of the listening socket too).
        wait_refused(server)
        os.killpg(server.process.pid, signal.SIGTERM)  # again, to every process
        assert idle.recv(65536) == b""  # an idle connection is closed at shutdown
        sock.sendall(body)
        status, headers, answer = parse_response(read_until_closed(sock))
    assert (status, answer["new_version"]) == (200, 1), answer
    assert headers["connection"] == "close"
    assert server.process.wait(timeout=STOP_S) == 0
    assert asyncio.run(stored(store_url)) == (1, "v1")
    log = server.log_text()
    assert "SIGTERM: shutting down" in log, log
    assert "SBUS_SHUTDOWN_DELAY is over" in log, log
    assert "SIGTERM: already shutting down" in log, log


async def test_postgres_commit_waiting_on_a_lock_finishes(
    start_sbus: ServerStarter, tmp_path: Path
) -> None:
    admin = await prepared_postgres()
    try:
        server = await asyncio.to_thread(start_sbus, role_url(), None, workers=1)
        async with httpx.AsyncClient(
            base_url=server.base_url, trust_env=False, timeout=STOP_S
        ) as client:
            made = await client.post("/shard", json={"key": KEY, "content": "v0"})
            assert made.status_code == 201, made.text
            assert await bus_backends(admin) > 0
            locker, transaction = await lock_the_shard(admin)
            try:
                commit = asyncio.create_task(
                    client.post("/commit", content=commit_body(), headers=JSON_HEADERS)
                )
                await commit_waits_on_the_lock(admin, commit)
                server.process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(wait_refused, server)
                server.process.send_signal(signal.SIGINT)  # changes nothing in the drain
            finally:
                await transaction.rollback()
                await locker.close()
            answer = await commit
        assert (answer.status_code, answer.json()["new_version"]) == (200, 1), answer.text
        assert answer.headers["connection"] == "close"
        assert await asyncio.to_thread(server.process.wait, STOP_S) == 0
        assert await stored(backends.POSTGRES_URL) == (1, "v1")
        await no_bus_backends(admin)
    finally:
        await drop_role(admin)
        await admin.close()


async def test_postgres_drain_bound_cuts_the_request(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    admin = await prepared_postgres()
    server: Server | None = None
    try:
        env = {"SBUS_DRAIN_TIMEOUT": "1"}
        server = await asyncio.to_thread(
            start_server, role_url(), env, log_dir=tmp_path / "logs", workers=1
        )
        attach_logs(request.node, [server])
        async with httpx.AsyncClient(
            base_url=server.base_url, trust_env=False, timeout=STOP_S
        ) as client:
            made = await client.post("/shard", json={"key": KEY, "content": "v0"})
            assert made.status_code == 201, made.text
            locker, transaction = await lock_the_shard(admin)
            try:
                commit = asyncio.create_task(
                    client.post("/commit", content=commit_body(), headers=JSON_HEADERS)
                )
                await commit_waits_on_the_lock(admin, commit)
                server.process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(server.process.wait, STOP_S)
                # the connection was reset without an answer: the outcome is unknown
                with pytest.raises(httpx.TransportError):
                    await commit
            finally:
                await transaction.rollback()
                await locker.close()
        assert code == CUT_EXIT
        await no_bus_backends(admin)
        # The outcome is unknown to the client, but the commit is all or nothing.
        assert await stored(backends.POSTGRES_URL) in {(0, "v0"), (1, "v1")}
        log = server.log_text()
        assert "SBUS_DRAIN_TIMEOUT=1s ran out: cut 1 request(s) in flight" in log, log
        assert log.rstrip().endswith(
            "sbus: stopped, but SBUS_DRAIN_TIMEOUT=1s cut 1 request(s) in flight"
        ), log
        assert "Traceback" not in log, log
    finally:
        if server is not None:
            server.stop()
        await drop_role(admin)
        await admin.close()


def test_delay_then_drain_bound_with_two_workers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    env = {
        "SBUS_SHUTDOWN_DELAY": "120",
        "SBUS_DRAIN_TIMEOUT": "1",
        "SBUS_KEEPALIVE_TIMEOUT": "120",
    }
    server = start_server(sqlite_url(tmp_path), env, log_dir=tmp_path / "logs", workers=2)
    attach_logs(request.node, [server])
    # Connection: close on every request, so that each one opens a new connection and
    # any worker may take it.
    fresh = httpx.Client(
        base_url=server.base_url, trust_env=False, timeout=10, headers={"Connection": "close"}
    )
    try:
        assert fresh.post("/shard", json={"key": KEY, "content": "v0"}).status_code == 201
        with socket.create_connection((LOOPBACK, server.port), timeout=STOP_S) as idle:
            assert livez_on(idle, server.port).startswith(b"HTTP/1.1 200 ")  # now idle
            server.process.send_signal(signal.SIGTERM)  # to the supervisor
            deadline = time.monotonic() + STOP_S
            while (health := fresh.get("/admin/health")).status_code == 200:
                assert time.monotonic() < deadline, "still ready long after SIGTERM"
                time.sleep(0.05)
            # a connection idle at SIGTERM serves one more request, then closes
            last = livez_on(idle, server.port)
            assert last.startswith(b"HTTP/1.1 200 ") and b"\r\nconnection: close\r\n" in last
            assert idle.recv(65536) == b""
        want = {"status": "not_ready", "version": __version__, "reason": "shutting down"}
        assert (health.status_code, health.json()) == (503, want)
        for _ in range(20):
            health = fresh.get("/admin/health")
            assert (health.status_code, health.json()) == (503, want)
        read = fresh.get(f"/shard/{KEY}")  # the routes still serve during the delay
        assert (read.status_code, read.json()["version"]) == (200, 0)
        assert fresh.get("/livez").status_code == 200
        with begin_commit(server.port, commit_body()) as sock:
            # a second Ctrl-C (SIGINT to every process of the group) skips the delay
            os.killpg(server.process.pid, signal.SIGINT)
            assert server.process.wait(timeout=STOP_S) == CUT_EXIT
            try:
                rest = read_until_closed(sock)
            except ConnectionResetError:
                rest = b""
        assert rest == b""  # no answer: the client cannot know the outcome
        assert refused(server.port)
    finally:
        fresh.close()
        server.stop()
    log = server.log_text()
    # the supervisor passed the signal on to both workers
    assert len(set(re.findall(r"SIGTERM: shutting down \(worker (\d+)\)", log))) == 2, log
    assert "SIGINT: skipping the rest of SBUS_SHUTDOWN_DELAY" in log, log
    assert "SBUS_DRAIN_TIMEOUT=1s ran out: cut 1 request(s) in flight" in log, log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_while_the_store_is_first_asked_exits_0_without_serving(
    tmp_path: Path, workers: int
) -> None:
    """SIGTERM before ``sbus serve`` listens (here: while its first connection to the
    store hangs) stops it with status 0, without serving. It used to kill the process by
    the signal (status 143) and, as a container's process 1, for which a signal without
    a handler does nothing, to be lost: ``docker stop`` then waited for its SIGKILL."""
    with socket.socket() as hanging:  # a PostgreSQL host that accepts and never answers
        hanging.bind((LOOPBACK, 0))
        hanging.listen(8)
        hanging.settimeout(STOP_S)
        url = f"postgresql+asyncpg://u@{LOOPBACK}:{hanging.getsockname()[1]}/db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}
        command = [sbus_executable(), "serve", "--store", url, "--workers", str(workers)]
        proc = subprocess.Popen(
            [*command, "--port", str(free_port())],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = hanging.accept()  # the start-up check is asking the store
            proc.send_signal(signal.SIGTERM)
            conn.close()  # the check fails at once, after the signal is pending
            _, stderr = proc.communicate(timeout=STOP_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, stderr
    assert stderr.strip().splitlines()[-1] == "sbus: stopped by SIGTERM before serving", stderr
    assert "Uvicorn running" not in stderr and "Traceback" not in stderr
