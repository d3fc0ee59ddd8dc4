"""A small, pure reference model of protocol.md §§1, 2 and 4 (shards, DeliveryLog,
sessions, the commit protocol and its counters).

Written from protocol.md alone and deliberately NOT from ``sbus.core.rules``: the lockstep
test checks the service against this independent reading. Every method takes the
model's own idea of "now" (integer milliseconds on the store clock) and answers a
:class:`Reply` holding the status and the JSON fields that must match exactly.
Where protocol.md left a choice open, the comment tagged ``AMBIGUITY`` says which way
the model goes and why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

SessionState = Literal["empty", "live", "expired", "overflowed"]
WriteKind = Literal["commit", "create", "delete", "rollback"]


class Reply(NamedTuple):
    """A predicted response: status, and the body fields that must match exactly.

    For a problem response ``body`` holds ``error`` plus the structured fields; the
    generic RFC 9457 members (type, title, status, detail) are not predicted.
    """

    status: int
    body: dict[str, Any] | None


class Write(NamedTuple):
    key: str
    expected: int | None  # None: unconditional (rollback without expected_version), or a create
    kind: WriteKind
    content: str = ""
    target_version: int = 0
    goal_tag: str = ""  # a create's


class HistEntry(NamedTuple):
    version: int
    content: str
    deleted: bool


@dataclass
class ShardState:
    key: str
    id: str
    content: str
    version: int
    goal_tag: str = ""
    deleted: bool = False
    attempt_count: int = 0
    conflict_count: int = 0
    history: list[HistEntry] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        """ShardResponse without timestamps."""
        return {
            "key": self.key,
            "id": self.id,
            "version": self.version,
            "content": self.content,
            "owner": None,
            "goal_tag": self.goal_tag,
            "attempt_count": self.attempt_count,
            "conflict_count": self.conflict_count,
            "delta_log_depth": sum(1 for h in self.history if h.version != 0),
            "policy": {"require_mandate": False},
        }


@dataclass
class Session:
    entries: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (version, served)
    overflowed: bool = False
    last_served_ms: int | None = None


@dataclass
class Counters:
    total_commits: int = 0
    total_conflicts: int = 0
    cross_shard_stale: int = 0
    view_checked_commits: int = 0
    view_divergent_commits: int = 0


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def problem(status: int, code: str, **fields: Any) -> Reply:
    return Reply(status, {"error": code, **fields})


@dataclass
class Model:
    ttl_ms: int
    max_entries: int
    now_ms: int = 0
    ori: bool = True
    shards: dict[str, ShardState] = field(default_factory=dict)
    sessions: dict[tuple[str, str], Session] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)

    # clock and sessions -------------------------------------------------------------
    def advance(self, ms: int) -> None:
        self.now_ms += ms

    def is_live(self, served_ms: int) -> bool:
        # protocol.md §1: live while served_at > now - TTL; TTL 0 = never expires.
        return self.ttl_ms == 0 or served_ms > self.now_ms - self.ttl_ms

    def live_entries(self, agent: str, session: str) -> dict[str, int]:
        s = self.sessions.get((agent, session))
        if s is None:
            return {}
        return {k: v for k, (v, served) in s.entries.items() if self.is_live(served)}

    def session_state(self, agent: str, session: str) -> SessionState:
        s = self.sessions.get((agent, session))
        if s is None:
            return "empty"
        if s.overflowed:
            # AMBIGUITY: overflow wins over expiry; it is sticky until POST /session, so
            # an overflowed session whose entries have all expired is still overflowed.
            return "overflowed"
        if any(self.is_live(served) for _, served in s.entries.values()):
            return "live"
        # Entries are purged when they expire (last_served + TTL); the marker keeps the
        # session expired for one more TTL after that.
        if s.last_served_ms is not None and self.now_ms - s.last_served_ms < 2 * self.ttl_ms:
            return "expired"
        return "empty"

    def _fresh_if_needed(self, agent: str, session: str) -> Session:
        """A GET or register on an expired (or empty) session starts it afresh."""
        state = self.session_state(agent, session)
        if state in ("empty", "expired"):
            self.sessions[(agent, session)] = Session()
        s = self.sessions[(agent, session)]
        # Expired entries are invisible; dropping them keeps the cap count simple.
        s.entries = {k: e for k, e in s.entries.items() if self.is_live(e[1])}
        return s

    def _record(self, s: Session, key: str, version: int) -> bool:
        if s.overflowed:
            return False  # AMBIGUITY: once overflowed, no further read is recorded
        if key not in s.entries and len(s.entries) >= self.max_entries:
            s.overflowed = True
            return False
        s.entries[key] = (version, self.now_ms)
        s.last_served_ms = self.now_ms
        return True

    def reset_session(self, agent: str, session: str) -> Reply:
        self.sessions.pop((agent, session), None)
        return Reply(200, {"agent_id": agent, "status": "created"})

    # shards ---------------------------------------------------------------------------
    def create(self, key: str, content: str) -> Reply:
        old = self.shards.get(key)
        if old is not None and not old.deleted:
            return problem(409, "ShardAlreadyExists", key=key)
        return Reply(201, self._created(key, content, "").body())

    def _created(self, key: str, content: str, goal_tag: str) -> ShardState:
        """Version 0, or tombstone + 1 continuing its history (protocol.md §1.4)."""
        old = self.shards.get(key)
        version = 0 if old is None else old.version + 1
        history = [] if old is None else old.history
        shard = ShardState(
            key, sha256_hex(content), content, version, goal_tag=goal_tag, history=history
        )
        shard.history.append(HistEntry(version, content, False))
        self.shards[key] = shard
        return shard

    def read(self, agent: str | None, session: str, key: str, record: bool) -> Reply:
        shard = self.shards.get(key)
        if shard is None:
            return problem(404, "ShardNotFound", key=key)
        if agent is not None and record:
            self._record(self._fresh_if_needed(agent, session), key, shard.version)
        if shard.deleted:
            return problem(404, "ShardDeleted", key=key, version=shard.version)
        return Reply(200, shard.body())

    def read_many(self, agent: str | None, session: str, keys: list[str], record: bool) -> Reply:
        """POST /read: the same GETs one after the other, answered together."""
        shards: list[dict[str, Any]] = []
        missing: list[dict[str, Any]] = []
        for key in keys:
            one = self.read(agent, session, key, record)
            assert one.body is not None
            if one.status == 200:
                shards.append(one.body)
            else:
                missing.append(one.body | {"key": key})
        return Reply(200, {"shards": shards, "missing": missing})

    def register(self, agent: str, session: str, keys: list[str]) -> Reply:
        s = self._fresh_if_needed(agent, session)
        live = self.live_entries(agent, session)
        registered = 0
        existing: list[str] = []
        missing: list[str] = []
        for key in dict.fromkeys(keys):
            shard = self.shards.get(key)
            if key in live:
                existing.append(key)
            elif shard is None or shard.deleted:
                missing.append(key)
            elif self._record(s, key, shard.version):
                registered += 1
        return Reply(
            200,
            {
                "ok": True,
                "registered": registered,
                "skipped_existing": existing,
                "skipped_no_shard": missing,
            },
        )

    def set_ori(self, enabled: bool) -> Reply:
        self.ori = enabled
        return Reply(
            200,
            {
                "ok": True,
                "ori_enabled": enabled,
                "view_checked_commits": self.counters.view_checked_commits,
                "view_divergent_commits": self.counters.view_divergent_commits,
            },
        )

    # the commit protocol (protocol.md §4, step 9) ---------------------------------------------
    def effective_read_set(
        self, agent: str, session: str, writes: list[Write], read_set: list[tuple[str, int]]
    ) -> list[tuple[str, int]]:
        """Explicit entries plus live DL entries, sorted, without the written keys that
        an expected version guards, or a create's condition that the key is not live
        (protocol.md §3.1): an unconditional rollback rests on its caller's read of the
        key it rolls back like on any other read."""
        written = {w.key for w in writes if w.expected is not None or w.kind == "create"}
        pairs = set(read_set)
        if self.session_state(agent, session) == "live":
            pairs |= set(self.live_entries(agent, session).items())
        return sorted(p for p in pairs if p[0] not in written)

    def _transact(
        self, agent: str, session: str, writes: list[Write], read_set: list[tuple[str, int]]
    ) -> Reply | dict[str, ShardState]:
        """Steps 9b-9g. Returns a problem Reply, or the post-commit shards by key."""
        state = self.session_state(agent, session)
        # AMBIGUITY: SessionExpired also names the agent (protocol.md only lists reason).
        if state == "expired":
            return problem(410, "SessionExpired", reason="ttl", agent_id=agent)
        if state == "overflowed":
            return problem(410, "SessionExpired", reason="overflow", agent_id=agent)
        effective = self.effective_read_set(agent, session, writes, read_set)
        for key, _ in effective:
            if key not in self.shards:
                return problem(404, "ShardNotFound", key=key)
        stale = [
            {"key": k, "version_at_read": v, "current_version": self.shards[k].version}
            for k, v in effective
            if self.shards[k].version != v
        ]
        if effective:
            self.counters.view_checked_commits += 1
            if stale:
                self.counters.view_divergent_commits += 1
        if stale and self.ori:
            self.counters.cross_shard_stale += 1
            return problem(409, "CrossShardStale", **stale[0], stale_keys=stale)
        checked: list[ShardState] = []
        for w in sorted(writes, key=lambda w: w.key):
            shard = self.shards.get(w.key)
            if w.kind == "create":
                # protocol.md §3.1: as POST /shard, a live key refuses, and a create
                # has no version to check, so it counts no attempt.
                if shard is not None and not shard.deleted:
                    return problem(409, "ShardAlreadyExists", key=w.key)
                continue
            if shard is None:
                return problem(404, "ShardNotFound", key=w.key)
            if shard.deleted:
                return problem(404, "ShardDeleted", key=w.key, version=shard.version)
            shard.attempt_count += 1
            checked.append(shard)
            if w.expected is not None and shard.version != w.expected:
                shard.conflict_count += 1
                self.counters.total_conflicts += 1
                return problem(
                    409, "VersionMismatch", key=w.key, expected=w.expected, found=shard.version
                )
            # AMBIGUITY: the rollback target is checked after the version guard (its
            # attempt already counted); a tombstone is not a retained version; the
            # problem names the field target_version.
            if w.kind == "rollback" and self._retained(shard, w.target_version) is None:
                return problem(404, "VersionNotFound", key=w.key, target_version=w.target_version)
        post: dict[str, ShardState] = {}
        for w in writes:
            if w.kind == "create":
                post[w.key] = self._created(w.key, w.content, w.goal_tag)
                continue
            shard = self.shards[w.key]
            shard.version += 1
            if w.kind == "delete":
                shard.deleted = True
            elif w.kind == "rollback":
                source = self._retained(shard, w.target_version)
                assert source is not None
                shard.content = source.content
            else:
                shard.content = w.content
            shard.history.append(HistEntry(shard.version, shard.content, shard.deleted))
            post[w.key] = shard
        self.counters.total_commits += 1
        # Read-your-writes: the committer's DL holds every written key at its new version.
        # AMBIGUITY: these entries ignore SBUS_MAX_DL_ENTRIES (a multi-commit may leave
        # more entries than the cap); only a GET or register can overflow a session.
        s = self.sessions.get((agent, session))
        if s is None or state != "live":
            s = self.sessions[(agent, session)] = Session()
        for key, shard in post.items():
            s.entries[key] = (shard.version, self.now_ms)
        s.last_served_ms = self.now_ms
        return post

    @staticmethod
    def _retained(shard: ShardState, version: int) -> HistEntry | None:
        for h in shard.history:
            if h.version == version and not h.deleted:
                return h
        return None

    def commit(
        self,
        agent: str,
        session: str,
        key: str,
        expected: int,
        content: str,
        read_set: list[tuple[str, int]],
    ) -> Reply:
        out = self._transact(agent, session, [Write(key, expected, "commit", content)], read_set)
        if isinstance(out, Reply):
            return out
        shard = out[key]
        return Reply(200, {"new_version": shard.version, "shard_id": shard.id})

    def multi(
        self, agent: str, session: str, writes: list[Write], read_set: list[tuple[str, int]]
    ) -> Reply:
        """Commits, creates and deletes (protocol.md §3.1); each result names its op."""
        out = self._transact(agent, session, writes, read_set)
        if isinstance(out, Reply):
            return out
        results = [{"key": w.key, "new_version": out[w.key].version, "op": w.kind} for w in writes]
        return Reply(200, {"results": results})

    def rollback(
        self,
        agent: str,
        session: str,
        key: str,
        target: int,
        expected: int | None,
        read_set: list[tuple[str, int]],
    ) -> Reply:
        op = Write(key, expected, "rollback", target_version=target)
        out = self._transact(agent, session, [op], read_set)
        if isinstance(out, Reply):
            return out
        return Reply(200, out[key].body())

    def delete(self, agent: str, session: str, key: str, expected: int) -> Reply:
        out = self._transact(agent, session, [Write(key, expected, "delete")], [])
        if isinstance(out, Reply):
            return out
        return Reply(204, None)

    # observation ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.counters
        attempts = c.total_commits + c.total_conflicts
        agents: set[str] = set()
        deliveries = 0
        for agent, session in self.sessions:
            live = self.live_entries(agent, session)
            if live:
                agents.add(agent)
                deliveries += len(live)
        return {
            "total_shards": sum(1 for s in self.shards.values() if not s.deleted),
            "total_commits": c.total_commits,
            "total_conflicts": c.total_conflicts,
            "cross_shard_stale": c.cross_shard_stale,
            "view_divergent_commits": c.view_divergent_commits,
            "view_checked_commits": c.view_checked_commits,
            "view_divergence_rate": (
                c.view_divergent_commits / c.view_checked_commits if c.view_checked_commits else 0.0
            ),
            "ori_enabled": self.ori,
            "total_attempts": attempts,
            "scr": c.total_conflicts / attempts if attempts else 0.0,
            "delivery_log": {"agents": len(agents), "deliveries": deliveries},
        }

    def delivery_log(self) -> dict[str, Any]:
        """GET /admin/delivery-log (one page): live entries only."""
        sessions: dict[str, dict[str, dict[str, Any]]] = {}
        for (agent, session), s in sorted(self.sessions.items()):
            live = {k: e for k, e in sorted(s.entries.items()) if self.is_live(e[1])}
            if live:
                sessions.setdefault(agent, {})[session] = {
                    k: {"version": v, "age_secs": (self.now_ms - served) / 1000}
                    for k, (v, served) in live.items()
                }
        return {
            "agents": {a: by[""] for a, by in sessions.items() if "" in by},
            "sessions": sessions,
            "total_agents": len(sessions),
            "total_deliveries": sum(len(x) for by in sessions.values() for x in by.values()),
            "next_after": None,
        }
