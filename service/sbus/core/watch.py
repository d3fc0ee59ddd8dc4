"""One watcher of the change stream (protocol.md section 3.11), without transport.

A :class:`Feed` reads the store's change log (and with ``conflicts`` its conflict ring)
after its cursor, keeps only the keys under its prefix that the caller may read, and
moves its cursor past everything it read: its memory is one page, however far behind
the watcher is. Between reads it waits on the engine's :class:`Pulse`, which the engine
fires after every state change this process makes, or for the poll interval (changes
made through other processes or replicas are found by the next read).

The stream's cursor joins the change log's and the ring's: ``<changes>~<conflicts>``
(neither store cursor contains ``~``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from sbus.core.changes import Change, Conflict
from sbus.core.clock import rfc3339
from sbus.core.errors import InvalidCursor
from sbus.core.store import Store

PAGE = 256  # changes (and conflicts) read per poll
SEPARATOR = "~"
# A PostgreSQL cursor holds two database snapshots, each listing the transactions in
# progress when it was taken (up to max_connections of them, ~21 characters each).
MAX_CURSOR = 16384


class Pulse:
    """Wakes the watchers of this process: :meth:`fire` after a state change. Costs a
    commit nothing while no one waits."""

    __slots__ = ("_event", "_waiting")

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self._waiting = 0

    def fire(self) -> None:
        if self._waiting and self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, seconds: float) -> None:
        """Return at the next :meth:`fire` or after ``seconds``."""
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        self._waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        finally:
            self._waiting -= 1


class WatchEvent(NamedTuple):
    """One SSE event: ``kind`` is ``change`` or ``conflict`` (the ``op`` tells them
    apart on the wire); ``cursor`` resumes right after it."""

    kind: Literal["change", "conflict"]
    data: dict[str, Any]
    cursor: str


def change_data(change: Change) -> dict[str, Any]:
    return {
        "key": change.key,
        "version": change.version,
        "op": change.op,
        "agent_id": change.agent_id,
        "commit_id": change.commit_id,
        "committed_at": rfc3339(change.committed_ms),
    }


def conflict_data(conflict: Conflict) -> dict[str, Any]:
    return {
        "key": conflict.key,
        "op": "conflict",
        "agent_id": conflict.agent_id,
        "error": conflict.error,
        "stale_keys": list(conflict.stale_keys),
    }


def split_cursor(cursor: str) -> tuple[str, str | None]:
    """The change-log part and the conflict-ring part (None: absent) of a stream cursor."""
    changes, sep, conflicts = cursor.partition(SEPARATOR)
    if not changes or (sep and not conflicts) or SEPARATOR in conflicts:
        raise InvalidCursor(f"not a change-stream cursor: {cursor!r}")
    return changes, conflicts if sep else None


def valid_cursor_text(cursor: str) -> bool:
    """What any cursor is made of: 1 to MAX_CURSOR printable ASCII characters, no spaces."""
    return (
        0 < len(cursor) <= MAX_CURSOR
        and cursor.isascii()
        and cursor.isprintable()
        and " " not in cursor
    )


class Feed:
    """The reader behind one ``GET /watch``. ``expired``: the cursor it was opened with
    can no longer be resumed (its cursor is then the live edge)."""

    def __init__(
        self,
        store: Store,
        pulse: Pulse,
        *,
        prefix: str,
        readable: Callable[[str], bool],
        changes: str,
        conflicts: str | None,
        expired: bool = False,
    ) -> None:
        self._store = store
        self._pulse = pulse
        self.prefix = prefix
        self._readable = readable
        self._changes = changes
        self._conflicts = conflicts
        self.expired = expired

    @property
    def cursor(self) -> str:
        if self._conflicts is None:
            return self._changes
        return f"{self._changes}{SEPARATOR}{self._conflicts}"

    async def read(self) -> list[WatchEvent]:
        """One read of each log after the cursor, which moves past all it read. Raises
        :class:`~sbus.core.changes.CursorExpired` when the log dropped changes the
        watcher has not seen (the watcher fell behind the retention)."""
        out: list[WatchEvent] = []
        page = await self._store.changes_after(self._changes, self.prefix, PAGE)
        for event in page.events:
            self._changes = event.cursor
            if self._readable(event.change.key):
                out.append(WatchEvent("change", change_data(event.change), self.cursor))
        self._changes = page.cursor
        if self._conflicts is not None:
            ring = await self._store.conflicts_after(self._conflicts, PAGE)
            for item in ring.events:
                self._conflicts = item.cursor
                c = item.conflict
                if c.key.startswith(self.prefix) and self._readable(c.key):
                    out.append(WatchEvent("conflict", conflict_data(c), self.cursor))
            self._conflicts = ring.cursor
        return out

    async def restart(self) -> str:
        """Move to the live edge (after a reset); returns the new cursor."""
        self._changes = await self._store.change_head()
        if self._conflicts is not None:
            self._conflicts = await self._store.conflict_head()
        return self.cursor

    async def wait(self, seconds: float) -> None:
        """Until this process commits something, or ``seconds``."""
        await self._pulse.wait(seconds)
