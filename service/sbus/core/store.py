"""The Store Protocol: everything the engine asks of a backend.

The port belongs to its consumer: it lives in core beside the engine, and the adapters
in ``sbus.storage`` implement it, so core never imports a backend.

Each method is ONE atomic operation against the store: a single critical section
(memory), one ``BEGIN IMMEDIATE`` transaction (SQLite), one transaction holding row
locks taken in ascending key order (PostgreSQL), or one Lua script (Redis). Nothing
is cached in the bus process, so any number of processes over one store behave as
one bus.

Every method may raise :class:`sbus.core.errors.StoreUnavailable` when the backend
cannot be reached; driver exceptions never escape. Other raises are listed per method.
Times are store-clock milliseconds: the backend's clock plus the test offset.
"""

from __future__ import annotations

from typing import Protocol

from sbus.core.audit import AuditEntry, AuditEvent
from sbus.core.changes import ChangePage, Conflict, ConflictPage
from sbus.core.clock import MAX_OFFSET_MS
from sbus.core.types import (
    CreateOp,
    DLDump,
    HistoryEntry,
    IdemRecord,
    Limits,
    Outcome,
    RateLimit,
    RegisterResult,
    Revocation,
    Shard,
    StoreStats,
    Txn,
)


class Store(Protocol):
    backend: str  # "memory", "sqlite", ...
    durable: bool  # reported as the compat ``wal_enabled``
    limits: Limits  # fixed at construction from Settings

    async def start(self) -> None:
        """Connect and check the schema. Raises StoreUnavailable while not reachable."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Cheap liveness probe; raises StoreUnavailable."""

    async def check(self) -> None:
        """Read again the server settings the bus depends on (run every few seconds by
        the app): updates ``durable``; raises StoreMisconfigured while the server must not
        be used (Redis without ``noeviction``), StoreUnavailable when it cannot be asked."""

    async def now_ms(self) -> int:
        """The store clock: backend time plus the test offset."""

    async def advance_clock(self, ms: int, cap_ms: int = MAX_OFFSET_MS) -> int:
        """Move the test offset forward by ``ms``; returns the new offset. Checked and
        moved in one atomic step: raises ValidationFailed, moving nothing, when the offset
        would pass ``cap_ms`` (the caller's :func:`sbus.core.clock.offset_cap_ms`)."""

    async def create(self, op: CreateOp) -> Outcome:
        """Create ``op.key`` at version 0, or at tombstone + 1 over a tombstone, with its
        history entry and idempotency record. Raises ShardAlreadyExists for a live key."""

    async def admin_create(self, op: CreateOp) -> Shard | None:
        """Create unless the key is live; None when it already exists."""

    async def read(self, key: str, agent_id: str | None, session_id: str, record: bool) -> Shard:
        """Serve a shard and, when ``agent_id`` is given and ``record``, set the DL entry
        to the served version in the same step. Over the DL bound the read is served,
        not recorded, and the session becomes overflowed. Raises ShardNotFound, or
        ShardDeleted (after recording the tombstone version)."""

    async def read_many(
        self, keys: list[str], agent_id: str | None, session_id: str, record: bool
    ) -> dict[str, Shard]:
        """Serve the rows of ``keys`` (distinct), tombstones included; a key that never
        existed is absent. When ``agent_id`` is given and ``record``, record every
        served version (tombstones too) in the same step, exactly as :meth:`read` of
        each key in ``keys`` order would (:func:`sbus.core.rules.record_reads`), with
        the DeliveryLog written once. Raises nothing for a missing key."""

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[str]:
        """Live keys (no tombstones) in ascending order."""

    async def apply(self, txn: Txn) -> Outcome:
        """The commit protocol (protocol.md §4 step 9) for commit, multi, rollback and
        delete, decided by :func:`sbus.core.rules.decide`. A verified mandate
        (``txn.mandate``) is consumed in the same step, which also writes its audit entry
        (:func:`sbus.core.audit.consumed`): of N concurrent commits carrying one mandate,
        across any number of replicas, exactly one succeeds. Persists counters even on
        rejection and nothing else then. Replays a recorded idempotent outcome with
        the same fingerprint. Raises the rejection's SBusError, or IdempotencyKeyReused."""

    async def idempotent(self, agent_id: str, key: str) -> IdemRecord | None:
        """The live idempotency record, if any (a pre-check; ``apply`` re-checks)."""

    async def reset_session(self, agent_id: str, session_id: str) -> None:
        """Empty the (agent, session) DeliveryLog and clear its markers."""

    async def register(self, agent_id: str, session_id: str, keys: list[str]) -> RegisterResult:
        """Record the current version of each key without a live DL entry."""

    async def inject_stale(self, agent_id: str, session_id: str, key: str, version: int) -> None:
        """Overwrite a DL entry. Raises ShardNotFound, ValidationFailed (version out of range)."""

    async def take_token(self, agent_id: str, rate: RateLimit) -> int:
        """Take one token from the agent's bucket (refilled on the store clock). Returns
        0 when taken, else the milliseconds until one is available (nothing taken).
        Buckets go with ``reset_all``."""

    async def revoke(self, jti: str, until_ms: int) -> None:
        """Put a token id on the revocation list until ``until_ms`` on the store clock (an
        entry already there keeps the later deadline); kept by ``reset_all``."""

    async def revocation(self, jti: str) -> Revocation:
        """The token id's revocation deadline together with the store clock, in one read
        (checked on every request in token mode, so the replica can also refuse a token
        that has expired by the store clock)."""

    async def open_mode_secret(self, candidate: bytes) -> bytes:
        """The deployment's open-mode signing secret: the one the store keeps, or else
        ``candidate``, kept from now on. Insert-if-absent then read, so replicas asking at
        once all get the one stored first. Kept by ``reset_all``. Asked only in open mode
        when no key is configured (sbus.security.keys.open_mode_keys)."""

    async def purge(self) -> int:
        """Delete expired state (DL entries, sessions past their marker, idempotency
        records, audit entries past ``audit_ttl_ms`` and the oldest beyond
        ``audit_max_rows``); returns how many rows went. Called periodically by every
        replica."""

    async def audit(self, event: AuditEvent) -> None:
        """Append ``event`` to the audit log at the store clock's now, under the next id.
        With a ``group``: add one to the count of the entry of that group in the same
        store-clock minute (:func:`sbus.core.audit.group_key`) if there is one, else
        append it with count 1. One atomic step; entries survive ``reset_all``."""

    async def audit_log(self, after: int | None, limit: int) -> list[AuditEntry]:
        """Up to ``limit`` entries with an id above ``after``, in ascending id order."""

    async def history(self, key: str, before: int | None, limit: int) -> list[HistoryEntry]:
        """Retained entries newest first. Raises ShardNotFound for a key never created."""

    async def stats(self) -> StoreStats: ...

    async def set_ori(self, enabled: bool) -> None: ...

    async def reset_all(self) -> int:
        """Delete every shard, tombstone, history entry, DL session, counter and
        idempotency record, and set the test clock offset back to 0; keep
        ``ori_enabled``, revocations and the audit log. Returns the number of shards removed."""

    async def dump_delivery_log(self, after: str | None, limit: int) -> tuple[DLDump, str | None]:
        """Live DL entries as ``{agent: {session: {key: {version, age_secs}}}}`` for up to
        ``limit`` agents after ``after``; returns the next cursor."""

    # the change log (sbus.core.changes; protocol.md section 3.11) ----------------------
    # ``create``, ``admin_create`` and ``apply`` append one Change per version they
    # write, in their atomic step: a change is in the log exactly when its commit is.

    async def change_head(self) -> str:
        """A cursor after every change committed so far (the live edge)."""

    async def changes_after(self, cursor: str, prefix: str, limit: int) -> ChangePage:
        """Up to ``limit`` changes committed after ``cursor``, in commit order per key
        (every replica reads the same order), those of keys starting with ``prefix``
        returned; the page's cursor resumes after all it scanned. Raises InvalidCursor
        when ``cursor`` is not one of this store's, CursorExpired when a change after
        it is no longer retained (``purge`` trims by ``Limits.change_retention_ms`` and
        ``Limits.change_max``)."""

    async def record_conflict(self, conflict: Conflict) -> None:
        """Append to the conflict ring, keeping its newest ``Limits.conflict_ring``."""

    async def conflict_head(self) -> str:
        """A cursor after every conflict recorded so far."""

    async def conflicts_after(self, cursor: str, limit: int) -> ConflictPage:
        """Up to ``limit`` conflicts recorded after ``cursor``, oldest first; those the
        ring has dropped are skipped (the ring is a bounded sample, never a reset).
        Raises InvalidCursor."""
