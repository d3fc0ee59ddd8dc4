"""A fixed pool of asyncpg connections: the PostgreSQL store's connections for every use.

SQLAlchemy's pool hands a connection out and takes it back through a greenlet switch on
every use, which profiled at about twice the driver's own Python cost per statement on
the read+commit cycle (two uses per cycle). This pool is a stack of idle connections and
a semaphore bounding how many are open: taking an idle connection costs no await and no
round trip. The most recently used connection is handed out first, so a light load keeps
using the same few backends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import asyncpg


class PoolExhausted(Exception):
    """No connection came free within the pool's timeout."""


class Connector:
    """Opens connections from DSNs that name the same hosts, each first in turn
    (sql.pgurl.asyncpg_dsns). asyncpg tries the hosts of one DSN in order within one
    timeout, so a host that hangs rather than refuses (a machine gone, a server frozen)
    would use up every connection's timeout before the next host is tried. So after a
    failure the next connection starts one host further on, and the order that last
    worked is kept: a hanging host costs one timeout, not one per connection."""

    def __init__(self, dsns: Sequence[str], timeout_s: float, **connect: Any) -> None:
        self._dsns = list(dsns)
        self._first = 0
        self._timeout_s = timeout_s
        self._connect = connect

    async def connect(self) -> asyncpg.Connection:
        first = self._first
        try:
            return await asyncpg.connect(
                self._dsns[first], timeout=self._timeout_s, **self._connect
            )
        except Exception:
            if self._first == first:  # not moved on already by a concurrent failure
                self._first = (first + 1) % len(self._dsns)
            raise


class PgPool:
    """At most ``size`` connections, opened on demand and kept open between uses."""

    def __init__(self, connector: Connector, size: int, timeout_s: float) -> None:
        self.size = size
        self._connector = connector
        self._timeout_s = timeout_s
        self._idle: list[asyncpg.Connection] = []
        # Connections handed out, and those of them opened before the last
        # discard_idle(): closed, not kept, when they come back.
        self._busy: set[asyncpg.Connection] = set()
        self._doomed: set[asyncpg.Connection] = set()
        self._free = asyncio.Semaphore(size)
        self._closed = False

    async def acquire(self) -> asyncpg.Connection:
        """An open connection outside any transaction. Waits up to the timeout for a free
        one (PoolExhausted), opens one when none is idle (driver errors propagate)."""
        if self._free.locked():
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._free.acquire()
            except TimeoutError:
                raise PoolExhausted(
                    f"no PostgreSQL connection free within {self._timeout_s:g} s "
                    f"(pool of {self.size})"
                ) from None
        else:
            await self._free.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    self._busy.add(conn)
                    return conn
            conn = await self._connector.connect()
            if self._closed:  # closed while connecting
                conn.terminate()
                raise asyncpg.InterfaceError("the pool is closed")
            self._busy.add(conn)
            return conn
        except BaseException:
            self._free.release()
            raise

    def release(self, conn: asyncpg.Connection, reuse: bool) -> None:
        """Give ``conn`` back: kept for the next use when ``reuse`` and it is healthy and
        outside a transaction, otherwise closed at once (a connection still inside a
        transaction would carry its locks, or a stray COMMIT, to the next use; closing the
        socket makes the server end that transaction). One that was in use when
        :meth:`discard_idle` ran is closed too."""
        self._busy.discard(conn)
        if conn in self._doomed:
            self._doomed.discard(conn)
            reuse = False
        if reuse and not self._closed and not conn.is_closed() and not conn.is_in_transaction():
            self._idle.append(conn)
        elif not conn.is_closed():
            conn.terminate()
        self._free.release()

    def discard_idle(self) -> None:
        """Close every idle connection: after one failed on its socket (the server
        restarted or went away), the others are most likely dead too, and the next use
        should open a fresh one rather than find that out. Those in use go when they
        are given back, however their use ends: on a server turned read-only (25006) a
        read in flight succeeds, and its connection, kept, would go on reading there."""
        self._doomed |= self._busy
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.terminate()

    async def close(self) -> None:
        """Close the idle connections; those in use close when they are released."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
