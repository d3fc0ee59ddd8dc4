"""The Redis store (>= 7.0): redis-py asyncio, every state change ONE Lua script.

Design
------
- **One script per state change** (create, recorded read, register, the commit
  protocol, reset_session, inject_stale, set_ori, advance_clock, reset_all, purge),
  sent with EVALSHA; a ``NOSCRIPT`` answer (after ``SCRIPT FLUSH`` or a restart) is
  answered by sending the full source with EVAL, which also caches it again. The
  commit script is :func:`sbus.core.rules.decide` in Lua, step for step (9a-9g, the
  same error codes and fields, counters counted before deciding, attempt/conflict
  bumps persisted on rejection); :mod:`sbus.storage.redis.scripts` has them all.
- **Clock**: Redis ``TIME`` inside the script plus the offset in the meta hash, so
  every replica agrees on what is live.
- **Keys**: every key of a deployment carries the hash tag ``{sbus:<namespace>}``, so
  all of them live in one Redis Cluster slot and every script is single-slot. The
  layout is in docs/redis.md.
- **History hash chain**: Redis Lua has no SHA-256, so the chain hash of a new entry
  is computed here, against each written key's head (version, head hash) and with
  ``committed_at`` = a store-clock reading. Every script reply carries the rows it
  touched and the script's clock; :mod:`sbus.storage.redis.heads` remembers them, so
  a commit after a read (the usual cycle) is hashed against what that read showed
  and sent at once: ONE round trip. Only a head this process never saw, or a
  rollback (its source entry), is read first, in one pipelined ``MULTI`` with
  ``TIME`` and the clock offset. ``committed_at`` is never before the head's own
  time (unless the head is far ahead: a clock that stepped back). The script checks
  that its own clock is within :data:`CLOCK_SKEW_MS` of the ``committed_at`` it was
  given and then decides exactly as ``decide`` would against the CURRENT state. Only
  if the commit is admitted and some written head is not the one it was hashed
  against does it write nothing and answer ``RETRY`` with the current rows and its
  clock, against which the next attempt is hashed; a moved head usually means the
  commit fails anyway (VersionMismatch against the old expected version), and then
  it is simply decided and answered. Retries are bounded
  (:data:`MAX_RACES`), then 503 ``not_applied``. Creates are hashed against the
  tombstone (or absence) read with the clock and checked the same way.
- **Idempotency records** are hashes with a store-clock expiry field, expired by
  Redis through ``PEXPIREAT`` at the matching real time and indexed in a sorted set
  for purge and reset. The recorded body is rendered here before the script runs
  (it is fully determined by the heads the script verifies), except the counters a
  concurrent rejection may move (``attempt_count``, ``conflict_count``,
  ``delta_log_depth``), which the script records beside it and a replay patches in.
- **Connections**: scripts run on :mod:`sbus.storage.redis.lanes` (packed by hiredis,
  one deadline of :data:`SCRIPT_TIMEOUT_S` over send and reply); everything else
  (pipelines, plain reads, CONFIG) on redis-py's pool.
- **Failures**: ``maxmemory-policy`` other than ``noeviction`` refuses to start, and
  makes :meth:`RedisStore.check` (every few seconds) report the store misconfigured
  (eviction would silently drop DeliveryLog entries and idempotency records).
  Connection errors before a script is sent are 503 ``not_applied``; once EVALSHA
  is on the wire a broken connection is ``unknown``. Write scripts are never resent
  by the driver. ``durable`` (compat ``wal_enabled``) is true only with
  ``appendonly yes`` and ``appendfsync always``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from hiredis import pack_command
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from sbus.core import audit, rules
from sbus.core.audit import AuditEntry, AuditEvent
from sbus.core.chain import GENESIS, content_id, entry_hash
from sbus.core.clock import MAX_OFFSET_MS, offset_refused, rfc3339
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
    StoreMisconfigured,
    StoreOutcome,
    StoreUnavailable,
    ValidationFailed,
    VersionMismatch,
    VersionNotFound,
)
from sbus.core.idempotency import replay
from sbus.core.types import (
    Counters,
    CreateOp,
    DLDump,
    HistoryEntry,
    IdemRecord,
    IdemRef,
    Limits,
    Outcome,
    RateLimit,
    RegisterResult,
    Revocation,
    Shard,
    StoreStats,
    Txn,
    WriteOp,
)
from sbus.storage.redis.changes import RedisChangeLog
from sbus.storage.redis.heads import Head, Heads, StoreClock, head_of
from sbus.storage.redis.lanes import Lanes, LanesBusy
from sbus.storage.redis.scripts import SCRIPTS, Script
from sbus.storage.urls import redact_url

log = logging.getLogger("sbus.redis")

CLOCK_SKEW_MS = 5_000  # how far a script's clock may be from the hashed committed_at
MAX_RACES = 16  # commit retries when a written head moved under the hashes
RACE_BACKOFF_S = 0.002  # times the attempt number, jittered: lets a hot key's writers pass
PURGE_BATCH = 500
MAX_CONNECTIONS = 64  # per process for scripts, and as many for the other commands
POOL_WAIT_S = 10  # for a free connection, then 503 not_applied
SCRIPT_TIMEOUT_S = 5  # one script call, send to reply; then the outcome is unknown
RESET_BATCH = 5000  # keep under Lua's unpack limit (~8000 arguments)
SHARD_FIELDS = (
    "version",
    "del",
    "mand",
    "head",
    "ac",
    "cc",
    "hmin",
    "hbytes",
    "id",
    "goal",
    "created",
    "updated",
    "content",
)
# What a commit reads before hashing: the head, and the rest of the predicted row.
HEAD_FIELDS = ("version", "head", "id", "goal", "mand", "created", "updated", "ac", "cc")
COUNTER_NAMES = tuple(Counters.__dataclass_fields__)
# Errors that Redis answers before a script runs: nothing was applied.
_NOT_RUN = ("OOM", "READONLY", "BUSY", "LOADING", "NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN")
# What a commit hashes against: the store ms, each written key's head in write order
# (None: absent) and each rollback's source content by key.
_Basis = tuple[int, list[Head | None], dict[str, str]]


def _packed(*command: str | int) -> bytes:
    """One command in RESP, packed in C (redis-py's asyncio connection packs in Python,
    argument by argument, whether hiredis is installed or not)."""
    # hiredis's stub types the tuple as one element; it takes any number
    packed: bytes = pack_command(command)  # type: ignore[arg-type]
    return packed


def _depth(version: int, hmin: int) -> int:
    return version - hmin + 1 - (1 if hmin == 0 else 0)


def _row_shard(row: Sequence[Any], content: str) -> Shard:
    """A Shard from a script's ``row_reply``."""
    key, version, ac, cc, depth, id_, goal, mand, created, updated, deleted, head = row
    return Shard(
        key,
        id_,
        content,
        int(version),
        goal,
        bool(mand),
        int(created),
        int(updated),
        int(ac),
        int(cc),
        bool(deleted),
        head,
        int(depth),
    )


