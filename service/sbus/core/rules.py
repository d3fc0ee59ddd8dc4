"""The commit protocol of protocol.md §4, step 9, as pure functions.

A store opens its atomic step (a critical section, a transaction holding row locks,
one Lua script), loads the rows named by a :class:`~sbus.core.types.Txn`, calls
:func:`decide`, persists the returned :class:`Effects` (counters always, writes only
when ``error`` is None), and answers with :func:`render`. Keeping the rules here
means every backend validates by the very same code; the Hypothesis model tests
check this code against an independent model.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal, NamedTuple

from sbus.core.chain import GENESIS, content_id, entry_hash
from sbus.core.clock import rfc3339
from sbus.core.errors import (
    CrossShardStale,
    MandateConsumed,
    MandateExpired,
    MandateNotFound,
    MandateRequired,
    SBusError,
    SessionExpired,
    ShardAlreadyExists,
    ShardDeleted,
    ShardNotFound,
    VersionMismatch,
    VersionNotFound,
)
from sbus.core.types import (
    CreateOp,
    DLEntry,
    HistoryEntry,
    MandateRef,
    Outcome,
    RateLimit,
    SessionState,
    SessionView,
    Shard,
    Txn,
    WriteOp,
)

# What a recorded read does to its session (:func:`plan_read`).
ReadPlan = Literal["record", "restart", "overflow", "skip"]


class Effects:
    """Everything a store must persist for one decided Txn.

    ``counters`` maps counter names to non-zero deltas; ``bumps`` maps a key to its
    (attempt_count, conflict_count) deltas, persisted only when ``error`` is set (on
    success they are already folded into ``shards``). ``shards`` are the post-commit
    rows (history_depth before retention; the store trims and corrects it) and
    ``history`` their new entries, in ascending key order. ``session`` is the state
    the session was in, so the store knows whether to drop expired entries.
    A plain slotted class: built on every commit, it must be cheap.
    """

    __slots__ = (
        "bumps",
        "consume",
        "counters",
        "dl_writes",
        "error",
        "history",
        "session",
        "shards",
    )

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.bumps: dict[str, tuple[int, int]] = {}
        self.error: SBusError | None = None
        self.shards: list[Shard] = []
        self.history: list[HistoryEntry] = []
        self.dl_writes: dict[str, DLEntry] = {}
        self.session: SessionState = "empty"
        self.consume: MandateRef | None = None  # a mandate to record as consumed


def session_state(session: SessionView, now_ms: int, ttl_ms: int) -> SessionState:
    """``empty`` | ``live`` | ``expired`` | ``overflowed`` (protocol.md §1)."""
    if session.overflowed:
        return "overflowed"
    if session.last_served_ms is None:
        return "empty"
    if ttl_ms <= 0:
        return "live" if session.entries else "empty"
    cutoff = now_ms - ttl_ms
    for entry in session.entries.values():
        if entry.served_ms > cutoff:
            return "live"
    # All entries are past the TTL; the marker keeps "expired" for one more TTL.
    if session.last_served_ms > cutoff - ttl_ms:
        return "expired"
    return "empty"


def live_entries(session: SessionView, now_ms: int, ttl_ms: int) -> dict[str, DLEntry]:
    if ttl_ms <= 0:
        return session.entries
    cutoff = now_ms - ttl_ms
    return {k: e for k, e in session.entries.items() if e.served_ms > cutoff}


def decide(
    txn: Txn,
    shards: Mapping[str, Shard | None],
    session: SessionView,
    *,
    ori_enabled: bool,
    now_ms: int,
    ttl_ms: int,
    rollback_sources: Mapping[str, HistoryEntry | None] | None = None,
    mandate_consumed: bool = False,
) -> Effects:
    """Decide a Txn against loaded state. ``shards`` must answer ``get`` for every
    written key, every explicit read-set key and every key of the session's
    DeliveryLog (None if absent). This runs on every commit of every store, so it is
    written for speed: no sorting or copying of one-element collections."""
    fx = Effects()
    writes = txn.writes
    # ``guarded``: the written keys their own precondition guards (see 9c): an expected
    # version, or a create's "not live" (protocol.md §3.1).
    guarded: Collection[str]
    if len(writes) == 1:
        by_key = {writes[0].key: writes[0]}
        written: list[str] = [writes[0].key]
        guarded = by_key if _guards(writes[0]) else ()
    else:
        by_key = {w.key: w for w in writes}
        written = sorted(by_key)
        guarded = {w.key for w in writes if _guards(w)}

    # 9a. mandates. The engine verified signature, holder, scope and context before
    # the store; expiry is re-checked here on the store clock, and consumption is
    # decided against the consumed-jti record loaded in this same atomic step.
    mandate = txn.mandate
    if not txn.has_mandate:
        for key in written:
            shard = shards.get(key)
            # A create needs no mandate, as POST /shard needs none (protocol.md §1.4):
            # the re-created shard keeps the tombstone's requirement for what follows.
            if shard is not None and shard.require_mandate and by_key[key].kind != "create":
                fx.error = MandateRequired(key)
                return fx
    elif mandate is None:
        fx.error = MandateNotFound.unrecognised()
        return fx
    else:
        if now_ms >= mandate.expires_ms:
            fx.error = MandateExpired(mandate.jti)
            return fx
        if mandate_consumed:
            fx.error = MandateConsumed(mandate.jti)
            return fx

    # 9b. session state
    state = fx.session = session_state(session, now_ms, ttl_ms)
    if state == "expired" or state == "overflowed":
        reason = "ttl" if state == "expired" else "overflow"
        fx.error = SessionExpired(txn.agent_id, reason)
        return fx

    # 9c. effective read set: explicit entries plus live DL entries; a key in both is
    # checked at both versions. A key written with an expected version is excluded (9f's
    # guard checks it); a rollback without one is not, or a stale read of the very key
    # it rolls back would let it overwrite versions its caller never saw.
    checks = [(r.key, r.version_at_read) for r in txn.read_set if r.key not in guarded]
    if state == "live":
        cutoff = now_ms - ttl_ms if ttl_ms > 0 else None
        for key, entry in session.entries.items():
            if key not in guarded and (cutoff is None or entry.served_ms > cutoff):
                checks.append((key, entry.version))
    stale: list[tuple[str, int, int]] = []
    if checks:
        # Nothing is sorted on the passing path: the first missing key (in key order)
        # and the stale entries (sorted, the same (key, version) from read_set and DL
        # reported once) are ordered only when there is something to report.
        missing: str | None = None
        diverged: list[tuple[str, int, int]] = []
        for key, version in checks:
            shard = shards.get(key)
            if shard is None:
                if missing is None or key < missing:
                    missing = key
            elif shard.version != version:
                diverged.append((key, version, shard.version))
        if missing is not None:
            fx.error = ShardNotFound(missing)
            return fx
        if diverged:
            stale = sorted(set(diverged))
        # 9d. count before deciding so ORI-on and ORI-off divergence rates compare.
        fx.counters["view_checked_commits"] = 1
        if stale:
            fx.counters["view_divergent_commits"] = 1

    # 9e. ORI
    if ori_enabled and stale:
        fx.counters["cross_shard_stale"] = 1
        fx.error = CrossShardStale.of(stale)
        return fx

    # 9f. written keys in ascending order
    current: list[Shard | None] = []  # the row before, per written key (None: created)
    for key in written:
        op = by_key[key]
        shard = shards.get(key)
        if op.kind == "create":
            # POST /shard's rule: a live key refuses; absent or a tombstone proceeds.
            # No attempt is counted: the row a create replaces has no version to check.
            if shard is not None and not shard.deleted:
                fx.error = ShardAlreadyExists(key)
                return fx
            current.append(shard)
            continue
        if shard is None:
            fx.error = ShardNotFound(key)
            return fx
        if shard.deleted:
            fx.error = ShardDeleted(key, shard.version)
            return fx
        if op.expected_version is not None and op.expected_version != shard.version:
            fx.bumps[key] = (1, 1)
            fx.counters["total_conflicts"] = 1
            fx.error = VersionMismatch(key, op.expected_version, shard.version)
            return fx
        fx.bumps[key] = (1, 0)
        if op.kind == "rollback":
            source = (rollback_sources or {}).get(key)
            if source is None or source.deleted or source.version != op.target_version:
                fx.error = VersionNotFound(key, op.target_version)
                return fx
        current.append(shard)

    # 9g. apply
    fx.counters["total_commits"] = 1
    fx.consume = mandate
    committed_at = rfc3339(now_ms)
    for key, old in zip(written, current, strict=True):
        op = by_key[key]
        if old is None or op.kind == "create":
            new, made = create_shard(_create_op(op, txn), old, now_ms)
            fx.history.append(made)
            fx.shards.append(new)
            fx.dl_writes[key] = DLEntry(new.version, now_ms)
            continue
        version = old.version + 1
        deleted = op.kind == "delete"
        rationale = txn.rationale
        if op.kind == "rollback":
            content = (rollback_sources or {})[key].content  # type: ignore[union-attr]
            rationale = f"rollback to {op.target_version}"
        elif deleted:
            # the bus's own word, as for DELETE /shard (protocol.md §3.3)
            content, rationale = "", "delete"
        else:
            content = op.content
        digest = entry_hash(
            old.head_hash,
            version,
            agent_id=txn.agent_id,
            commit_id=txn.commit_id,
            committed_at=committed_at,
            rationale=rationale,
            deleted=deleted,
            content=content,
        )
        fx.history.append(
            HistoryEntry(
                key,
                version,
                txn.agent_id,
                now_ms,
                content,
                deleted,
                rationale,
                txn.commit_id,
                old.head_hash,
                digest,
            )
        )
        fx.shards.append(
            Shard(
                key,
                old.id,
                content,
                version,
                old.goal_tag,
                old.require_mandate,
                old.created_ms,
                now_ms,
                old.attempt_count + 1,
                old.conflict_count,
                deleted,
                digest,
                old.history_depth + 1,
            )
        )
        fx.dl_writes[key] = DLEntry(version, now_ms)
    return fx


def _guards(write: WriteOp) -> bool:
    """Whether a written key's own precondition guards it, excluding it from the
    effective read set (9c): an expected version, or a create's "not live"."""
    return write.expected_version is not None or write.kind == "create"


