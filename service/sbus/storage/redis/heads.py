"""What one bus process last saw of each shard's head and of the store clock.

A commit's new history entries are hashed in Python (Redis Lua has no SHA-256) against
the head they will follow and with ``committed_at`` = a store-clock reading. Reading
both first costs a round trip. Every script reply already carries the rows it touched
and the script's clock, so the store remembers them here and hashes the next commit
against what it remembers: one round trip when nothing moved in between. The commit
script still checks every written head before it writes anything and answers
``RETRY`` (with the current rows and clock) when one moved, so a stale entry here can
cost a round trip, never a wrong chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sbus.core.types import Shard

HEADS_KEPT = 4096  # shards remembered per process (first seen, first forgotten)


@dataclass(frozen=True, slots=True)
class Head:
    """The fields of a shard row a commit hashes against and predicts from."""

    version: int
    head: str
    id: str
    goal: str
    mand: bool
    created: int
    updated: int
    ac: int
    cc: int


def head_of(shard: Shard) -> Head:
    return Head(
        shard.version,
        shard.head_hash,
        shard.id,
        shard.goal_tag,
        shard.require_mandate,
        shard.created_ms,
        shard.updated_ms,
        shard.attempt_count,
        shard.conflict_count,
    )


class Heads:
    """Shard key -> the head last seen, bounded. The newest reply wins (it may be older
    than one already processed: then a commit retries once)."""

    def __init__(self, kept: int = HEADS_KEPT) -> None:
        self.kept = kept
        self._heads: dict[str, Head] = {}

    def get(self, key: str) -> Head | None:
        return self._heads.get(key)

    def saw(self, key: str, head: Head) -> None:
        heads = self._heads
        if key not in heads and len(heads) >= self.kept:
            del heads[next(iter(heads))]
        heads[key] = head

    def saw_shard(self, shard: Shard) -> None:
        self.saw(shard.key, head_of(shard))

    def clear(self) -> None:
        self._heads.clear()


class StoreClock:
    """The store clock (Redis ``TIME`` plus the test offset) as last read by a script,
    carried forward on this process's monotonic clock. The reading was taken before
    the reply arrived, so the estimate trails the store clock by at most that round
    trip: a commit stamped with it is never ahead of the script that checks it."""

    def __init__(self) -> None:
        self._anchor: tuple[int, int] | None = None  # (store ms, monotonic ns)

    def saw(self, store_ms: int) -> None:
        self._anchor = (store_ms, time.monotonic_ns())

    def forget(self) -> None:
        self._anchor = None

    def now(self) -> int | None:
        """The estimated store ms, or None before any reading."""
        anchor = self._anchor
        if anchor is None:
            return None
        return anchor[0] + (time.monotonic_ns() - anchor[1]) // 1_000_000
