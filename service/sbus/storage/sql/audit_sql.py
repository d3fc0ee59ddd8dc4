"""The audit log's statements, shared by the SQLite and PostgreSQL stores.

Both dialects take the same SQL here apart from their parameter markers (``?`` and
``$n``), so each statement is written once with ``?`` and numbered for PostgreSQL by
:func:`numbered`. The rules (what an aggregated event updates, what purge drops) are
those of :mod:`sbus.core.audit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sbus.core import audit
from sbus.core.audit import AuditEntry, AuditEvent

# One event at the store clock's ``now``; an aggregated one adds to its group's entry
# of this minute (the unique index on grp), keeping that entry's id and time.
INSERT = (
    "INSERT INTO sbus_audit (at_ms, kind, agent, details, grp, count) VALUES (?, ?, ?, ?, ?, 1) "
    "ON CONFLICT (grp) DO UPDATE SET count = sbus_audit.count + 1"
)
PAGE = (
    "SELECT id, at_ms, kind, agent, details, count FROM sbus_audit WHERE id > ? ORDER BY id LIMIT ?"
)
EXPIRED = "DELETE FROM sbus_audit WHERE at_ms <= ?"
# Everything older than the newest ``max_rows`` entries (the subquery finds the id of
# the last one to keep's predecessor, None when there are not that many).
OVER_CAP = (
    "DELETE FROM sbus_audit WHERE id <= "
    "(SELECT id FROM sbus_audit ORDER BY id DESC LIMIT 1 OFFSET ?)"
)


def numbered(sql: str) -> str:
    """``?`` markers as PostgreSQL's ``$1, $2, ...``."""
    parts = sql.split("?")
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]


def insert_params(event: AuditEvent, now_ms: int) -> tuple[Any, ...]:
    group = None if event.group is None else audit.group_key(event.group, now_ms)
    return (now_ms, event.kind, event.agent, audit.encode(event.details), group)


def entries(rows: Sequence[Sequence[Any]]) -> list[AuditEntry]:
    return [
        AuditEntry(int(r[0]), int(r[1]), r[2], r[3], audit.decode(r[4]), int(r[5])) for r in rows
    ]
