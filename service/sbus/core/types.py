"""Domain values shared by the engine and every store.

Immutable values with no behaviour that needs a particular backend. The ones built on
every commit (shards, history entries, DL entries, transactions) are NamedTuples: a
frozen dataclass pays an ``object.__setattr__`` per field, which measured ~4 us per
Shard here, a sixth of the in-process commit budget. The rest are frozen dataclasses.
Times are integer milliseconds on the store clock (see ``sbus.core.clock``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypedDict

WriteKind = Literal["commit", "create", "delete", "rollback"]
# Which request a Txn came from; it selects how the success body is rendered.
TxnOp = Literal["commit", "multi", "rollback", "delete"]
# protocol.md §1: the state of an (agent, session) DeliveryLog at a given instant.
SessionState = Literal["empty", "live", "expired", "overflowed"]


class Shard(NamedTuple):
    """One shard row as the store keeps it, tombstones included."""

    key: str
    id: str
    content: str
    version: int
    goal_tag: str
    require_mandate: bool
    created_ms: int
    updated_ms: int
    attempt_count: int
    conflict_count: int
    deleted: bool
    head_hash: str
    history_depth: int  # retained history entries with version != 0 (compat delta_log_depth)


class DLDumpEntry(TypedDict):
    """One live DeliveryLog entry as ``GET /admin/delivery-log`` shows it."""

    version: int
    age_secs: float


# agent -> session -> key -> entry: a page of the live DeliveryLog (Store.dump_delivery_log).
DLDump = dict[str, dict[str, dict[str, DLDumpEntry]]]


class HistoryEntry(NamedTuple):
    key: str
    version: int
    agent_id: str
    committed_ms: int
    content: str
    deleted: bool
    rationale: str | None
    commit_id: str
    prev_hash: str
    hash: str


class DLEntry(NamedTuple):
    version: int
    served_ms: int


@dataclass(slots=True)
class SessionView:
    """A (agent, session) DeliveryLog as loaded inside an atomic step."""

    entries: dict[str, DLEntry] = field(default_factory=dict)
    overflowed: bool = False
    last_served_ms: int | None = None


class ReadItem(NamedTuple):
    key: str
    version_at_read: int


class WriteOp(NamedTuple):
    """One written key. ``expected_version`` None means unconditional (rollback) or
    none at all (create: the key must not be live, protocol.md §3.1)."""

    key: str
    expected_version: int | None
    kind: WriteKind
    content: str = ""  # commit and create
    target_version: int = 0  # rollback only
    goal_tag: str = ""  # create only
    require_mandate: bool = False  # create only: the policy asked for


class MandateRef(NamedTuple):
    """A mandate the engine has verified (signature, holder, scope, context); the
    store's atomic step checks expiry on its own clock and consumes the jti."""

    jti: str
    expires_ms: int
    retain_until_ms: int  # consumed jtis are kept until then (exp + leeway)


class IdemRef(NamedTuple):
    agent_id: str
    key: str
    fingerprint: str


class Txn(NamedTuple):
    """A state change submitted to the store's single atomic commit operation.

    ``op`` selects how the success body is rendered. ``writes`` are in request order
    (no duplicate keys); a store that needs an order of its own, such as a lock order,
    sorts them itself.
    """

    op: TxnOp
    agent_id: str
    session_id: str
    writes: tuple[WriteOp, ...]
    read_set: tuple[ReadItem, ...]
    rationale: str | None
    commit_id: str
    idem: IdemRef | None = None
    has_mandate: bool = False  # a mandate was presented (verified or not)
    mandate: MandateRef | None = None  # set when it verified


@dataclass(frozen=True, slots=True)
class CreateOp:
    key: str
    content: str
    goal_tag: str
    require_mandate: bool
    agent_id: str
    commit_id: str
    idem: IdemRef | None = None


class Outcome(NamedTuple):
    """What a successful (or replayed) state change answers: status and JSON body."""

    status: int
    body: dict[str, Any] | None
    replayed: bool = False
    etag: int | None = None


@dataclass(frozen=True, slots=True)
class IdemRecord:
    """A recorded idempotent outcome still live on the store clock: whoever loads one
    filters by expiry, so :func:`sbus.core.idempotency.replay` never needs the time."""

    fingerprint: str
    status: int
    body: dict[str, Any] | None
    etag: int | None


@dataclass(frozen=True, slots=True)
class Counters:
    total_commits: int = 0
    total_conflicts: int = 0
    cross_shard_stale: int = 0
    view_checked_commits: int = 0
    view_divergent_commits: int = 0


@dataclass(frozen=True, slots=True)
class StoreStats:
    counters: Counters
    total_shards: int
    dl_agents: int
    dl_deliveries: int
    ori_enabled: bool


@dataclass(frozen=True, slots=True)
class RegisterResult:
    registered: int
    skipped_existing: list[str]
    skipped_no_shard: list[str]


@dataclass(frozen=True, slots=True)
class Revocation:
    """What the store knows of a token id, read atomically with its clock: ``until_ms``
    is the revocation list's deadline for it (None: never listed, or purged)."""

    now_ms: int
    until_ms: int | None

    @property
    def revoked(self) -> bool:
        return self.until_ms is not None and self.until_ms > self.now_ms


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A per-agent token bucket: ``per_ms`` tokens refill each millisecond, up to
    ``burst``; each state-changing request takes one."""

    per_ms: float
    burst: int

    @classmethod
    def parse(cls, spec: str) -> RateLimit | None:
        """``""`` (off), ``RATE/UNIT`` or ``RATE/UNIT,BURST``: ``50/s``, ``600/m,100``.
        UNIT is s, m or h; BURST defaults to RATE. Raises ValueError."""
        spec = spec.strip()
        if not spec:
            return None
        rate_part, _, burst_part = spec.partition(",")
        count, _, unit = rate_part.partition("/")
        seconds = {"s": 1, "m": 60, "h": 3600}.get(unit.strip() or "s")
        if seconds is None or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"SBUS_RATE_LIMIT {spec!r}: expected RATE/UNIT[,BURST], e.g. 50/s")
        burst = int(burst_part) if burst_part.strip() else int(count)
        if burst < 1:
            raise ValueError(f"SBUS_RATE_LIMIT {spec!r}: BURST must be at least 1")
        return cls(per_ms=int(count) / (seconds * 1000), burst=burst)


@dataclass(frozen=True, slots=True)
class Limits:
    """The knobs the atomic step needs; copied from Settings once at start-up."""

    session_ttl_ms: int = 3_600_000
    max_dl_entries: int = 16384
    history_depth: int = 1000
    history_max_bytes: int = 16 * 1024 * 1024
    idempotency_ttl_ms: int = 86_400_000
    audit_ttl_ms: int = 30 * 86_400_000  # 0 = entries kept whatever their age
    audit_max_rows: int = 100_000
    change_retention_ms: int = 3_600_000  # the change log, by age (SBUS_WATCH_RETENTION)
    change_max: int = 1_000_000  # and by count (SBUS_WATCH_MAX_CHANGES)
    conflict_ring: int = 1000  # conflicts kept for ?include=conflicts (SBUS_WATCH_CONFLICTS)