def _create_op(write: WriteOp, txn: Txn) -> CreateOp:
    """A create inside a multi-commit as the CreateOp POST /shard would build."""
    return CreateOp(
        key=write.key,
        content=write.content,
        goal_tag=write.goal_tag,
        require_mandate=write.require_mandate,
        agent_id=txn.agent_id,
        commit_id=txn.commit_id,
    )


# What an entry's fixed-size fields count: version and commit time (8 bytes each) and
# the deleted flag (1).
ENTRY_FIXED_BYTES = 17


def entry_bytes(entry: HistoryEntry) -> int:
    """What one history entry counts against ``SBUS_HISTORY_MAX_BYTES``: the UTF-8 bytes
    of every text it retains (key, agent, content, rationale, commit id, both hashes)
    plus :data:`ENTRY_FIXED_BYTES`. Every store counts by this function (PostgreSQL and
    Redis are handed its result), so retention is the same on all of them."""
    return (
        ENTRY_FIXED_BYTES
        + len(entry.key.encode())
        + len(entry.agent_id.encode())
        + len(entry.content.encode())
        + len((entry.rationale or "").encode())
        + len(entry.commit_id.encode())
        + len(entry.prev_hash.encode())
        + len(entry.hash.encode())
    )


def creation_entry(op: CreateOp, version: int, prev_hash: str, now_ms: int) -> HistoryEntry:
    """The history entry of a creation at ``version`` after ``prev_hash`` (GENESIS for a
    new key, the tombstone's hash for a re-creation)."""
    digest = entry_hash(
        prev_hash,
        version,
        agent_id=op.agent_id,
        commit_id=op.commit_id,
        committed_at=rfc3339(now_ms),
        rationale="create",
        deleted=False,
        content=op.content,
    )
    return HistoryEntry(
        key=op.key,
        version=version,
        agent_id=op.agent_id,
        committed_ms=now_ms,
        content=op.content,
        deleted=False,
        rationale="create",
        commit_id=op.commit_id,
        prev_hash=prev_hash,
        hash=digest,
    )


