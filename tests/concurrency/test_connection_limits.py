"""Slow and idle clients against a real ``sbus serve`` (sbus.api.connections and the
body deadline of the gate): a connection that sends nothing is closed, headers or a body
trickled a byte at a time get 408 ``RequestTimeout`` and a closed connection, an idle
keep-alive connection is closed, and a worker holds no more than
``SBUS_MAX_CONNECTIONS`` connections: the ones beyond are closed before anything is read.

The limits here are short so the tests are quick; each wait is bounded by a generous
deadline, never by how fast the server is."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.concurrency.conftest import LOOPBACK, Server, ServerStarter, sqlite_url

pytestmark = pytest.mark.concurrency

DEADLINE_S = 30.0
SHORT = {
    "SBUS_HEADER_TIMEOUT": "0.5",
    "SBUS_BODY_TIMEOUT": "0.5",
    "SBUS_KEEPALIVE_TIMEOUT": "1",
}
TRICKLE_PAUSE_S = 0.1


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, server.port), timeout=DEADLINE_S)
    sock.settimeout(DEADLINE_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails after the
    deadline if it never does)."""
    received = b""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    pytest.fail(f"the server kept the connection open for {DEADLINE_S}s; got {received!r}")


def trickle_until_closed(sock: socket.socket, head: bytes, drip: bytes) -> bytes:
    """Send ``head``, then ``drip`` one byte at a time until the server closes the
    connection; returns what it answered."""
    sock.sendall(head)
    sock.settimeout(TRICKLE_PAUSE_S)
    received = b""
    deadline = time.monotonic() + DEADLINE_S
    for byte in (drip * 1000)[:1000]:
        if time.monotonic() > deadline:
            break
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            return received
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            sock.settimeout(DEADLINE_S)
            return received + read_until_closed(sock)
    pytest.fail(f"the server kept reading a trickle for {DEADLINE_S}s; got {received!r}")


def assert_408(answer: bytes, what: str) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout", answer
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/problem+json", headers
    assert headers["connection"] == "close", headers
    problem = json.loads(body)
    assert (problem["status"], problem["error"]) == (408, "RequestTimeout"), problem
    assert what in problem["detail"], problem


def test_idle_connection_is_closed_silently(start_sbus: ServerStarter, tmp_path: Path) -> None:
    server = start_sbus(sqlite_url(tmp_path), SHORT, workers=1)
    with connect(server) as sock:
        assert read_until_closed(sock) == b""


def test_trickled_headers_get_408(start_sbus: ServerStarter, tmp_path: Path) -> None:
    server = start_sbus(sqlite_url(tmp_path), SHORT, workers=1)
    with connect(server) as sock:
        head = f"GET /livez HTTP/1.1\r\nHost: {LOOPBACK}\r\nX-Slow: ".encode()
        assert_408(trickle_until_closed(sock, head, b"abcdefgh"), "request headers")


def test_trickled_body_gets_408(start_sbus: ServerStarter, tmp_path: Path) -> None:
    server = start_sbus(sqlite_url(tmp_path), SHORT, workers=1)
    with connect(server) as sock:
        head = (
            f"POST /shard HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        ).encode()
        assert_408(trickle_until_closed(sock, head, b'{"key": "k", '), "request body")
    with httpx.Client(base_url=server.base_url, trust_env=False) as client:
        assert client.get("/shards").json()["shards"] == []  # nothing was created


def test_idle_keep_alive_connection_is_closed(start_sbus: ServerStarter, tmp_path: Path) -> None:
    server = start_sbus(sqlite_url(tmp_path), SHORT, workers=1)
    with connect(server) as sock:
        sock.sendall(f"GET /livez HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert b"connection: close" not in answer.lower()  # kept alive, then timed out


def test_connections_beyond_the_cap_are_closed(start_sbus: ServerStarter, tmp_path: Path) -> None:
    cap, tries = 8, 24
    # Long header deadline: the connections within the cap stay open while we look.
    env = {"SBUS_MAX_CONNECTIONS": str(cap), "SBUS_HEADER_TIMEOUT": "300"}
    server = start_sbus(sqlite_url(tmp_path), env, workers=1)
    socks = [connect(server) for _ in range(tries)]
    try:
        closed: set[int] = set()
        deadline = time.monotonic() + DEADLINE_S
        while len(closed) < tries - cap and time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                if i in closed:
                    continue
                sock.settimeout(0.05)
                try:
                    data = sock.recv(1)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"a refused connection got {data!r}"
                closed.add(i)
        # At most `cap` are held (one slot may still belong to the health check's
        # connection when the first of ours arrived).
        assert len(closed) >= tries - cap, f"{tries - len(closed)} of {tries} held (cap {cap})"
        held = [sock for i, sock in enumerate(socks) if i not in closed]
        held[0].settimeout(DEADLINE_S)
        held[0].sendall(f"GET /livez HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + DEADLINE_S
    while True:  # the slots free up once the server sees those connections closed
        try:
            with httpx.Client(base_url=server.base_url, trust_env=False) as client:
                assert client.get("/livez").status_code == 200
                break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert "refused" in server.log_text() and "SBUS_MAX_CONNECTIONS=8" in server.log_text()
