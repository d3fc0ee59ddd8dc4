"""The in-process store: the executable reference model of the Store Protocol.

Every method runs to completion without awaiting, so on one event loop each is a
single critical section: that is the whole atomicity argument. One worker only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping

from sbus.core import audit, commit, rules
from sbus.core.audit import AuditEntry, AuditEvent
from sbus.core.changes import (
    Change,
    ChangeEvent,
    ChangePage,
    Conflict,
    ConflictEvent,
    ConflictPage,
    CursorExpired,
)
from sbus.core.clock import MAX_OFFSET_MS, advanced_offset, wall_ms
from sbus.core.errors import ShardDeleted, ShardNotFound, ValidationFailed
from sbus.core.types import (
    Counters,
    CreateOp,
    DLDump,
    DLEntry,
    HistoryEntry,
    IdemRecord,
    Limits,
    MandateRef,
    Outcome,
    RateLimit,
    RegisterResult,
    Revocation,
    SessionView,
    Shard,
    StoreStats,
    Txn,
)
from sbus.storage.inprocess_log import SeqLog

SessionKey = tuple[str, str]


class MemoryStore:
    backend = "memory"
    durable = False

    def __init__(self, limits: Limits | None = None) -> None:
        self._shards: dict[str, Shard] = {}
        self._history: dict[str, deque[HistoryEntry]] = {}
        self._history_bytes: dict[str, int] = {}
        self._sessions: dict[SessionKey, SessionView] = {}
        self._counters: dict[str, int] = {}
        # (agent, Idempotency-Key) -> (record, expiry ms)
        self._idem: dict[tuple[str, str], tuple[IdemRecord, int]] = {}
        self._consumed: dict[str, int] = {}  # mandate jti -> retained until (ms)
        self._revoked: dict[str, int] = {}  # token jti -> listed until (ms)
        self._buckets: dict[str, tuple[float, int]] = {}  # agent -> (tokens, updated ms)
        self._ori = True
        self._offset_ms = 0
        self._secret: bytes | None = None  # open mode's signing secret, for this process
        self._audit = _AuditLog()  # kept by reset_all
        self.limits = limits or Limits()
        self._changes: SeqLog[Change] = SeqLog()
        self._conflicts: SeqLog[Conflict] = SeqLog(max(1, self.limits.conflict_ring))
        self._section = _Section(self)

    # lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def check(self) -> None:
        return None  # nothing outside this process can change

    def _now(self) -> int:
        return wall_ms() + self._offset_ms

    async def now_ms(self) -> int:
        return self._now()

    async def advance_clock(self, ms: int, cap_ms: int = MAX_OFFSET_MS) -> int:
        self._offset_ms = advanced_offset(self._offset_ms, ms, cap_ms)
        return self._offset_ms

    # shards --------------------------------------------------------------------
    async def create(self, op: CreateOp) -> Outcome:
        return commit.create(self._section, op, now_ms=self._now(), limits=self.limits)

    async def admin_create(self, op: CreateOp) -> Shard | None:
        return commit.create_row(self._section, op, now_ms=self._now())

    def _session(self, agent_id: str, session_id: str) -> SessionView:
        view = self._sessions.get((agent_id, session_id))
        if view is None:
            view = self._sessions[(agent_id, session_id)] = SessionView()
        return view

    def _record(self, view: SessionView, key: str, version: int, now: int) -> bool:
        """Apply a recorded read to the session; False when it was not recorded."""
        plan = rules.record_read(
            view,
            key,
            version,
            now_ms=now,
            ttl_ms=self.limits.session_ttl_ms,
            max_entries=self.limits.max_dl_entries,
        )
        return plan in ("record", "restart")

    async def read(self, key: str, agent_id: str | None, session_id: str, record: bool) -> Shard:
        shard = self._shards.get(key)
        if shard is None:
            raise ShardNotFound(key)
        if agent_id is not None and record:
            self._record(self._session(agent_id, session_id), key, shard.version, self._now())
        if shard.deleted:
            raise ShardDeleted(key, shard.version)
        return shard

    async def read_many(
        self, keys: list[str], agent_id: str | None, session_id: str, record: bool
    ) -> dict[str, Shard]:
        found = {k: shard for k in keys if (shard := self._shards.get(k)) is not None}
        if found and agent_id is not None and record:
            rules.record_reads(
                self._session(agent_id, session_id),
                ((k, s.version) for k, s in found.items()),
                now_ms=self._now(),
                ttl_ms=self.limits.session_ttl_ms,
                max_entries=self.limits.max_dl_entries,
            )
        return found

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[str]:
        keys = sorted(
            k
            for k, s in self._shards.items()
            if not s.deleted and k.startswith(prefix) and (after is None or k > after)
        )
        return keys[:limit]

    # the commit protocol ---------------------------------------------------------
    async def apply(self, txn: Txn) -> Outcome:
        return commit.apply(
            self._section, txn, now_ms=self._now(), ori_enabled=self._ori, limits=self.limits
        )

    async def idempotent(self, agent_id: str, key: str) -> IdemRecord | None:
        return self._section.idem_record(agent_id, key, self._now())

    # delivery log ------------------------------------------------------------------
    async def reset_session(self, agent_id: str, session_id: str) -> None:
        self._sessions.pop((agent_id, session_id), None)

    async def register(self, agent_id: str, session_id: str, keys: list[str]) -> RegisterResult:
        limits = self.limits
        now = self._now()
        view = self._session(agent_id, session_id)
        live, _ = rules.begin_register(view, now, limits.session_ttl_ms)
        registered = 0
        existing: list[str] = []
        missing: list[str] = []
        for key in keys:
            shard = self._shards.get(key)
            if key in live:
                existing.append(key)
            elif shard is None or shard.deleted:
                missing.append(key)
            elif self._record(view, key, shard.version, now):
                registered += 1
        return RegisterResult(registered, existing, missing)

    async def inject_stale(self, agent_id: str, session_id: str, key: str, version: int) -> None:
        shard = self._shards.get(key)
        if shard is None or shard.deleted:
            raise ShardNotFound(key)
        if version > shard.version:
            raise ValidationFailed.past_current_version(key, shard.version)
        now = self._now()
        view = self._session(agent_id, session_id)
        if rules.session_state(view, now, self.limits.session_ttl_ms) not in ("live", "overflowed"):
            view.entries.clear()
        view.entries[key] = DLEntry(version, now)
        view.last_served_ms = now

    async def dump_delivery_log(self, after: str | None, limit: int) -> tuple[DLDump, str | None]:
        ttl_ms = self.limits.session_ttl_ms
        now = self._now()
        out: DLDump = {}
        for (agent, session), view in sorted(self._sessions.items()):
            if after is not None and agent <= after:
                continue
            live = rules.live_entries(view, now, ttl_ms)
            if not live:
                continue
            if agent not in out and len(out) >= limit:
                return out, max(out)
            out.setdefault(agent, {})[session] = {
                k: {"version": e.version, "age_secs": (now - e.served_ms) / 1000}
                for k, e in sorted(live.items())
            }
        return out, None

    async def open_mode_secret(self, candidate: bytes) -> bytes:
        if self._secret is None:
            self._secret = candidate
        return self._secret

    async def purge(self) -> int:
        """Drop expired DL entries, purged sessions and expired idempotency records."""
        ttl = self.limits.session_ttl_ms
        now = self._now()
        gone = 0
        for skey, view in list(self._sessions.items()):
            if ttl > 0:
                live = rules.live_entries(view, now, ttl)
                gone += len(view.entries) - len(live)
                view.entries = dict(live)
            if rules.session_state(view, now, ttl) == "empty" and not view.entries:
                del self._sessions[skey]
                gone += 1
        for ikey, (_, expires) in list(self._idem.items()):
            if expires <= now:
                del self._idem[ikey]
                gone += 1
        for table in (self._consumed, self._revoked):
            for jti, until in list(table.items()):
                if until <= now:
                    del table[jti]
                    gone += 1
        limits = self.limits
        gone += self._trim_changes(now)
        return gone + self._audit.purge(
            audit.retention_cutoff(now, limits.audit_ttl_ms), limits.audit_max_rows
        )

    async def audit(self, event: AuditEvent) -> None:
        self._audit.write(event, self._now())

    async def audit_log(self, after: int | None, limit: int) -> list[AuditEntry]:
        return self._audit.page(after, limit)

    def _trim_changes(self, now: int) -> int:
        log, limits = self._changes, self.limits
        cutoff = now - limits.change_retention_ms
        gone = 0
        while (oldest := log.oldest()) is not None and (
            len(log) > limits.change_max or oldest.committed_ms < cutoff
        ):
            log.drop_oldest()
            gone += 1
        return gone

    # the change log ------------------------------------------------------------------
    async def change_head(self) -> str:
        return self._changes.head()

    async def changes_after(self, cursor: str, prefix: str, limit: int) -> ChangePage:
        log = self._changes
        seq = log.position(cursor)
        if seq + 1 < log.first:
            raise CursorExpired(cursor)
        found = log.after(seq, limit)
        events = [ChangeEvent(ch, log.cursor(n)) for n, ch in found if ch.key.startswith(prefix)]
        return ChangePage(events, log.cursor(found[-1][0]) if found else cursor)

    async def record_conflict(self, conflict: Conflict) -> None:
        self._conflicts.append(conflict)

    async def conflict_head(self) -> str:
        return self._conflicts.head()

    async def conflicts_after(self, cursor: str, limit: int) -> ConflictPage:
        ring = self._conflicts
        try:
            seq = ring.position(cursor)
        except CursorExpired:
            seq = 0  # another process's ring: everything this one holds is new
        found = ring.after(seq, limit)
        events = [ConflictEvent(c, ring.cursor(n)) for n, c in found]
        return ConflictPage(events, ring.cursor(found[-1][0]) if found else ring.cursor(seq))

    async def take_token(self, agent_id: str, rate: RateLimit) -> int:
        now = self._now()
        tokens, updated = self._buckets.get(agent_id, (None, None))
        left, wait = rules.bucket_take(tokens, updated, now, rate)
        self._buckets[agent_id] = (left, now)
        return wait

    async def revoke(self, jti: str, until_ms: int) -> None:
        self._revoked[jti] = max(until_ms, self._revoked.get(jti, 0))

    async def revocation(self, jti: str) -> Revocation:
        return Revocation(self._now(), self._revoked.get(jti))

    # history, counters, admin --------------------------------------------------------
    async def history(self, key: str, before: int | None, limit: int) -> list[HistoryEntry]:
        if key not in self._shards:
            raise ShardNotFound(key)
        entries = [
            e for e in reversed(self._history.get(key, ())) if before is None or e.version < before
        ]
        return entries[:limit]

    async def stats(self) -> StoreStats:
        ttl_ms = self.limits.session_ttl_ms
        now = self._now()
        agents: set[str] = set()
        deliveries = 0
        for (agent, _), view in self._sessions.items():
            live = rules.live_entries(view, now, ttl_ms)
            if live:
                agents.add(agent)
                deliveries += len(live)
        counters = Counters(**{k: self._counters.get(k, 0) for k in Counters.__dataclass_fields__})
        total = sum(1 for s in self._shards.values() if not s.deleted)
        return StoreStats(counters, total, len(agents), deliveries, self._ori)

    async def set_ori(self, enabled: bool) -> None:
        self._ori = enabled

    async def reset_all(self) -> int:
        cleared = len(self._shards)
        self._shards.clear()
        self._history.clear()
        self._history_bytes.clear()
        self._sessions.clear()
        self._counters.clear()
        self._idem.clear()
        self._consumed.clear()  # revocations survive a reset (protocol.md §2.9)
        self._buckets.clear()
        self._offset_ms = 0
        return cleared


class _Section:
    """The commit skeleton's port (:class:`sbus.core.commit.Section`) over the store's
    dictionaries. Built once: the store clears its dictionaries, never replaces them."""

    __slots__ = ("_store",)

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    def idem_record(self, agent_id: str, key: str, now_ms: int) -> IdemRecord | None:
        found = self._store._idem.get((agent_id, key))
        if found is None or found[1] <= now_ms:
            return None
        return found[0]

    def put_idem(
        self, agent_id: str, key: str, record: IdemRecord, now_ms: int, expires_ms: int
    ) -> None:
        self._store._idem[(agent_id, key)] = (record, expires_ms)

    def session(self, agent_id: str, session_id: str) -> SessionView:
        return self._store._sessions.get((agent_id, session_id)) or SessionView()

    def rows(self, keys: Collection[str]) -> Mapping[str, Shard | None]:
        return self._store._shards  # decide only looks keys up: no copy on the hot path

    def history_entry(self, key: str, version: int) -> HistoryEntry | None:
        for entry in self._store._history.get(key, ()):
            if entry.version == version:
                return entry
        return None

    def mandate_consumed(self, jti: str, now_ms: int) -> bool:
        return self._store._consumed.get(jti, 0) > now_ms

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        counters = self._store._counters
        for name, delta in deltas.items():
            counters[name] = counters.get(name, 0) + delta

    def bump(self, key: str, attempts: int, conflicts: int) -> None:
        shards = self._store._shards
        old = shards[key]
        shards[key] = old._replace(
            attempt_count=old.attempt_count + attempts,
            conflict_count=old.conflict_count + conflicts,
        )

    def write_shard(self, shard: Shard, entry: HistoryEntry) -> Shard:
        store = self._store
        limits = store.limits
        entries = store._history.setdefault(entry.key, deque())
        entries.append(entry)
        size = store._history_bytes.get(entry.key, 0) + rules.entry_bytes(entry)
        while len(entries) > 1 and (
            len(entries) > limits.history_depth or size > limits.history_max_bytes
        ):
            size -= rules.entry_bytes(entries.popleft())
        store._history_bytes[entry.key] = size
        depth = len(entries) - (1 if entries[0].version == 0 else 0)
        if depth != shard.history_depth:
            # Positional rebuild: NamedTuple._replace costs several times more.
            shard = Shard(*shard[:-1], depth)
        store._shards[shard.key] = shard
        return shard

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
        session = self._store._session(agent_id, session_id)
        if restart:
            session.entries.clear()
        session.entries.update(entries)
        session.last_served_ms = now_ms

    def consume(self, mandate: MandateRef) -> None:
        self._store._consumed[mandate.jti] = mandate.retain_until_ms

    def audit(self, event: AuditEvent, now_ms: int) -> None:
        self._store._audit.write(event, now_ms)

    def log_change(self, change: Change) -> None:
        self._store._changes.append(change)


class _AuditLog:
    """The audit log in insertion (= id) order, and the aggregated entries by group key."""

    __slots__ = ("_entries", "_groups", "_last_id")

    def __init__(self) -> None:
        self._entries: dict[int, AuditEntry] = {}
        self._groups: dict[str, int] = {}  # group key -> entry id
        self._last_id = 0

    def write(self, event: AuditEvent, now_ms: int) -> None:
        key = None if event.group is None else audit.group_key(event.group, now_ms)
        if key is not None and key in self._groups:
            found = self._entries[self._groups[key]]
            self._entries[found.id] = found._replace(events=found.events + 1)
            return
        self._last_id += 1
        entry = AuditEntry(self._last_id, now_ms, event.kind, event.agent, dict(event.details))
        self._entries[entry.id] = entry
        if key is not None:
            self._groups[key] = entry.id

    def page(self, after: int | None, limit: int) -> list[AuditEntry]:
        out: list[AuditEntry] = []
        for entry_id, entry in self._entries.items():
            if after is None or entry_id > after:
                out.append(entry)
                if len(out) == limit:
                    break
        return out

    def purge(self, cutoff: int | None, max_rows: int) -> int:
        gone = [
            entry_id
            for n, (entry_id, entry) in enumerate(self._entries.items())
            if (cutoff is not None and entry.at <= cutoff) or n < len(self._entries) - max_rows
        ]
        for entry_id in gone:
            del self._entries[entry_id]
        if gone:
            dropped = set(gone)
            self._groups = {k: i for k, i in self._groups.items() if i not in dropped}
        return len(gone)