def created_require_mandate(requested: bool, tombstone_requires: bool) -> bool:
    """The ``require_mandate`` of a (re-)created shard: the request's, or the
    tombstone's when that one required a mandate. A re-create may strengthen the
    policy but never weaken it; otherwise anyone with only the create right could turn
    a key that needs a mandate even to delete into one that needs none. Only
    /admin/reset, which removes the tombstones, clears it."""
    return requested or tombstone_requires


def create_shard(op: CreateOp, existing: Shard | None, now_ms: int) -> tuple[Shard, HistoryEntry]:
    """The row and genesis-or-continuation history entry for POST /shard.

    Re-creating a tombstoned key continues at tombstone + 1, extends its chain and
    keeps the tombstone's mandate requirement (:func:`created_require_mandate`).
    The caller has already refused a live ``existing``.
    """
    version = 0 if existing is None else existing.version + 1
    prev = GENESIS if existing is None else existing.head_hash
    depth = 0 if existing is None else existing.history_depth
    entry = creation_entry(op, version, prev, now_ms)
    digest = entry.hash
    shard = Shard(
        key=op.key,
        id=content_id(op.content),
        content=op.content,
        version=version,
        goal_tag=op.goal_tag,
        require_mandate=created_require_mandate(
            op.require_mandate, existing is not None and existing.require_mandate
        ),
        created_ms=now_ms,
        updated_ms=now_ms,
        attempt_count=0,
        conflict_count=0,
        deleted=False,
        head_hash=digest,
        history_depth=depth + (1 if version else 0),
    )
    return shard, entry


