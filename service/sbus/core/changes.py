"""The change log: one record per committed version, the source of ``GET /watch``
(protocol.md section 3.11).

Every store appends a :class:`Change` for each version a state change writes (a create,
commit, rollback or delete) inside the same atomic step as the version itself, so a
change exists exactly when its commit does. A reader asks for the changes after a
*cursor*, an opaque string that the store alone parses and that every replica over the
same store understands; :meth:`ChangeLog.changes_after` answers them in commit order
per key, each with the cursor that resumes right after it.

Refused commits that conflict (409 ``VersionMismatch`` and ``CrossShardStale``) go to a
second, bounded log in the store, the conflict ring, written by the engine after the
refusal (:class:`Conflict`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, NamedTuple

from sbus.core.errors import CrossShardStale, SBusError, VersionMismatch
from sbus.core.types import HistoryEntry, Txn, WriteKind

ChangeOp = Literal["create", "commit", "rollback", "delete"]


class Change(NamedTuple):
    """One committed version of one key (no content: a watcher re-reads what it needs)."""

    key: str
    version: int
    op: ChangeOp
    agent_id: str
    commit_id: str
    committed_ms: int


class ChangeEvent(NamedTuple):
    change: Change
    cursor: str  # resumes right after this change


class ChangePage(NamedTuple):
    """What one read of the log found. ``cursor`` resumes after everything the read
    scanned, including changes ``prefix`` left out, so a reader never scans them again."""

    events: list[ChangeEvent]
    cursor: str


class Conflict(NamedTuple):
    """A commit the store refused for a conflict: the first written key (the stale key
    of a ``VersionMismatch``), the committer, the error code and the stale keys."""

    key: str
    agent_id: str
    error: str
    stale_keys: tuple[str, ...]


class ConflictEvent(NamedTuple):
    conflict: Conflict
    cursor: str


class ConflictPage(NamedTuple):
    events: list[ConflictEvent]
    cursor: str


class CursorExpired(Exception):
    """The log no longer holds every change after the cursor (retention purged some, or
    the cursor comes from a store that is gone): the reader must start afresh. Not an
    :class:`~sbus.core.errors.SBusError`: a stream reports it as its ``reset`` event."""


# The op a write of each kind records.
OP_OF: dict[WriteKind, ChangeOp] = {
    "create": "create",
    "commit": "commit",
    "rollback": "rollback",
    "delete": "delete",
}


def changes_of(txn: Txn, history: Iterable[HistoryEntry]) -> list[Change]:
    """The changes of a committed Txn, one per new history entry (``history`` is
    :attr:`sbus.core.rules.Effects.history`). The op comes from the write's kind, not
    from the entry's rationale, which a caller may word like the bus's own."""
    kinds = {w.key: w.kind for w in txn.writes}
    return [
        Change(h.key, h.version, OP_OF[kinds[h.key]], h.agent_id, h.commit_id, h.committed_ms)
        for h in history
    ]


def created(entry: HistoryEntry) -> Change:
    """The change of a POST /shard (or admin) create."""
    return Change(
        entry.key, entry.version, "create", entry.agent_id, entry.commit_id, entry.committed_ms
    )


def conflict_of(txn: Txn, error: SBusError) -> Conflict | None:
    """The ring's record of a refusal, or None when ``error`` is not a conflict."""
    if isinstance(error, VersionMismatch):
        key = str(error.fields["key"])
        return Conflict(key, txn.agent_id, error.code, (key,))
    if isinstance(error, CrossShardStale):
        stale = tuple(str(item["key"]) for item in error.fields["stale_keys"])
        key = min(w.key for w in txn.writes) if txn.writes else stale[0]
        return Conflict(key, txn.agent_id, error.code, stale)
    return None


def parse_int_cursor(cursor: str, prefix: str) -> int | None:
    """``prefix`` followed by a non-negative decimal integer (the memory and SQLite
    cursors' shape), or None when ``cursor`` is not one."""
    if not cursor.startswith(prefix):
        return None
    digits = cursor[len(prefix) :]
    if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        return None
    return int(digits)
