"""The memory store's change log and conflict ring: sequence-numbered records in one
process.

A cursor is ``m<instance>.<seq>``: after record ``seq`` of the log with that instance
id. The id is drawn per store object, so a cursor handed out before the process
restarted (whose log is gone) is recognised and expires instead of resuming in a log
that has restarted its numbering.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from typing import Generic, TypeVar

from sbus.core.changes import CursorExpired
from sbus.core.errors import InvalidCursor

T = TypeVar("T")


class SeqLog(Generic[T]):
    """Records numbered 1, 2, ... in append order; the oldest may be dropped."""

    def __init__(self, maxlen: int | None = None) -> None:
        self.instance = os.urandom(6).hex()
        self._items: deque[T] = deque(maxlen=maxlen)
        self._last = 0  # the newest record's number (0: none yet)

    @property
    def first(self) -> int:
        """The oldest retained record's number (last + 1 when empty)."""
        return self._last - len(self._items) + 1

    def append(self, item: T) -> None:
        self._items.append(item)  # a full ring drops its oldest
        self._last += 1

    def drop_oldest(self) -> T:
        return self._items.popleft()

    def oldest(self) -> T | None:
        return self._items[0] if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    def cursor(self, seq: int) -> str:
        return f"m{self.instance}.{seq}"

    def head(self) -> str:
        return self.cursor(self._last)

    def position(self, cursor: str) -> int:
        """The record number ``cursor`` resumes after. Raises InvalidCursor for a
        malformed one, CursorExpired for another instance's or one past the end."""
        instance, dot, digits = cursor[1:].partition(".")
        if (
            not cursor.startswith("m")
            or not dot
            or len(instance) != 12
            or not digits.isascii()
            or not digits.isdigit()
            or len(digits) > 19
        ):
            raise InvalidCursor(f"not a cursor of this store: {cursor!r}")
        seq = int(digits)
        if instance != self.instance or seq > self._last:
            raise CursorExpired(cursor)
        return seq

    def after(self, seq: int, limit: int) -> list[tuple[int, T]]:
        """Up to ``limit`` records numbered above ``seq`` (from the oldest retained
        when ``seq`` is older)."""
        start = max(seq + 1, self.first) - self.first
        stop = min(len(self._items), start + limit)
        return list(
            zip(itertools.count(self.first + start), itertools.islice(self._items, start, stop))
        )
