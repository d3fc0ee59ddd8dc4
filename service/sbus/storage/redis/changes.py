"""The Redis store's change log and conflict ring (the Lua is in
:mod:`sbus.storage.redis.changes_lua`). A cursor is ``r<stream id>``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from sbus.core.changes import (
    Change,
    ChangeEvent,
    ChangePage,
    Conflict,
    ConflictEvent,
    ConflictPage,
    CursorExpired,
)
from sbus.core.errors import InvalidCursor
from sbus.core.types import Limits

_ID = re.compile(r"r([0-9]{1,20})-([0-9]{1,20})")
StreamId = tuple[int, int]


def parse(cursor: str) -> StreamId:
    """The stream id a cursor names. Raises InvalidCursor."""
    found = _ID.fullmatch(cursor)
    if found is None:
        raise InvalidCursor(f"not a cursor of this store: {cursor!r}")
    return int(found[1]), int(found[2])


def _id(text: str) -> StreamId:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(at: StreamId) -> str:
    return f"{at[0]}-{at[1]}"


def _fields(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisChangeLog:
    """Mixed into :class:`~sbus.storage.redis.store.RedisStore`, which supplies these."""

    k_changes: str
    k_changes_floor: str
    k_conflicts: str
    limits: Limits

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        raise NotImplementedError

    @property
    def _log_keys(self) -> list[str]:
        return [self.k_changes, self.k_changes_floor]

    @property
    def _ring_keys(self) -> list[str]:
        return [self.k_conflicts, self.k_conflicts + ":floor"]  # the ring keeps no floor

    def change_payload(self, agent_id: str, commit_id: str) -> dict[str, Any]:
        """The ``ch`` member of a create or commit script's payload."""
        return {"x": self.k_changes, "a": agent_id, "c": commit_id}

    async def change_head(self) -> str:
        _, last, _ = await self._eval("changes", self._log_keys, ["0-0", 0])
        return f"r{last}"

    async def changes_after(self, cursor: str, prefix: str, limit: int) -> ChangePage:
        at = parse(cursor)
        floor, last, entries = await self._eval("changes", self._log_keys, [_text(at), limit])
        if at < _id(floor) or at > _id(last):
            # trimmed past the cursor, or a cursor of a stream that is gone
            raise CursorExpired(cursor)
        events: list[ChangeEvent] = []
        for entry_id, flat in entries:
            f = _fields(flat)
            if f["k"].startswith(prefix):
                change = Change(f["k"], int(f["v"]), f["op"], f["a"], f["c"], int(f["t"]))  # type: ignore[arg-type]
                events.append(ChangeEvent(change, f"r{entry_id}"))
        return ChangePage(events, f"r{entries[-1][0]}" if entries else cursor)

    async def trim_changes(self) -> int:
        return int(
            await self._eval(
                "trim_changes",
                self._log_keys,
                [self.limits.change_retention_ms, self.limits.change_max],
            )
        )

    async def record_conflict(self, conflict: Conflict) -> None:
        await self._eval(
            "conflict",
            [self.k_conflicts],
            [
                max(1, self.limits.conflict_ring),
                conflict.key,
                conflict.agent_id,
                conflict.error,
                orjson.dumps(list(conflict.stale_keys)).decode(),
            ],
        )

    async def conflict_head(self) -> str:
        _, last, _ = await self._eval("changes", self._ring_keys, ["0-0", 0])
        return f"r{last}"

    async def conflicts_after(self, cursor: str, limit: int) -> ConflictPage:
        at = parse(cursor)
        _, last, entries = await self._eval("changes", self._ring_keys, [_text(at), limit])
        if at > _id(last):
            # a ring that was emptied since: all it holds is new to the reader
            at = (0, 0)
            _, last, entries = await self._eval("changes", self._ring_keys, ["0-0", limit])
        events = []
        for entry_id, flat in entries:
            f = _fields(flat)
            conflict = Conflict(f["k"], f["a"], f["e"], tuple(orjson.loads(f["s"])))
            events.append(ConflictEvent(conflict, f"r{entry_id}"))
        return ConflictPage(events, f"r{entries[-1][0]}" if entries else f"r{_text(at)}")
