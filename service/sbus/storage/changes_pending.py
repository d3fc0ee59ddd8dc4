"""A change log not built yet: what a store answers for ``GET /watch`` until its own
log lands (the stream answers 503 StoreUnavailable, nothing else changes)."""

from __future__ import annotations

from sbus.core.changes import ChangePage, Conflict, ConflictPage
from sbus.core.errors import StoreUnavailable


class NoChangeLog:
    async def change_head(self) -> str:
        raise StoreUnavailable("this store has no change log yet", outcome="not_applied")

    async def changes_after(self, cursor: str, prefix: str, limit: int) -> ChangePage:
        raise StoreUnavailable("this store has no change log yet", outcome="not_applied")

    async def record_conflict(self, conflict: Conflict) -> None:
        return None

    async def conflict_head(self) -> str:
        raise StoreUnavailable("this store has no change log yet", outcome="not_applied")

    async def conflicts_after(self, cursor: str, limit: int) -> ConflictPage:
        raise StoreUnavailable("this store has no change log yet", outcome="not_applied")