class RedisStore(RedisChangeLog):
    backend = "redis"

    def __init__(self, url: str, limits: Limits | None = None, namespace: str = "sbus") -> None:
        self.url, query_ns = _split_namespace(url)
        namespace = query_ns or namespace
        if not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(f"invalid namespace {namespace!r}: no braces, not empty")
        self.namespace = namespace
        self.limits = limits or Limits()
        self.durable = False
        self._durability: tuple[str, str] | None = None  # (appendonly, appendfsync) last seen
        self.reset_batch = RESET_BATCH  # entries per index per reset_all script
        self.tag = "{sbus:" + self.namespace + "}"
        tag = self.tag
        self.k_meta = f"{tag}:meta"
        self.k_counters = f"{tag}:counters"
        self.k_live = f"{tag}:live"  # sorted set (lex) of live keys
        self.k_all = f"{tag}:shards"  # sorted set (lex) of every key, tombstones too
        self.k_sessions = f"{tag}:sessions"  # sorted set (lex) of agent\0session
        self.k_idem_index = f"{tag}:idem"  # sorted set of agent\0key by expiry
        self.k_changes = f"{tag}:changes"  # the change log (storage/redis/changes_lua.py)
        self.k_changes_floor = f"{tag}:changes:floor"
        self.k_conflicts = f"{tag}:conflicts"
        self.k_audit_ids = f"{tag}:audit:ids"  # the audit log (storage/redis/audit_lua.py)
        self._pool: BlockingConnectionPool | None = None
        self._client: Redis | None = None
        self._lanes: Lanes | None = None
        self._heads = Heads()  # what this process last saw: see heads.py
        self._clock = StoreClock()

    # key names ---------------------------------------------------------------------
    def k_shard(self, key: str) -> str:
        return f"{self.tag}:s:{key}"

    def k_hist(self, key: str) -> str:
        return f"{self.tag}:h:{key}"

    @staticmethod
    def member(agent_id: str, session_id: str) -> str:
        # Strings never contain U+0000 (input hygiene), so NUL separates unambiguously
        # and agent\0session sorts by agent first.
        return f"{agent_id}\0{session_id}"

    def k_dl(self, agent_id: str, session_id: str) -> tuple[str, str]:
        m = self.member(agent_id, session_id)
        return f"{self.tag}:dlt:{m}", f"{self.tag}:dlv:{m}"

    def k_idem(self, agent_id: str, key: str) -> str:
        return f"{self.tag}:i:{agent_id}\0{key}"

    # lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._client is not None:
            return
        pool = BlockingConnectionPool.from_url(
            self.url,
            decode_responses=True,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            socket_connect_timeout=5,
        )
        client = Redis(connection_pool=pool)
        try:
            problem = await self._check_server(client)
        except (RedisError, OSError) as exc:
            await client.aclose()
            await pool.disconnect()
            raise StoreUnavailable(f"cannot reach Redis at {redact_url(self.url)}: {exc}") from exc
        if problem is not None:
            await client.aclose()
            await pool.disconnect()
            log.error("%s", problem)
            raise StoreMisconfigured(problem)
        self._pool, self._client = pool, client
        self._lanes = Lanes(pool, MAX_CONNECTIONS, POOL_WAIT_S, SCRIPT_TIMEOUT_S)

    async def _check_server(self, client: Redis) -> str | None:
        """Why this server must not be used, or None; sets ``durable`` and loads the
        scripts."""
        info = await client.info("server")
        version = str(info.get("redis_version", "0"))
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (7, 0):
            return f"Redis {version} is too old: S-Bus needs Redis >= 7.0"
        problem = await self._check_config(client)
        if problem is None:
            for script in SCRIPTS.values():
                await client.script_load(script.source)
        return problem

    async def check(self) -> None:
        """The configuration again (an operator may ``CONFIG SET`` it at run time):
        StoreMisconfigured while eviction is on, so the bus answers not-ready."""
        try:
            problem = await self._check_config(self._redis())
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        if problem is not None:
            raise StoreMisconfigured(problem)

    async def _check_config(self, client: Redis) -> str | None:
        """Why this configuration must not be used, or None; sets ``durable`` and logs
        when it changes."""
        try:
            config: dict[str, str] = {}
            for name in ("maxmemory-policy", "appendonly", "appendfsync"):
                got = await client.config_get(name)
                config.update({str(k): str(v) for k, v in got.items()})
        except ResponseError as exc:
            return (
                f"cannot read the Redis configuration (CONFIG GET: {exc}); S-Bus must verify "
                "maxmemory-policy noeviction before it starts"
            )
        durability = (config.get("appendonly", ""), config.get("appendfsync", ""))
        self.durable = durability == ("yes", "always")
        if durability != self._durability:
            self._durability = durability
            if not self.durable:
                log.warning(
                    "Redis is not durable (appendonly=%s, appendfsync=%s): acknowledged "
                    "commits can be lost on a crash; set appendonly yes and appendfsync always",
                    *durability,
                )
        policy = config.get("maxmemory-policy", "")
        if policy != "noeviction":
            return (
                f"Redis maxmemory-policy is {policy!r}; S-Bus needs 'noeviction' (eviction "
                "would silently drop DeliveryLog entries and idempotency records). Set "
                "`maxmemory-policy noeviction`."
            )
        return None

    async def close(self) -> None:
        client, pool, lanes = self._client, self._pool, self._lanes
        self._client = self._pool = self._lanes = None
        if lanes is not None:
            await lanes.close()
        if client is not None:
            await client.aclose()
        if pool is not None:
            await pool.disconnect()

    def _redis(self) -> Redis:
        if self._client is None:
            raise StoreUnavailable("the Redis store is not started")
        return self._client

    async def ping(self) -> None:
        try:
            await self._redis().ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc

    # running scripts and reads -------------------------------------------------------
    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run one script on a connection of its own: EVALSHA, and EVAL on NOSCRIPT,
        packed by hiredis, sent and answered within :data:`SCRIPT_TIMEOUT_S`.

        Never resent after a broken connection: once the command may have reached
        the server the outcome is ``unknown`` for a writing script."""
        script: Script = SCRIPTS[name]
        lanes = self._lanes
        if lanes is None:
            raise StoreUnavailable("the Redis store is not started")
        try:
            conn = await lanes.take()
        except (LanesBusy, RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        clean = False  # a connection whose exchange did not finish is never reused
        try:
            async with asyncio.timeout(SCRIPT_TIMEOUT_S):
                try:
                    await conn.send_packed_command(
                        _packed("EVALSHA", script.sha, len(keys), *keys, *args),
                        check_health=False,
                    )
                    reply = await conn.read_response()
                except NoScriptError:
                    await conn.send_packed_command(
                        _packed("EVAL", script.source, len(keys), *keys, *args),
                        check_health=False,
                    )
                    reply = await conn.read_response()
            clean = True
            return reply
        except ResponseError as exc:
            clean = True  # Redis answered in full: the connection is fine
            message = str(exc)
            ran = not message.startswith(_NOT_RUN)
            outcome: StoreOutcome = "unknown" if ran and script.writes else "not_applied"
            log.error("Redis script %s failed: %s", name, message)
            raise StoreUnavailable(f"Redis refused {name}: {message}", outcome=outcome) from exc
        except (RedisError, OSError) as exc:  # TimeoutError included: the deadline passed
            lost: StoreOutcome = "unknown" if script.writes else "not_applied"
            raise StoreUnavailable(f"Redis connection lost: {exc!r}", outcome=lost) from exc
        finally:
            # Cancelled, timed out or broken with a reply pending: start afresh next time.
            if not clean:
                await conn.disconnect()
            lanes.give_back(conn)

    async def _snapshot(self, *commands: Sequence[str]) -> tuple[int, list[Any]]:
        """The store clock and the answers to ``commands``, read in one MULTI/EXEC
        (one consistent snapshot, one round trip)."""
        try:
            pipe = self._redis().pipeline(transaction=True)
            pipe.time()
            pipe.hget(self.k_meta, "offset")
            for command in commands:
                pipe.execute_command(*command)
            res: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        seconds, micros = res[0]
        return int(seconds) * 1000 + int(micros) // 1000 + int(res[1] or 0), res[2:]

    # clock and flags -------------------------------------------------------------------
    async def now_ms(self) -> int:
        return int(await self._eval("now", [self.k_meta], []))

    async def advance_clock(self, ms: int, cap_ms: int = MAX_OFFSET_MS) -> int:
        tag, offset = await self._eval("advance_clock", [self.k_meta], [ms, cap_ms])
        self._clock.forget()  # the next commit reads the clock again rather than retry
        if tag == "ERR":
            raise offset_refused(int(offset), ms, cap_ms)
        return int(offset)

    async def set_ori(self, enabled: bool) -> None:
        await self._eval("set_ori", [self.k_meta], [1 if enabled else 0])

    # errors ------------------------------------------------------------------------------
    @staticmethod
    def _error(reply: Sequence[Any], agent_id: str = "") -> SBusError:
        """The SBusError for a script's ``{'ERR', code, name, value, ...}`` reply, with
        the exact details :func:`sbus.core.rules.decide` gives."""
        code = reply[1]
        f: dict[str, Any] = dict(zip(reply[2::2], reply[3::2], strict=True))
        key = f.get("key", "")
        if code == "ShardNotFound":
            return ShardNotFound(key)
        if code == "ShardDeleted":
            version = int(f["version"])
            return ShardDeleted(key, version)
        if code == "VersionMismatch":
            expected, found = int(f["expected"]), int(f["found"])
            return VersionMismatch(key, expected, found)
        if code == "CrossShardStale":
            return CrossShardStale.of([(k, int(v), int(c)) for k, v, c in f["stale_keys"]])
        if code == "SessionExpired":
            reason = f["reason"]
            return SessionExpired(agent_id, reason)
        if code == "VersionNotFound":
            target = int(f["target_version"])
            return VersionNotFound(key, target)
        if code == "MandateRequired":
            return MandateRequired(key)
        if code == "MandateNotFound":
            return MandateNotFound.unrecognised()
        if code == "MandateExpired":
            return MandateExpired(f["jti"])
        if code == "MandateConsumed":
            return MandateConsumed(f["jti"])
        if code == "ShardAlreadyExists":
            return ShardAlreadyExists(key)
        return StoreUnavailable(f"unexpected script answer {code!r}", outcome="unknown")

    @staticmethod
    def _idem_record(fields: Sequence[Any]) -> IdemRecord:
        """The record from its hash fields ``fp status etag body ac cc dd``. A
        rollback's body (a ShardResponse) was recorded before the script trimmed and
        counted, so its counters and depth ride beside it (``ac`` set) and go back in."""
        fp, status, etag, body_json, ac, cc, dd = fields
        body = orjson.loads(body_json) if body_json else None
        if isinstance(body, dict) and ac != "":
            body["attempt_count"] = int(ac)
            body["conflict_count"] = int(cc)
            body["delta_log_depth"] = int(dd)
        return IdemRecord(fp, int(status), body, int(etag) if etag != "" else None)

    def _idem_payload(
        self, idem: IdemRef, outcome: Outcome, *, patch: bool = False
    ) -> dict[str, Any]:
        return {
            "fp": idem.fingerprint,
            "ttl": self.limits.idempotency_ttl_ms,
            "status": outcome.status,
            "etag": "" if outcome.etag is None else str(outcome.etag),
            "body": orjson.dumps(outcome.body).decode(),
            "member": f"{idem.agent_id}\0{idem.key}",
            "patch": patch,
        }

    # create and read -----------------------------------------------------------------------
    async def _create(self, op: CreateOp, admin: bool) -> tuple[str, Any]:
        for attempt in range(MAX_RACES):
            if attempt:
                await asyncio.sleep(random.random() * RACE_BACKOFF_S * attempt)
            now, res = await self._snapshot(
                ("HMGET", self.k_shard(op.key), "version", "head", "mand")
            )
            version_s, head, mand_s = res[0]
            # the script's head check makes this the policy of the tombstone it replaces
            mand = rules.created_require_mandate(op.require_mandate, mand_s == "1")
            hv = int(version_s) if version_s is not None else -1
            prev = head if head is not None else GENESIS
            version = hv + 1
            entry = rules.creation_entry(op, version, prev, now)
            digest = entry.hash
            meta = _entry_meta(version, op.agent_id, now, False, "create", op.commit_id, prev)
            payload: dict[str, Any] = {
                "now": now,
                "skew": CLOCK_SKEW_MS,
                "key": op.key,
                "hv": hv,
                "hh": head or "",
                "id": content_id(op.content),
                "goal": op.goal_tag,
                "mand": mand,
                "m": _with_hash(meta, digest),
                "h": digest,
                "z": rules.entry_bytes(entry),
                "max_depth": self.limits.history_depth,
                "max_bytes": self.limits.history_max_bytes,
                "admin": admin,
                "ch": self.change_payload(op.agent_id, op.commit_id),
            }
            if op.idem is not None:
                predicted = Shard(
                    op.key,
                    payload["id"],
                    op.content,
                    version,
                    op.goal_tag,
                    mand,
                    now,
                    now,
                    0,
                    0,
                    False,
                    digest,
                    0,
                )
                payload["idem"] = self._idem_payload(
                    op.idem, rules.render_create(predicted), patch=True
                )
            idem = op.idem
            idem_key = self.k_idem(idem.agent_id, idem.key) if idem else self.k_idem("", "")
            reply = await self._eval(
                "create",
                [
                    self.k_meta,
                    self.k_shard(op.key),
                    self.k_hist(op.key),
                    self.k_live,
                    self.k_all,
                    idem_key,
                    self.k_idem_index,
                ],
                [orjson.dumps(payload).decode(), op.content],
            )
            if reply[0] == "OK":
                self._clock.saw(int(reply[2]))
                self._heads.saw(op.key, head_of(_row_shard(reply[1], "")))
            if reply[0] != "RETRY":
                return reply[0], reply
        raise StoreUnavailable("create kept racing concurrent writers", outcome="not_applied")

    async def create(self, op: CreateOp) -> Outcome:
        tag, reply = await self._create(op, admin=False)
        if tag == "REPLAY":
            assert op.idem is not None  # a script replays only a request with a key
            return replay(self._idem_record(reply[1:]), op.idem.fingerprint)
        if tag == "ERR":
            raise self._error(reply)
        return rules.render_create(_row_shard(reply[1], op.content))

    async def admin_create(self, op: CreateOp) -> Shard | None:
        tag, reply = await self._create(op, admin=True)
        if tag == "EXISTS":
            return None
        if tag == "ERR":
            raise self._error(reply)
        return _row_shard(reply[1], op.content)

    async def read(self, key: str, agent_id: str | None, session_id: str, record: bool) -> Shard:
        if agent_id is not None and record:
            dlt, dlv = self.k_dl(agent_id, session_id)
            reply = await self._eval(
                "read",
                [self.k_meta, self.k_shard(key), dlt, dlv, self.k_sessions],
                [
                    self.limits.session_ttl_ms,
                    self.limits.max_dl_entries,
                    key,
                    self.member(agent_id, session_id),
                ],
            )
            if reply[0] == "NOTFOUND":
                raise ShardNotFound(key)
            shard = _row_shard(reply[1], reply[2])
            self._clock.saw(int(reply[3]))
        else:
            try:
                row = await self._redis().hmget(self.k_shard(key), list(SHARD_FIELDS))
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
            if row[0] is None:
                raise ShardNotFound(key)
            shard = _hash_shard(key, row)
        self._heads.saw_shard(shard)
        if shard.deleted:
            raise ShardDeleted(key, shard.version)
        return shard

    async def read_many(
        self, keys: list[str], agent_id: str | None, session_id: str, record: bool
    ) -> dict[str, Shard]:
        found: dict[str, Shard] = {}
        if agent_id is not None and record:
            dlt, dlv = self.k_dl(agent_id, session_id)
            reply = await self._eval(
                "read_many",
                [self.k_meta, dlt, dlv, self.k_sessions, *(self.k_shard(k) for k in keys)],
                [
                    self.limits.session_ttl_ms,
                    self.limits.max_dl_entries,
                    self.member(agent_id, session_id),
                    *keys,
                ],
            )
            self._clock.saw(int(reply[2]))
            for key, row in zip(keys, reply[1], strict=True):
                if row is not None:
                    found[key] = shard = _row_shard(row[0], row[1])
                    self._heads.saw_shard(shard)
            return found
        # Unrecorded: one MULTI of HMGETs, so the rows are one snapshot, as in a script.
        try:
            async with self._redis().pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.hmget(self.k_shard(key), list(SHARD_FIELDS))
                rows = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        for key, row in zip(keys, rows, strict=True):
            if row[0] is not None:
                found[key] = shard = _hash_shard(key, row)
                self._heads.saw_shard(shard)
        return found

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[str]:
        low = "[" + prefix if prefix else "-"
        if after is not None and after >= prefix:
            low = "(" + after
        high = "[" + prefix + "\U0010ffff" if prefix else "+"
        try:
            found = await self._redis().zrangebylex(self.k_live, low, high, start=0, num=limit)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        keys = [k if isinstance(k, str) else k.decode() for k in found]
        return [k for k in keys if k.startswith(prefix)]

    # the commit protocol -----------------------------------------------------------------------
    async def apply(self, txn: Txn) -> Outcome:
        writes = sorted(txn.writes, key=lambda w: w.key)
        reads = sorted(txn.read_set)
        dlt, dlv = self.k_dl(txn.agent_id, txn.session_id)
        idem_key = self.k_idem(txn.idem.agent_id, txn.idem.key) if txn.idem else self.k_idem("", "")
        keys = [
            self.k_meta,
            self.k_counters,
            dlt,
            dlv,
            self.k_sessions,
            self.k_live,
            idem_key,
            self.k_idem_index,
            self.k_all,
        ]
        for w in writes:
            keys += (self.k_shard(w.key), self.k_hist(w.key))
        keys += [self.k_shard(r.key) for r in reads]
        contents = [w.content if w.kind in ("commit", "create") else "" for w in writes]
        basis = self._remembered(writes)
        for attempt in range(MAX_RACES):
            if attempt:
                await asyncio.sleep(random.random() * RACE_BACKOFF_S * attempt)
            if basis is None:
                basis = await self._read_heads(writes)
            payload, predicted = self._commit_payload(txn, writes, basis)
            payload["reads"] = [[r.key, r.version_at_read] for r in reads]
            payload["member"] = self.member(txn.agent_id, txn.session_id)
            reply = await self._eval("commit", keys, [orjson.dumps(payload).decode(), *contents])
            tag = reply[0]
            if tag == "RETRY":
                basis = self._retry_basis(writes, int(reply[2]), reply[3])
                continue
            if tag == "REPLAY":
                assert txn.idem is not None  # a script replays only a request with a key
                return replay(self._idem_record(reply[1:]), txn.idem.fingerprint)
            if tag == "ERR":
                raise self._error(reply, txn.agent_id)
            self._clock.saw(int(reply[2]))
            post = {}
            for row in reply[1]:
                shard = _row_shard(row, predicted[row[0]].content)
                self._heads.saw_shard(shard)
                post[shard.key] = shard
            return rules.render(txn, post)
        raise StoreUnavailable("commit kept racing concurrent writers", outcome="not_applied")

    def _remembered(self, writes: list[WriteOp]) -> _Basis | None:
        """The heads this process last saw and its store-clock estimate, or None when
        it has not seen one of them (or no clock yet), or a write is a rollback (its
        source entry is read with the heads)."""
        now = self._clock.now()
        if now is None:
            return None
        heads: list[Head | None] = []
        for w in writes:
            head = self._heads.get(w.key)
            if head is None or w.kind == "rollback":
                return None
            heads.append(head)
        return now, heads, {}

    def _retry_basis(self, writes: list[WriteOp], now: int, rows: Sequence[Any]) -> _Basis | None:
        """The basis a RETRY answer hands back: the script's clock and the written rows
        as they are (None: absent). Remembered too. None for a rollback: its source
        entry is read again with the heads."""
        self._clock.saw(now)
        heads: list[Head | None] = []
        for w, row in zip(writes, rows, strict=True):
            if row is None:
                heads.append(None)
                continue
            head = head_of(_row_shard(row, ""))
            self._heads.saw(w.key, head)
            heads.append(head)
        if any(w.kind == "rollback" for w in writes):
            return None
        return now, heads, {}

    async def _read_heads(self, writes: list[WriteOp]) -> _Basis:
        """The store clock, every written head and each rollback's source content, in
        one MULTI round trip (when this process has not seen them)."""
        rollbacks = [w for w in writes if w.kind == "rollback"]
        commands: list[tuple[str, ...]] = [
            ("HMGET", self.k_shard(w.key), *HEAD_FIELDS) for w in writes
        ]
        commands += [
            ("HMGET", self.k_hist(w.key), f"m{w.target_version}", f"c{w.target_version}")
            for w in rollbacks
        ]
        now, res = await self._snapshot(*commands)
        self._clock.saw(now)
        sources: dict[str, str] = {}
        for i, w in enumerate(rollbacks):
            meta_json, content = res[len(writes) + i]
            if meta_json is not None and not orjson.loads(meta_json)["deleted"]:
                sources[w.key] = content or ""
        heads: list[Head | None] = []
        for i in range(len(writes)):
            version, head, id_, goal, mand, created, updated, ac, cc = res[i]
            if version is None:
                heads.append(None)
                continue
            heads.append(
                Head(
                    int(version),
                    head,
                    id_,
                    goal,
                    mand == "1",
                    int(created),
                    int(updated),
                    int(ac),
                    int(cc),
                )
            )
        return now, heads, sources

    def _commit_payload(
        self, txn: Txn, writes: list[WriteOp], basis: _Basis
    ) -> tuple[dict[str, Any], dict[str, Shard]]:
        """Hash the new history entries against the heads of ``basis``; returns the
        script payload and the predicted post rows. ``committed_at`` is the basis's
        clock, but never before a written head's own (up to half the skew allowed):
        the chain's times do not go back when this process's clock estimate trails
        another's."""
        clock, heads, sources = basis
        now = clock
        for h in heads:
            if h is not None and h.updated > now:
                now = h.updated
        # ... within reason: a head far ahead means the store's clock stepped back (an
        # NTP step); the script would refuse that committed_at for ever, so the clock wins.
        now = min(now, clock + CLOCK_SKEW_MS // 2)
        committed_at = rfc3339(now)
        out: list[dict[str, Any]] = []
        predicted: dict[str, Shard] = {}
        for w, h in zip(writes, heads, strict=True):
            hv = h.version if h is not None else -1
            prev = h.head if h is not None else GENESIS
            version = hv + 1
            deleted = w.kind == "delete"
            rationale = txn.rationale
            id_, goal, mand, created = "", "", False, 0
            if h is not None:
                id_, goal, mand, created = h.id, h.goal, h.mand, h.created
            if w.kind == "rollback":
                content = sources.get(w.key, "")
                rationale = f"rollback to {w.target_version}"
            elif w.kind == "create":
                # rules.create_shard's row over the tombstone (or absence) read here
                content, rationale = w.content, "create"
                id_, goal, created = content_id(content), w.goal_tag, now
                mand = rules.created_require_mandate(w.require_mandate, mand)
            elif deleted:
                content, rationale = "", "delete"
            else:
                content = w.content
            digest = entry_hash(
                prev,
                version,
                agent_id=txn.agent_id,
                commit_id=txn.commit_id,
                committed_at=committed_at,
                rationale=rationale,
                deleted=deleted,
                content=content,
            )
            meta = _entry_meta(version, txn.agent_id, now, deleted, rationale, txn.commit_id, prev)
            size = rules.entry_bytes(
                HistoryEntry(
                    w.key,
                    version,
                    txn.agent_id,
                    now,
                    content,
                    deleted,
                    rationale,
                    txn.commit_id,
                    prev,
                    digest,
                )
            )
            entry: dict[str, Any] = {
                "k": w.key,
                "kind": w.kind,
                "t": w.target_version,
                "hv": hv,
                "hh": h.head if h is not None else "",
                "m": _with_hash(meta, digest),
                "h": digest,
                "z": size,
            }
            if w.expected_version is not None:
                entry["exp"] = w.expected_version
            if w.kind == "create":
                entry.update(id=id_, goal=w.goal_tag, mand=w.require_mandate)
            out.append(entry)
            fresh = w.kind == "create"
            predicted[w.key] = Shard(
                w.key,
                id_,
                content,
                version,
                goal,
                mand,
                created,
                now,
                0 if fresh or h is None else h.ac + 1,
                0 if fresh or h is None else h.cc,
                deleted,
                digest,
                0,
            )
        payload: dict[str, Any] = {
            "now": now,
            "skew": CLOCK_SKEW_MS,
            "ttl": self.limits.session_ttl_ms,
            "mandate": txn.has_mandate,
            "mkey": f"{self.tag}:mandates",
            "ch": self.change_payload(txn.agent_id, txn.commit_id),
            "prefix": f"{self.tag}:s:",
            "max_depth": self.limits.history_depth,
            "max_bytes": self.limits.history_max_bytes,
            "writes": out,
        }
        if txn.mandate is not None:
            payload["mref"] = {
                "jti": txn.mandate.jti,
                "exp": txn.mandate.expires_ms,
                "until": txn.mandate.retain_until_ms,
                # written by the script with the consumption (audit_lua.HELPER)
                "audit": [self.tag, txn.agent_id, audit.encode(audit.consumed(txn).details)],
            }
        if txn.idem is not None:
            outcome = rules.render(txn, predicted)
            payload["idem"] = self._idem_payload(txn.idem, outcome, patch=txn.op == "rollback")
        return payload, predicted

    async def idempotent(self, agent_id: str, key: str) -> IdemRecord | None:
        fields = ("fp", "exp", "status", "etag", "body", "ac", "cc", "dd")
        now, res = await self._snapshot(("HMGET", self.k_idem(agent_id, key), *fields))
        fp, exp, status, etag, body, ac, cc, dd = res[0]
        if fp is None or int(exp) <= now:
            return None
        return self._idem_record((fp, status, etag or "", body or "", ac or "", cc, dd))

    # delivery log ------------------------------------------------------------------------------
    async def reset_session(self, agent_id: str, session_id: str) -> None:
        dlt, dlv = self.k_dl(agent_id, session_id)
        await self._eval(
            "reset_session", [dlt, dlv, self.k_sessions], [self.member(agent_id, session_id)]
        )

    async def register(self, agent_id: str, session_id: str, keys: list[str]) -> RegisterResult:
        dlt, dlv = self.k_dl(agent_id, session_id)
        reply = await self._eval(
            "register",
            [self.k_meta, dlt, dlv, self.k_sessions, *(self.k_shard(k) for k in keys)],
            [
                self.limits.session_ttl_ms,
                self.limits.max_dl_entries,
                self.member(agent_id, session_id),
                *keys,
            ],
        )
        return RegisterResult(int(reply[1]), list(reply[2]), list(reply[3]))

    async def inject_stale(self, agent_id: str, session_id: str, key: str, version: int) -> None:
        dlt, dlv = self.k_dl(agent_id, session_id)
        reply = await self._eval(
            "inject",
            [self.k_meta, self.k_shard(key), dlt, dlv, self.k_sessions],
            [self.limits.session_ttl_ms, version, key, self.member(agent_id, session_id)],
        )
        if reply[0] == "ERR":
            if reply[1] == "ValidationFailed":
                raise ValidationFailed.past_current_version(key, int(reply[3]))
            raise self._error(reply)

    async def dump_delivery_log(self, after: str | None, limit: int) -> tuple[DLDump, str | None]:
        rows, more, now = await self._eval(
            "dump_dl",
            [self.k_meta, self.k_sessions],
            [self.limits.session_ttl_ms, self.tag, after or "", limit],
        )
        out: DLDump = {}
        for agent, session, key, version, served in rows:
            out.setdefault(agent, {}).setdefault(session, {})[key] = {
                "version": int(version),
                "age_secs": (int(now) - int(served)) / 1000,
            }
        ordered = {
            a: {s: dict(sorted(e.items())) for s, e in sorted(out[a].items())} for a in sorted(out)
        }
        return ordered, (max(ordered) if more and ordered else None)

    async def open_mode_secret(self, candidate: bytes) -> bytes:
        # SET NX GET in one command: the first replica's candidate is stored, and every
        # later one gets it back instead of storing its own. Outside the keys
        # /admin/reset deletes.
        key = f"{self.tag}:signing"
        try:
            kept = await self._redis().set(key, candidate.hex(), nx=True, get=True)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        if kept is None:
            return candidate
        try:
            return bytes.fromhex(str(kept))
        except ValueError:
            raise StoreMisconfigured(
                f"Redis key {key} does not hold an S-Bus signing key (hex digits); delete it "
                "and a new one is made"
            ) from None

    async def purge(self) -> int:
        """Drop expired DL entries, sessions past their marker and expired idempotency
        records, in batches of :data:`PURGE_BATCH`: each batch is one script."""
        gone = 0
        keys = [self.k_meta, self.k_sessions, self.k_idem_index]
        ttl = self.limits.session_ttl_ms
        cursor = ""
        while True:
            n, cursor = await self._eval("purge", keys, ["dl", ttl, self.tag, cursor, PURGE_BATCH])
            gone += int(n)
            if not cursor:
                break
        while True:
            n, more = await self._eval("purge", keys, ["idem", ttl, self.tag, "", PURGE_BATCH])
            gone += int(n)
            if not more:
                break
        n, _ = await self._eval("purge", keys, ["mandates", ttl, self.tag, "", PURGE_BATCH])
        return gone + int(n) + await self._purge_audit() + await self.trim_changes()

    async def _purge_audit(self) -> int:
        tag, limits = self.tag, self.limits
        keys = [self.k_meta, self.k_audit_ids, f"{tag}:audit:at", f"{tag}:audit:groups"]
        gone = 0
        while True:
            n, more = await self._eval(
                "audit_purge",
                keys,
                [tag, limits.audit_ttl_ms, limits.audit_max_rows, PURGE_BATCH],
            )
            gone += int(n)
            if not int(more):
                return gone

    async def audit(self, event: AuditEvent) -> None:
        await self._eval(
            "audit",
            [self.k_meta],
            [self.tag, event.kind, event.agent, audit.encode(event.details), event.group or ""],
        )

    async def audit_log(self, after: int | None, limit: int) -> list[AuditEntry]:
        rows = await self._eval("audit_page", [self.k_audit_ids], [self.tag, after or 0, limit])
        return [
            AuditEntry(int(i), int(at), kind, agent, audit.decode(details), int(count))
            for i, at, kind, agent, details, count in rows
        ]

    # history, counters, admin -----------------------------------------------------------------
    async def history(self, key: str, before: int | None, limit: int) -> list[HistoryEntry]:
        reply = await self._eval(
            "history",
            [self.k_shard(key), self.k_hist(key)],
            [-1 if before is None else before, limit],
        )
        if reply[0] == "NOTFOUND":
            raise ShardNotFound(key)
        entries = []
        for meta_json, content in reply[1]:
            m = orjson.loads(meta_json)
            entries.append(
                HistoryEntry(
                    key,
                    m["version"],
                    m["agent_id"],
                    m["committed_ms"],
                    content,
                    m["deleted"],
                    m["rationale"],
                    m["commit_id"],
                    m["prev_hash"],
                    m["hash"],
                )
            )
        return entries

    async def stats(self) -> StoreStats:
        flat, total, agents, deliveries, ori = await self._eval(
            "stats",
            [self.k_meta, self.k_counters, self.k_live, self.k_sessions],
            [self.limits.session_ttl_ms, self.tag],
        )
        sums = dict(zip(flat[::2], flat[1::2], strict=True))
        counters = Counters(**{n: int(sums.get(n, 0)) for n in COUNTER_NAMES})
        return StoreStats(counters, int(total), int(agents), int(deliveries), bool(ori))

    async def take_token(self, agent_id: str, rate: RateLimit) -> int:
        # All buckets share one hash, so /admin/reset (RESET_ALL) deletes them at once.
        wait = await self._eval(
            "take_token",
            [self.k_meta, f"{self.tag}:buckets"],
            [repr(rate.per_ms), rate.burst, agent_id],
        )
        return int(wait)

    async def revoke(self, jti: str, until_ms: int) -> None:
        # One key per revoked jti, expiring with the token (SET ... PXAT), outside the
        # keys /admin/reset deletes.
        await self._eval("revoke", [f"{self.tag}:rv:{jti}"], [until_ms])

    async def revocation(self, jti: str) -> Revocation:
        # A script, so the store clock (TIME plus the test offset) and the entry are read
        # together; the key's own PXAT runs on Redis's real clock, which is never ahead
        # of the store clock, so the entry outlives its deadline rather than the reverse.
        now, until = await self._eval("revocation", [self.k_meta, f"{self.tag}:rv:{jti}"], [])
        return Revocation(int(now), None if until is None else int(until))

    async def reset_all(self) -> int:
        """Clear the namespace in scripts of at most :attr:`reset_batch` entries per index
        each: one script over a million shards would block Redis (and outlive the
        client's timeout). A namespace within one batch is cleared atomically; a larger
        one is not atomic with concurrent writes (stop traffic before an /admin/reset)."""
        keys = [
            self.k_counters,
            self.k_live,
            self.k_all,
            self.k_sessions,
            self.k_idem_index,
            self.k_meta,
        ]
        cleared, first = 0, "1"
        self._heads.clear()  # versions start again: a remembered head would only retry
        while True:
            try:
                n, more = await self._eval("reset_all", keys, [self.tag, self.reset_batch, first])
            except StoreUnavailable as exc:
                if first == "1":
                    raise
                # Earlier batches are done: the namespace is half reset, whatever this
                # batch did. Another reset finishes the job.
                raise StoreUnavailable(
                    f"reset interrupted after {cleared} shards: {exc.detail}; repeating it is safe",
                    outcome="unknown",
                ) from exc
            cleared += int(n)
            first = "0"
            if not int(more):
                return cleared


def _entry_meta(
    version: int,
    agent_id: str,
    committed_ms: int,
    deleted: bool,
    rationale: str | None,
    commit_id: str,
    prev_hash: str,
) -> dict[str, Any]:
    return {
        "version": version,
        "agent_id": agent_id,
        "committed_ms": committed_ms,
        "deleted": deleted,
        "rationale": rationale,
        "commit_id": commit_id,
        "prev_hash": prev_hash,
    }


def _with_hash(meta: dict[str, Any], digest: str) -> str:
    return orjson.dumps({**meta, "hash": digest}).decode()


def _hash_shard(key: str, row: Sequence[Any]) -> Shard:
    """A Shard from ``HMGET`` of :data:`SHARD_FIELDS`."""
    version, deleted, mand, head, ac, cc, hmin, _, id_, goal, created, updated, content = row
    return Shard(
        key,
        id_,
        content,
        int(version),
        goal,
        mand == "1",
        int(created),
        int(updated),
        int(ac),
        int(cc),
        deleted == "1",
        head,
        _depth(int(version), int(hmin)),
    )


def _split_namespace(url: str) -> tuple[str, str | None]:
    """Take an optional ``namespace`` query parameter off the URL (redis-py would
    reject it as an unknown connection option)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    namespace = next((v for k, v in query if k == "namespace"), None)
    rest = urlencode([(k, v) for k, v in query if k != "namespace"])
    return urlunsplit(parts._replace(query=rest)), namespace
