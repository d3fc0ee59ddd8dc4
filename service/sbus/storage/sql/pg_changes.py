"""PostgreSQL's change log (sbus.core.changes): an outbox read in commit order.

**Writing.** Each create and commit inserts its changes into ``sbus_changes`` inside its
own transaction, while it still holds the locks on the keys it writes (``FOR UPDATE``
rows and the create's advisory lock), with ``xid = pg_current_xact_id()``: a change
exists exactly when its commit does.

**Why not ``seq`` order.** ``seq`` comes from a sequence when the row is inserted, not
when its transaction commits: a reader that delivered every visible row up to ``seq``
100 and moved its cursor there would never deliver row 99 of a transaction that
committed a moment later. Nor is ``xid`` order commit order: a transaction takes its
id at its first write and may commit long after a younger one.

**Reading by snapshots.** A reader delivers *batches*. A batch is the rows of the
transactions that committed between two snapshots ``prev`` and ``cur`` of the database
(``pg_current_snapshot()``): visible in ``cur``, not visible in ``prev``
(``pg_visible_in_snapshot``). Every transaction commits between some pair of
consecutive snapshots of a reader, and only then: each row is delivered once, and none
is skipped, whenever its transaction commits (every row of a transaction is visible
from the same instant). Within a batch the rows go in ``seq`` order, and the next
batch starts at a new snapshot once this one is exhausted.

**Per key, that is commit order.** Two versions of one key are written by transactions
T1 then T2, and T2 inserts its row only after it holds the key's lock, which T1 holds
until it has committed and become visible (PostgreSQL ends a transaction's visibility
before it releases its locks). So: if T2 is visible in a snapshot, T1 is too, and T1's
row is in T2's batch or an earlier one; in the same batch T1's ``seq`` is smaller (its
insert happened before T2 could take the lock).

A cursor is ``p<prev>/<cur>/<seq>``: the rows of batch (prev, cur) after ``seq`` are
still to come. The snapshots are PostgreSQL's own text form, meaningful to every
replica over the same database. Only rows whose ``xid`` is at least ``prev``'s xmin can
be invisible in ``prev``, so an index on ``xid`` keeps each read short.

**Expiry.** The purge deletes rows older than the retention (and beyond the count cap)
and records in ``sbus_meta`` (``changes_floor``) the greatest ``xid`` it deleted. A
cursor whose ``prev`` xmin is above that floor lost nothing (every deleted row was
visible in ``prev``, hence delivered); otherwise it expired.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson

from sbus.core.changes import (
    Change,
    ChangeEvent,
    ChangePage,
    Conflict,
    ConflictEvent,
    ConflictPage,
    CursorExpired,
    parse_int_cursor,
)
from sbus.core.errors import InvalidCursor
from sbus.core.types import Limits

_SNAPSHOT = r"[0-9]{1,20}:[0-9]{1,20}:(?:[0-9]{1,20}(?:,[0-9]{1,20})*)?"
_CURSOR = re.compile(rf"p({_SNAPSHOT})/({_SNAPSHOT})/([0-9]{{1,19}})")
FLOOR = "changes_floor"

# {rows} is a JSON array of changes: a $n parameter, or a dollar-quoted literal when the
# statement rides with the COMMIT (the simple query protocol takes no parameters).
INSERT = (
    "INSERT INTO sbus_changes (key, version, op, agent_id, commit_id, committed_ms, xid) "
    "SELECT c.key, c.version, c.op, c.agent_id, c.commit_id, c.committed_ms, "
    "pg_current_xact_id()::text::bigint FROM jsonb_to_recordset({rows}::jsonb) AS "
    "c(key text, version bigint, op text, agent_id text, commit_id text, committed_ms bigint)"
)

BATCH = (
    "SELECT seq, key, version, op, agent_id, commit_id, committed_ms FROM sbus_changes "
    "WHERE xid >= pg_snapshot_xmin($1::text::pg_snapshot)::text::bigint "
    "AND NOT pg_visible_in_snapshot(xid::text::xid8, $1::text::pg_snapshot) "
    "AND pg_visible_in_snapshot(xid::text::xid8, $2::text::pg_snapshot) "
    "AND seq > $3 ORDER BY seq LIMIT $4"
)

# The floor, and whether the cursor's ``cur`` comes from this database's past.
CHECK = (
    "SELECT coalesce((SELECT value FROM sbus_meta WHERE name = 'changes_floor'), 0) "
    "< pg_snapshot_xmin($1::text::pg_snapshot)::text::bigint "
    "AND pg_snapshot_xmax($2::text::pg_snapshot) <= pg_snapshot_xmax(pg_current_snapshot())"
)

PURGE = (
    "WITH gone AS (DELETE FROM sbus_changes WHERE committed_ms < $1 "
    "OR seq <= (SELECT max(seq) FROM sbus_changes) - $2 RETURNING xid), "
    "floor AS (INSERT INTO sbus_meta (name, value) "
    "SELECT 'changes_floor', max(xid) FROM gone HAVING count(*) > 0 "
    "ON CONFLICT (name) DO UPDATE SET value = greatest(sbus_meta.value, EXCLUDED.value)) "
    "SELECT count(*) FROM gone"
)

RECORD_CONFLICT = (
    "WITH added AS (INSERT INTO sbus_conflicts (key, agent_id, error, stale_keys) "
    "VALUES ($1, $2, $3, $4) RETURNING seq) "
    "DELETE FROM sbus_conflicts WHERE seq <= (SELECT seq FROM added) - $5"
)


def rows_json(changes: Iterable[Change]) -> str:
    return orjson.dumps([c._asdict() for c in changes]).decode()


def parse(cursor: str) -> tuple[str, str, int]:
    found = _CURSOR.fullmatch(cursor)
    if found is None:
        raise InvalidCursor(f"not a cursor of this store: {cursor!r}")
    return found[1], found[2], int(found[3])


def cursor_of(prev: str, cur: str, seq: int) -> str:
    return f"p{prev}/{cur}/{seq}"


class PostgresChangeLog:
    """Mixed into :class:`~sbus.storage.sql.postgres.PostgresStore`, which supplies these."""

    limits: Limits

    def _conn(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        raise NotImplementedError

    async def change_head(self) -> str:
        async with self._conn() as conn:
            snapshot: str = await conn.fetchval("SELECT pg_current_snapshot()::text")
        return cursor_of(snapshot, snapshot, 0)

    async def changes_after(self, cursor: str, prefix: str, limit: int) -> ChangePage:
        prev, cur, seq = parse(cursor)
        async with self._conn() as conn:
            try:
                resumable = await conn.fetchval(CHECK, prev, cur)
            except asyncpg.DataError as exc:  # a snapshot PostgreSQL itself refuses
                raise InvalidCursor(f"not a cursor of this store: {cursor!r}") from exc
            if not resumable:
                raise CursorExpired(cursor)
            rows = await conn.fetch(BATCH, prev, cur, seq, limit) if limit else []
            if limit and not rows:
                # This batch is exhausted: the next one ends at a snapshot taken now.
                prev, seq = cur, 0
                cur = await conn.fetchval("SELECT pg_current_snapshot()::text")
                rows = await conn.fetch(BATCH, prev, cur, seq, limit)
        events = [
            ChangeEvent(Change(*_change_fields(r)), cursor_of(prev, cur, r["seq"]))
            for r in rows
            if r["key"].startswith(prefix)
        ]
        last = rows[-1]["seq"] if rows else seq
        return ChangePage(events, cursor_of(prev, cur, last))

    async def trim_changes(self, conn: asyncpg.Connection, now_ms: int) -> int:
        """The purge's part (in its transaction): returns how many rows went."""
        gone: int = await conn.fetchval(
            PURGE, now_ms - self.limits.change_retention_ms, self.limits.change_max
        )
        return gone

    async def record_conflict(self, conflict: Conflict) -> None:
        async with self._conn() as conn:
            await conn.execute(
                RECORD_CONFLICT,
                conflict.key,
                conflict.agent_id,
                conflict.error,
                orjson.dumps(list(conflict.stale_keys)).decode(),
                max(1, self.limits.conflict_ring),
            )

    async def conflict_head(self) -> str:
        async with self._conn() as conn:
            last = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM sbus_conflicts")
        return f"p{last}"

    async def conflicts_after(self, cursor: str, limit: int) -> ConflictPage:
        seq = parse_int_cursor(cursor, "p")
        if seq is None:
            raise InvalidCursor(f"not a cursor of this store: {cursor!r}")
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT seq, key, agent_id, error, stale_keys FROM sbus_conflicts "
                "WHERE seq > $1 ORDER BY seq LIMIT $2",
                seq,
                limit,
            )
        events = [
            ConflictEvent(
                Conflict(r["key"], r["agent_id"], r["error"], tuple(orjson.loads(r["stale_keys"]))),
                f"p{r['seq']}",
            )
            for r in rows
        ]
        return ConflictPage(events, f"p{rows[-1]['seq']}" if rows else f"p{seq}")


def _change_fields(row: Any) -> tuple[Any, ...]:
    return (
        row["key"],
        row["version"],
        row["op"],
        row["agent_id"],
        row["commit_id"],
        row["committed_ms"],
    )
