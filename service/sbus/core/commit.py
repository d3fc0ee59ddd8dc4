"""The atomic step of a state change (protocol.md §4 steps 6 and 9), written once for
the stores that run it in Python: memory and SQLite.

Such a store opens its atomic section (memory: a method that never awaits; SQLite:
one ``BEGIN IMMEDIATE`` transaction on its writer thread), hands this module a
:class:`Section` over it and gets the answer back. The order of the step lives here
alone: the idempotency re-check, loading the rows, :func:`sbus.core.rules.decide`,
persisting its effects (counters always; on success the rows, their history, the
committer's read-your-writes entries and the consumed mandate with its audit entry),
the answer
(:func:`sbus.core.rules.render`) and its idempotency record.

The Section is synchronous because both stores run the whole step without yielding:
the memory store must not await inside its critical section, and SQLite's
transaction runs on a thread with no event loop. Neither pays a coroutine per row.

PostgreSQL and Redis keep their own implementation of this step, one server-side
round trip each (docs/storage.md says where each rule lives), and share only the
pieces: ``decide`` (PostgreSQL), ``render`` and :func:`sbus.core.idempotency.replay`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol

from sbus.core import audit, rules
from sbus.core.changes import Change, changes_of, created
from sbus.core.errors import ShardAlreadyExists
from sbus.core.idempotency import recorded, replay
from sbus.core.types import (
    CreateOp,
    DLEntry,
    HistoryEntry,
    IdemRecord,
    IdemRef,
    Limits,
    MandateRef,
    Outcome,
    SessionView,
    Shard,
    Txn,
)


class Section(Protocol):
    """Loads and writes inside one store's open atomic section. Every method acts at
    once and sees what the methods before it wrote."""

    def idem_record(self, agent_id: str, key: str, now_ms: int) -> IdemRecord | None:
        """The record under (agent, Idempotency-Key) unless it expired by ``now_ms``."""

    def put_idem(
        self, agent_id: str, key: str, record: IdemRecord, now_ms: int, expires_ms: int
    ) -> None:
        """Keep ``record`` until ``expires_ms`` (replacing an expired one)."""

    def session(self, agent_id: str, session_id: str) -> SessionView:
        """The stored (agent, session) DeliveryLog; an empty view when there is none.
        Creates nothing."""

    def rows(self, keys: Collection[str]) -> Mapping[str, Shard | None]:
        """The rows of ``keys``, tombstones included: ``get`` answers each of them
        (None when absent) and may answer for more."""

    def history_entry(self, key: str, version: int) -> HistoryEntry | None:
        """The retained history entry of ``key`` at ``version``."""

    def mandate_consumed(self, jti: str, now_ms: int) -> bool:
        """Whether the mandate was consumed and its record is still retained."""

    def add_counters(self, deltas: Mapping[str, int]) -> None: ...

    def bump(self, key: str, attempts: int, conflicts: int) -> None:
        """Add to a refused commit's row counters (nothing else of the row changes)."""

    def write_shard(self, shard: Shard, entry: HistoryEntry) -> Shard:
        """Upsert the row, append its history entry and trim retention by depth and by
        :func:`sbus.core.rules.entry_bytes`; returns the row with its retained depth."""

    def write_session(
        self,
        agent_id: str,
        session_id: str,
        view: SessionView,
        entries: Mapping[str, DLEntry],
        *,
        restart: bool,
        now_ms: int,
    ) -> None:
        """After a commit: drop the session's stored entries when ``restart``, upsert
        ``entries`` and mark the session served at ``now_ms`` (``view`` is what
        :meth:`session` gave)."""

    def consume(self, mandate: MandateRef) -> None:
        """Record the mandate's jti as consumed until its retention deadline."""

    def audit(self, event: audit.AuditEvent, now_ms: int) -> None:
        """Append an audit entry (the Store Protocol's ``audit``, in this section)."""

    def log_change(self, change: Change) -> None:
        """Append ``change`` to the store's change log (sbus.core.changes)."""


def _replayed(section: Section, idem: IdemRef, now_ms: int) -> Outcome | None:
    return replay(section.idem_record(idem.agent_id, idem.key, now_ms), idem.fingerprint)


def _record(section: Section, idem: IdemRef, outcome: Outcome, now_ms: int, limits: Limits) -> None:
    section.put_idem(
        idem.agent_id,
        idem.key,
        recorded(idem.fingerprint, outcome),
        now_ms,
        now_ms + limits.idempotency_ttl_ms,
    )


def apply(section: Section, txn: Txn, *, now_ms: int, ori_enabled: bool, limits: Limits) -> Outcome:
    """Commit, multi-commit, rollback or delete (the Store Protocol's ``apply``).
    Raises the refusal ``decide`` returns, after persisting its counters."""
    idem = txn.idem
    if idem is not None:
        replayed = _replayed(section, idem, now_ms)
        if replayed is not None:
            return replayed
    view = section.session(txn.agent_id, txn.session_id)
    # decide's contract: every written key, explicit read-set key and DeliveryLog key.
    keys = {w.key for w in txn.writes}
    keys.update(r.key for r in txn.read_set)
    keys.update(view.entries)
    sources = {
        w.key: section.history_entry(w.key, w.target_version)
        for w in txn.writes
        if w.kind == "rollback"
    }
    mandate = txn.mandate
    fx = rules.decide(
        txn,
        section.rows(keys),
        view,
        ori_enabled=ori_enabled,
        now_ms=now_ms,
        ttl_ms=limits.session_ttl_ms,
        rollback_sources=sources,
        mandate_consumed=mandate is not None and section.mandate_consumed(mandate.jti, now_ms),
    )
    if fx.counters:
        section.add_counters(fx.counters)
    if fx.error is not None:
        for key, (attempts, conflicts) in fx.bumps.items():
            section.bump(key, attempts, conflicts)
        raise fx.error
    post: dict[str, Shard] = {}
    for shard, entry in zip(fx.shards, fx.history, strict=True):
        post[shard.key] = section.write_shard(shard, entry)
    for change in changes_of(txn, fx.history):
        section.log_change(change)
    section.write_session(
        txn.agent_id,
        txn.session_id,
        view,
        fx.dl_writes,
        # expired or purged entries go; the read-your-writes entries start it afresh
        restart=fx.session != "live",
        now_ms=now_ms,
    )
    if fx.consume is not None:
        section.consume(fx.consume)
        section.audit(audit.consumed(txn), now_ms)
    outcome = rules.render(txn, post)
    if idem is not None:
        _record(section, idem, outcome, now_ms, limits)
    return outcome


def create(section: Section, op: CreateOp, *, now_ms: int, limits: Limits) -> Outcome:
    """POST /shard (the Store Protocol's ``create``). Raises ShardAlreadyExists for a
    live key."""
    idem = op.idem
    if idem is not None:
        replayed = _replayed(section, idem, now_ms)
        if replayed is not None:
            return replayed
    shard = create_row(section, op, now_ms=now_ms)
    if shard is None:
        raise ShardAlreadyExists(op.key)
    outcome = rules.render_create(shard)
    if idem is not None:
        _record(section, idem, outcome, now_ms, limits)
    return outcome


def create_row(section: Section, op: CreateOp, *, now_ms: int) -> Shard | None:
    """Create ``op.key`` (over a tombstone: at its version + 1) and return the stored
    row; None, writing nothing, when the key is live (the admin create's answer)."""
    existing = section.rows((op.key,)).get(op.key)
    if existing is not None and not existing.deleted:
        return None
    shard, entry = rules.create_shard(op, existing, now_ms)
    written = section.write_shard(shard, entry)
    section.log_change(created(entry))
    return written
