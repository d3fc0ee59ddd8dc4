"""A single-writer thread with group commit for the embedded SQLite store.

Every store operation is a function of a connection. The thread drains whatever
operations are queued (up to ``max_batch``) and runs them, in order, inside ONE
``BEGIN IMMEDIATE`` ... ``COMMIT``: each operation sees the effects of the ones
before it, exactly as if they had committed one by one, but the batch pays for one
fsync instead of many. No answer is released before the COMMIT returns, so nobody
observes a change that could still be lost; if the COMMIT (or any statement) fails,
the whole batch is rolled back and every caller gets StoreUnavailable
``not_applied``.

An operation that rejects a request raises an SBusError after writing only what a
rejection persists (counters); those writes commit with the batch, as they would
have on their own. One thread also means no in-process lock contention; other
processes on the same file are held off by ``BEGIN IMMEDIATE`` and
``busy_timeout``.

The connection opens and ends each batch itself (:class:`Connection`), so it can keep
per-batch state. The answers of a batch go back to the event loop in one
``call_soon_threadsafe`` per loop rather than one per operation: each of those calls
wakes the loop through its self-pipe, and the futures are settled in queue order
either way.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sbus.core.errors import SBusError, StoreUnavailable

log = logging.getLogger("sbus.storage.sqlite")

T = TypeVar("T")
Op = Callable[[Any], Any]
_Item = tuple[Op, asyncio.AbstractEventLoop, "asyncio.Future[Any]", bool]
_Answer = tuple["asyncio.Future[Any]", Any, BaseException | None]


class Connection(Protocol):
    """What the writer needs of the connection ``connect`` returns."""

    def begin(self, write: bool) -> None:
        """Start a batch: ``BEGIN IMMEDIATE`` when it writes; autocommit otherwise."""

    def commit(self) -> None:
        """End a writing batch durably."""

    def rollback(self) -> None:
        """Undo a writing batch that failed."""

    def close(self) -> None: ...


class Writer:
    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        is_store_error: Callable[[BaseException], bool],
        max_batch: int = 64,
    ) -> None:
        self._connect = connect
        self._is_store_error = is_store_error
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sbus-sqlite", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    async def call(self, op: Callable[[Any], T], *, write: bool = True) -> T:
        """Run ``op(connection)`` on the writer thread; ``write`` ops share a transaction."""
        if self._thread is None:
            raise StoreUnavailable("the SQLite store is not started")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((op, loop, future, write))
        return await future

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which re-raises
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                while len(batch) < self._max_batch:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._queue.put(None)
                        break
                    batch.append(more)
                self._run_batch(conn, batch)
        finally:
            conn.close()

    def _run_batch(self, conn: Connection, batch: list[_Item]) -> None:
        results: list[tuple[_Item, Any, BaseException | None]] = []
        writes = any(item[3] for item in batch)
        try:
            conn.begin(writes)
            for item in batch:
                try:
                    results.append((item, item[0](conn), None))
                except SBusError as exc:
                    results.append((item, None, exc))
            if writes:
                conn.commit()
        except BaseException as exc:
            if writes:
                try:
                    conn.rollback()
                except BaseException:
                    log.debug("rollback after failure also failed", exc_info=True)
            if self._is_store_error(exc):
                log.warning("SQLite batch of %d failed: %s", len(batch), exc)
                failure: BaseException = StoreUnavailable(
                    f"SQLite error: {exc}", outcome="not_applied"
                )
            else:
                log.exception("unexpected error in SQLite batch of %d", len(batch))
                failure = StoreUnavailable("internal store error", outcome="not_applied")
            results = [(item, None, failure) for item in batch]
        answers: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
        for (_, loop, future, _), value, error in results:
            answers.setdefault(loop, []).append((future, value, error))
        for loop, settled in answers.items():
            loop.call_soon_threadsafe(_settle, settled)


def _settle(answers: list[_Answer]) -> None:
    for future, value, error in answers:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
