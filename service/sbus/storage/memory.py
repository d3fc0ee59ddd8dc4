"""The in-process store: the executable reference model of the Store Protocol.

Every method runs to completion without awaiting, so on one event loop each is a
single critical section: that is the whole atomicity argument. One worker only.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from sbus.core import rules
from sbus.core.clock import MAX_OFFSET_MS, advanced_offset, wall_ms
from sbus.core.errors import (
    IdempotencyKeyReused,
    ShardAlreadyExists,
    ShardDeleted,
    ShardNotFound,
    ValidationFailed,
)
from sbus.core.types import (
    Counters,
    CreateOp,
    DLDump,
    DLEntry,
    HistoryEntry,
    IdemRecord,
    Limits,
    Outcome,
    RateLimit,
    RegisterResult,
    Revocation,
    SessionView,
    Shard,
    StoreStats,
    Txn,
)

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
        self._idem: dict[tuple[str, str], IdemRecord] = {}
        self._consumed: dict[str, int] = {}  # mandate jti -> retained until (ms)
        self._revoked: dict[str, int] = {}  # token jti -> listed until (ms)
        self._buckets: dict[str, tuple[float, int]] = {}  # agent -> (tokens, updated ms)
        self._ori = True
        self._offset_ms = 0
        self._secret: bytes | None = None  # open mode's signing secret, for this process
        self.limits = limits or Limits()

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
    def _append_history(self, entry: HistoryEntry, limits: Limits) -> int:
        """Append and trim by depth and bytes; returns the retained depth (version != 0)."""
        entries = self._history.setdefault(entry.key, deque())
        entries.append(entry)
        size = self._history_bytes.get(entry.key, 0) + rules.entry_bytes(entry)
        while len(entries) > 1 and (
            len(entries) > limits.history_depth or size > limits.history_max_bytes
        ):
            size -= rules.entry_bytes(entries.popleft())
        self._history_bytes[entry.key] = size
        return len(entries) - (1 if entries[0].version == 0 else 0)

    def _idem_check(self, txn_idem: Any, now: int) -> Outcome | None:
        if txn_idem is None:
            return None
        record = self._idem.get((txn_idem.agent_id, txn_idem.key))
        if record is None or record.expires_ms <= now:
            return None
        if record.fingerprint != txn_idem.fingerprint:
            raise IdempotencyKeyReused()
        return Outcome(record.status, record.body, replayed=True, etag=record.etag)

    def _idem_store(self, txn_idem: Any, outcome: Outcome, now: int, limits: Limits) -> None:
        if txn_idem is not None:
            self._idem[(txn_idem.agent_id, txn_idem.key)] = IdemRecord(
                txn_idem.fingerprint,
                outcome.status,
                outcome.body,
                outcome.etag,
                now + limits.idempotency_ttl_ms,
            )

    async def create(self, op: CreateOp) -> Outcome:
        now = self._now()
        replay = self._idem_check(op.idem, now)
        if replay is not None:
            return replay
        existing = self._shards.get(op.key)
        if existing is not None and not existing.deleted:
            raise ShardAlreadyExists(op.key)
        shard = self._create(op, existing, now)
        outcome = rules.render_create(shard)
        self._idem_store(op.idem, outcome, now, self.limits)
        return outcome

    def _create(self, op: CreateOp, existing: Shard | None, now: int) -> Shard:
        shard, entry = rules.create_shard(op, existing, now)
        depth = self._append_history(entry, self.limits)
        shard = shard._replace(history_depth=depth)
        self._shards[op.key] = shard
        return shard

    async def admin_create(self, op: CreateOp) -> Shard | None:
        existing = self._shards.get(op.key)
        if existing is not None and not existing.deleted:
            return None
        return self._create(op, existing, self._now())

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
        limits = self.limits
        now = self._now()
        replay = self._idem_check(txn.idem, now)
        if replay is not None:
            return replay
        view = self._sessions.get((txn.agent_id, txn.session_id)) or SessionView()
        sources = {
            w.key: self._version_entry(w.key, w.target_version)
            for w in txn.writes
            if w.kind == "rollback"
        }
        fx = rules.decide(
            txn,
            self._shards,  # decide only looks keys up; no copy on the hot path
            view,
            ori_enabled=self._ori,
            now_ms=now,
            ttl_ms=limits.session_ttl_ms,
            rollback_sources=sources,
            mandate_consumed=(
                txn.mandate is not None and self._consumed.get(txn.mandate.jti, 0) > now
            ),
        )
        counters = self._counters
        for name, delta in fx.counters.items():
            counters[name] = counters.get(name, 0) + delta
        if fx.error is not None:
            for key, (attempts, conflicts) in fx.bumps.items():
                old = self._shards[key]
                self._shards[key] = old._replace(
                    attempt_count=old.attempt_count + attempts,
                    conflict_count=old.conflict_count + conflicts,
                )
            raise fx.error
        post: dict[str, Shard] = {}
        for shard, entry in zip(fx.shards, fx.history, strict=True):
            depth = self._append_history(entry, limits)
            if depth != shard.history_depth:
                # Positional rebuild: NamedTuple._replace costs several times more.
                shard = Shard(*shard[:-1], depth)
            self._shards[shard.key] = shard
            post[shard.key] = shard
        session = self._session(txn.agent_id, txn.session_id)
        if fx.session != "live":
            session.entries.clear()  # expired or purged entries go; RYW entries start it
        session.entries.update(fx.dl_writes)
        session.last_served_ms = now
        if fx.consume is not None:
            self._consumed[fx.consume.jti] = fx.consume.retain_until_ms
        outcome = rules.render(txn, post)
        self._idem_store(txn.idem, outcome, now, limits)
        return outcome

    def _version_entry(self, key: str, version: int) -> HistoryEntry | None:
        for entry in self._history.get(key, ()):
            if entry.version == version:
                return entry
        return None

    async def idempotent(self, agent_id: str, key: str) -> IdemRecord | None:
        record = self._idem.get((agent_id, key))
        if record is None or record.expires_ms <= self._now():
            return None
        return record

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
            raise ValidationFailed(f"stale_version must be between 0 and {shard.version}", key=key)
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
        for ikey, record in list(self._idem.items()):
            if record.expires_ms <= now:
                del self._idem[ikey]
                gone += 1
        for table in (self._consumed, self._revoked):
            for jti, until in list(table.items()):
                if until <= now:
                    del table[jti]
                    gone += 1
        return gone

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
