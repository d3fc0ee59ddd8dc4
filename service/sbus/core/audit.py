"""The audit log (protocol.md section 2.12): who did what, kept in the store.

Every replica writes to the one store, so the log is the deployment's, not a process's.
The engine writes an entry for each audited action (:class:`AuditEvent`); the store
gives it an id from one increasing sequence and its time from the store clock. A
mandate's consumption is written by the store itself, inside the commit's atomic step
(:func:`consumed`), so the entry exists exactly when the commit does.

Refusals could be sent without end, so they are not one entry each: an event with a
``group`` is folded into the entry of the same group and store-clock minute
(:func:`group_key`), whose ``count`` goes up by one. Retention (``SBUS_AUDIT_TTL`` and
``SBUS_AUDIT_MAX_ROWS``) is enforced by each store's ``purge`` on the store clock, so
the log never holds more than the configured number of entries for long.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import orjson

from sbus.core.types import Txn

AuditKind = Literal[
    "token_issue",
    "token_revoke",
    "mandate_issue",
    "mandate_consume",
    "config",
    "reset",
    "session_reset",
    "admin",
    "denied",
]

# The kinds whose events are aggregated (:func:`denied`, :func:`admin_use`).
AGGREGATED = frozenset({"denied", "admin"})
# Aggregated events share an entry per group and minute of the store clock.
GROUP_MS = 60_000
# The defaults of SBUS_AUDIT_TTL (seconds) and SBUS_AUDIT_MAX_ROWS.
DEFAULT_TTL_S = 30 * 86_400
DEFAULT_MAX_ROWS = 100_000
# The largest page GET /admin/audit and `sbus audit` may ask for.
MAX_PAGE = 1000


class AuditEvent(NamedTuple):
    """What the engine hands the store. ``details`` is a JSON object; ``group``, when
    set, names the aggregate this event counts towards (:func:`group_of`)."""

    kind: AuditKind
    agent: str
    details: Mapping[str, Any]
    group: str | None = None


class AuditEntry(NamedTuple):
    """One stored entry: ``id`` is the paging cursor (increasing in write order), ``at``
    the store-clock milliseconds of its first event, ``events`` how many events it stands
    for (1 unless aggregated; shown as ``details.count`` on the aggregated kinds)."""

    id: int
    at: int
    kind: str
    agent: str
    details: dict[str, Any]
    events: int = 1

    def to_json(self) -> dict[str, Any]:
        details = dict(self.details)
        if self.kind in AGGREGATED:
            details["count"] = self.events
        return {
            "id": self.id,
            "at": self.at,
            "kind": self.kind,
            "agent": self.agent,
            "details": details,
        }


def page_json(entries: list[AuditEntry], limit: int) -> dict[str, Any]:
    """The answer of GET /admin/audit (and ``sbus audit --json``) from up to ``limit + 1``
    entries: one more than a page shows whether another page follows."""
    page = entries[:limit]
    return {
        "entries": [entry.to_json() for entry in page],
        "next_after": page[-1].id if len(entries) > limit else None,
    }


def group_of(*parts: str) -> str:
    """An aggregate's name: its parts as a JSON array, which no two different part
    lists share."""
    return orjson.dumps(list(parts)).decode()


def group_key(group: str, now_ms: int) -> str:
    """The stored key of ``group`` in the minute of ``now_ms``. PostgreSQL and the
    Redis scripts build the same string (``group || '|' || now / 60000``)."""
    return f"{group}|{now_ms // GROUP_MS}"


def encode(details: Mapping[str, Any]) -> str:
    return orjson.dumps(dict(details)).decode()


def decode(text: str | bytes) -> dict[str, Any]:
    value = orjson.loads(text)
    return value if isinstance(value, dict) else {}


def denied(agent: str, key: str, right: str) -> AuditEvent:
    """A capability refusal, counted per (agent, key) and minute."""
    return AuditEvent("denied", agent, {"key": key, "right": right}, group_of("denied", agent, key))


def admin_use(agent: str, op: str, token_id: str | None) -> AuditEvent:
    """A use of the admin right without an entry of its own (reading the DeliveryLog or
    the audit log, injecting a stale entry, the admin create, moving the test clock),
    counted per (agent, token, operation) and minute."""
    details: dict[str, Any] = {"op": op}
    if token_id is not None:
        details["via_token"] = token_id
    return AuditEvent("admin", agent, details, group_of("admin", agent, token_id or "", op))


def consumed(txn: Txn) -> AuditEvent:
    """The entry a store writes in the commit's atomic step when it consumes the
    commit's mandate."""
    assert txn.mandate is not None
    return AuditEvent(
        "mandate_consume",
        txn.agent_id,
        {
            "mandate_id": txn.mandate.jti,
            "commit_id": txn.commit_id,
            "keys": [w.key for w in txn.writes],
        },
    )


def retention_cutoff(now_ms: int, ttl_ms: int) -> int | None:
    """Entries at or before this instant are purged; None: kept whatever their age."""
    return now_ms - ttl_ms if ttl_ms > 0 else None