def shard_body(shard: Shard) -> dict[str, Any]:
    """The compat ShardResponse plus ``policy``."""
    return {
        "key": shard.key,
        "id": shard.id,
        "version": shard.version,
        "content": shard.content,
        "owner": None,
        "goal_tag": shard.goal_tag,
        "attempt_count": shard.attempt_count,
        "conflict_count": shard.conflict_count,
        "delta_log_depth": shard.history_depth,
        "created_at": rfc3339(shard.created_ms),
        "updated_at": rfc3339(shard.updated_ms),
        "policy": {"require_mandate": shard.require_mandate},
    }


def render(txn: Txn, post: Mapping[str, Shard]) -> Outcome:
    """The success answer of an applied Txn; ``post`` holds the stored rows after it."""
    if txn.op == "multi":
        results = [
            {"key": w.key, "new_version": post[w.key].version, "op": w.kind} for w in txn.writes
        ]
        return Outcome(200, {"results": results, "commit_id": txn.commit_id})
    shard = post[txn.writes[0].key]
    if txn.op == "delete":
        return Outcome(204, None, etag=shard.version)
    if txn.op == "rollback":
        return Outcome(200, {**shard_body(shard), "commit_id": txn.commit_id}, etag=shard.version)
    return Outcome(
        200,
        {"new_version": shard.version, "shard_id": shard.id, "commit_id": txn.commit_id},
        etag=shard.version,
    )


def render_create(shard: Shard) -> Outcome:
    return Outcome(201, shard_body(shard), etag=shard.version)


