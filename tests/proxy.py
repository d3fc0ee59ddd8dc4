"""A loopback TCP proxy that can lose an answer.

It passes a connection's bytes both ways unchanged. Armed with :meth:`LossyProxy.lose_next_answer`,
it watches what clients send; on the first request whose bytes start with the given prefix
(``b"POST /commit "``) it forwards the request, waits for the server's answer, and then closes
both sides without passing a byte of it on. The server has done the work; the client sees its
connection closed before any response (httpx: ``RemoteProtocolError``), which is exactly a
timeout or a proxy crash after the commit landed. A test then checks that the client's retry
replays the recorded outcome instead of applying the change twice.

Threads, not asyncio, so the same proxy serves sync and async clients from any test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType

LOOPBACK = "127.0.0.1"
CHUNK = 65536


class LossyProxy:
    """``with LossyProxy(port) as proxy:`` listens on a free loopback port (:attr:`url`) and
    forwards every connection to ``upstream_port``."""

    def __init__(self, upstream_port: int, upstream_host: str = LOOPBACK) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.1)  # accept polls so close() never waits on it
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._prefix: bytes | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.connections = 0
        self.lost = 0  # answers swallowed
        self.answer_lost = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def lose_next_answer(self, request_prefix: bytes) -> None:
        """Swallow the answer to the next request that starts with ``request_prefix``
        (once; later requests pass through again)."""
        with self._lock:
            self._prefix = request_prefix
            self.answer_lost.clear()

    def __enter__(self) -> LossyProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)
        for thread in list(self._threads):
            thread.join(timeout=5.0)
        self._listener.close()

    # --- internals ---------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10.0)
            except OSError:
                _shut(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            doomed = threading.Event()  # this connection's next answer is to be lost
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            self._spawn(self._requests, client, upstream, doomed)
            self._spawn(self._answers, upstream, client, doomed)

    def _requests(
        self, client: socket.socket, upstream: socket.socket, doomed: threading.Event
    ) -> None:
        """Client to server: arms ``doomed`` BEFORE forwarding the matching request, so its
        answer cannot slip through."""
        while True:
            data = _recv(client)
            if not data:
                break
            with self._lock:
                if self._prefix is not None and data.startswith(self._prefix):
                    self._prefix = None
                    doomed.set()
            try:
                upstream.sendall(data)
            except OSError:
                break
        _shut(upstream)

    def _answers(
        self, upstream: socket.socket, client: socket.socket, doomed: threading.Event
    ) -> None:
        while True:
            data = _recv(upstream)
            if not data:
                break
            if doomed.is_set():
                with self._lock:
                    self.lost += 1
                _shut(client)
                _shut(upstream)
                self.answer_lost.set()
                return
            try:
                client.sendall(data)
            except OSError:
                break
        _shut(client)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(CHUNK)
    except OSError:
        return b""


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
