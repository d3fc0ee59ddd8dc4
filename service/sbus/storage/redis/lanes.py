"""The connections script calls run on, outside redis-py's pool.

Every request is one script call, and redis-py's per-call machinery was the largest
cost left around it in the profile: taking a connection from its blocking pool enters
a Condition, arms a timer and runs metrics hooks (and releasing it enters the
Condition again), and each send and read arms a timeout of its own (the send's by
spawning a task). A script call needs none of that: an idle connected connection,
one command written, one reply read, all under ONE deadline that the caller arms.

Connections are made by the redis-py pool's own factory (same URL options, same
handshake) but never lent to it, and carry no socket timeout of their own: the
caller's deadline covers the whole exchange. At most ``limit`` are out at once;
beyond that a caller waits up to ``wait_s`` and then gets :class:`LanesBusy`. A
(re)connect, handshake included, is bounded by ``connect_s``.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection


class LanesBusy(Exception):
    """Every connection stayed in use for the whole wait."""


class Lanes:
    def __init__(self, pool: ConnectionPool, limit: int, wait_s: float, connect_s: float) -> None:
        self._pool = pool
        self._wait_s = wait_s
        self._connect_s = connect_s
        self._idle: list[AbstractConnection] = []
        self._made: list[AbstractConnection] = []
        self._free = asyncio.Semaphore(limit)

    async def take(self) -> AbstractConnection:
        """A connected connection with nothing pending on it. Raises LanesBusy, or
        redis-py's errors when (re)connecting fails; nothing was sent either way."""
        free = self._free
        if free.locked():
            try:
                async with asyncio.timeout(self._wait_s):
                    await free.acquire()
            except TimeoutError:
                raise LanesBusy(f"all Redis connections busy for {self._wait_s} s") from None
        else:
            await free.acquire()  # returns at once: no suspension, no timer
        conn = self._idle.pop() if self._idle else self._make()
        try:
            # A reply left unread or a connection the server closed (EOF) while idle:
            # start it afresh, as redis-py's pool does before lending one.
            if conn.is_connected and await conn.can_read():
                await conn.disconnect()
            if not conn.is_connected:
                # the handshake's replies are read with no socket timeout either
                async with asyncio.timeout(self._connect_s):
                    await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            self.give_back(conn)
            raise
        return conn

    def give_back(self, conn: AbstractConnection) -> None:
        """Return a connection taken; the caller disconnects one that is not clean
        (a reply pending, or broken) first."""
        self._idle.append(conn)
        self._free.release()

    async def close(self) -> None:
        made, self._made, self._idle = self._made, [], []
        for conn in made:
            await conn.disconnect()

    def _make(self) -> AbstractConnection:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        conn.socket_timeout = None  # the caller's deadline covers send and read
        self._made.append(conn)
        return conn