def record_read(
    view: SessionView,
    key: str,
    version: int,
    *,
    now_ms: int,
    ttl_ms: int,
    max_entries: int,
) -> ReadPlan:
    """Apply a recorded read (GET or register) to ``view`` in place and return what a
    store must persist: ``skip`` (nothing), ``overflow`` (mark the session overflowed),
    ``record`` (upsert the entry and the session's last read) or ``restart`` (delete the
    session's old entries first, then as ``record``)."""
    plan = plan_read(view, key, now_ms=now_ms, ttl_ms=ttl_ms, max_entries=max_entries)
    if plan == "overflow":
        view.overflowed = True
    elif plan != "skip":
        if plan == "restart":
            view.entries.clear()
        view.entries[key] = DLEntry(version, now_ms)
        view.last_served_ms = now_ms
    return plan


class RecordedReads(NamedTuple):
    """What a store persists after :func:`record_reads`: nothing unless ``changed``;
    else, when ``restart``, drop the session's stored entries first, then upsert
    ``entries`` and store the session's marker (``overflowed``, ``last_served_ms``)."""

    changed: bool
    restart: bool
    entries: dict[str, DLEntry]
    overflowed: bool
    last_served_ms: int | None


def record_reads(
    view: SessionView,
    served: Iterable[tuple[str, int]],
    *,
    now_ms: int,
    ttl_ms: int,
    max_entries: int,
) -> RecordedReads:
    """Apply the recorded reads of a bulk read, (key, served version) in request order,
    to ``view`` in place, exactly as that many single reads would one after the other
    (:func:`record_read`: a session past its bound overflows at the first key that does
    not fit and records nothing after it), and say in one piece what to persist, so a
    store writes the DeliveryLog once for N keys."""
    restart = False
    changed = False
    entries: dict[str, DLEntry] = {}
    for key, version in served:
        plan = record_read(
            view, key, version, now_ms=now_ms, ttl_ms=ttl_ms, max_entries=max_entries
        )
        if plan == "skip":
            continue
        changed = True
        if plan == "restart":
            # Only the first recorded read can restart: the session is live after it.
            restart = True
            entries.clear()
        if plan != "overflow":
            entries[key] = view.entries[key]
    return RecordedReads(changed, restart, entries, view.overflowed, view.last_served_ms)


def begin_register(view: SessionView, now_ms: int, ttl_ms: int) -> tuple[dict[str, DLEntry], bool]:
    """Open a register on ``view``: the live entries it must skip, and whether the
    session was expired and has been started afresh (protocol.md §1: even when the
    register records nothing). An empty session has no live entries; an overflowed one
    keeps its entries. On a restart ``view`` is emptied in place and the store must
    drop the session's persisted entries and marker."""
    state = session_state(view, now_ms, ttl_ms)
    if state == "expired":
        view.entries.clear()
        view.last_served_ms = None
        return {}, True
    if state == "empty":
        return {}, False
    return live_entries(view, now_ms, ttl_ms), False


def bucket_take(
    tokens: float | None, updated_ms: int | None, now_ms: int, rate: RateLimit
) -> tuple[float, int]:
    """The token bucket step: (tokens left after the refill and the take, wait in ms).
    A wait > 0 means nothing was taken. ``tokens`` None is a new, full bucket."""
    if tokens is None or updated_ms is None:
        level = float(rate.burst)
    else:
        level = min(float(rate.burst), tokens + max(0, now_ms - updated_ms) * rate.per_ms)
    if level >= 1.0:
        return level - 1.0, 0
    return level, max(1, int((1.0 - level) / rate.per_ms + 0.999))


def plan_read(
    session: SessionView, key: str, *, now_ms: int, ttl_ms: int, max_entries: int
) -> ReadPlan:
    """How a recorded read (GET or register) treats the session: ``record``, ``restart``
    (expired or empty: drop old entries first, then record), ``overflow`` (serve, do not
    record, mark the session) or ``skip`` (already overflowed: serve only)."""
    state = session_state(session, now_ms, ttl_ms)
    if state == "overflowed":
        return "skip"
    if state != "live":
        return "restart" if session.entries or session.last_served_ms is not None else "record"
    live = live_entries(session, now_ms, ttl_ms)
    if key not in live and len(live) >= max_entries:
        return "overflow"
    return "record"
