"""SQLite's change log and conflict ring (sbus.core.changes), in the database file.

Every worker process over one file appends to the same ``sbus_changes`` table inside
its commit's ``BEGIN IMMEDIATE`` transaction. SQLite runs one write transaction at a
time, so ``seq`` (AUTOINCREMENT: never reused, even after a purge emptied the table) is
commit order across all of them, and a reader in any process sees a committed change
under the same number. A cursor is ``s<seq>``: after change ``seq``.

``purge`` deletes changes older than the retention or beyond the cap and records the
highest ``seq`` it deleted in ``sbus_meta`` (``changes_floor``): a cursor below it
expired.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from sbus.core.changes import (
    Change,
    ChangeEvent,
    ChangePage,
    Conflict,
    ConflictEvent,
    ConflictPage,
    parse_int_cursor,
)
from sbus.core.errors import InvalidCursor
from sbus.core.types import Limits

FLOOR = "changes_floor"


class Conn(Protocol):
    def exec_driver_sql(self, sql: str, params: Any = ()) -> Any: ...


def parse(cursor: str) -> int:
    seq = parse_int_cursor(cursor, "s")
    if seq is None:
        raise InvalidCursor(f"not a cursor of this store: {cursor!r}")
    return seq


def _last(conn: Conn, table: str) -> int:
    value = conn.exec_driver_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)
    ).fetchone()
    return int(value[0]) if value is not None else 0


def _floor(conn: Conn) -> int:
    row = conn.exec_driver_sql("SELECT value FROM sbus_meta WHERE name = ?", (FLOOR,)).fetchone()
    return int(row[0]) if row is not None else 0


def append(conn: Conn, change: Change) -> None:
    conn.exec_driver_sql(
        "INSERT INTO sbus_changes (key, version, op, agent_id, commit_id, committed_ms) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        change,
    )


def head(conn: Conn) -> str:
    return f"s{_last(conn, 'sbus_changes')}"


def after(conn: Conn, cursor: str, prefix: str, limit: int) -> ChangePage | None:
    """None when ``cursor`` expired (a value, not a raise: the writer thread runs this
    in a batch that any other exception would fail as a whole)."""
    seq = parse(cursor)
    if seq > _last(conn, "sbus_changes") or seq < _floor(conn):
        return None
    rows = conn.exec_driver_sql(
        "SELECT seq, key, version, op, agent_id, commit_id, committed_ms FROM sbus_changes "
        "WHERE seq > ? ORDER BY seq LIMIT ?",
        (seq, limit),
    ).fetchall()
    events = [
        ChangeEvent(Change(*row[1:]), f"s{row[0]}") for row in rows if row[1].startswith(prefix)
    ]
    return ChangePage(events, f"s{rows[-1][0]}" if rows else cursor)


def purge(conn: Conn, now_ms: int, limits: Limits) -> int:
    """Delete what retention no longer keeps; returns how many rows went."""
    old = conn.exec_driver_sql(
        "SELECT max(seq) FROM sbus_changes WHERE committed_ms < ?",
        (now_ms - limits.change_retention_ms,),
    ).fetchone()[0]
    upto = max(int(old or 0), _last(conn, "sbus_changes") - limits.change_max)
    if upto <= _floor(conn):
        return 0
    gone = int(conn.exec_driver_sql("DELETE FROM sbus_changes WHERE seq <= ?", (upto,)).rowcount)
    conn.exec_driver_sql(
        "INSERT OR REPLACE INTO sbus_meta (name, value) VALUES (?, ?)", (FLOOR, upto)
    )
    return gone


def record_conflict(conn: Conn, conflict: Conflict, ring: int) -> None:
    conn.exec_driver_sql(
        "INSERT INTO sbus_conflicts (key, agent_id, error, stale_keys) VALUES (?, ?, ?, ?)",
        (
            conflict.key,
            conflict.agent_id,
            conflict.error,
            orjson.dumps(list(conflict.stale_keys)).decode(),
        ),
    )
    conn.exec_driver_sql(
        "DELETE FROM sbus_conflicts WHERE seq <= ?", (_last(conn, "sbus_conflicts") - ring,)
    )


def conflict_head(conn: Conn) -> str:
    return f"s{_last(conn, 'sbus_conflicts')}"


def conflicts_after(conn: Conn, cursor: str, limit: int) -> ConflictPage:
    seq = parse(cursor)
    if seq > _last(conn, "sbus_conflicts"):
        seq = 0  # another database's cursor: all this ring holds is new to the reader
    rows = conn.exec_driver_sql(
        "SELECT seq, key, agent_id, error, stale_keys FROM sbus_conflicts "
        "WHERE seq > ? ORDER BY seq LIMIT ?",
        (seq, limit),
    ).fetchall()
    events = [
        ConflictEvent(Conflict(r[1], r[2], r[3], tuple(orjson.loads(r[4]))), f"s{r[0]}")
        for r in rows
    ]
    return ConflictPage(events, f"s{rows[-1][0]}" if rows else f"s{seq}")
