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
  (pipelines, plain reads, CONFIG) on redis-py's pool. Both are opened to the node
  :mod:`sbus.storage.redis.route` names: the server of a ``redis://`` URL, or in a
  Redis Cluster (``redis+cluster://``) the master owning the namespace's slot, followed
  when it moves. A command that surely did not run there (refused connection, MOVED,
  ASK, READONLY, CLUSTERDOWN, TRYAGAIN, LOADING) is sent again where the slot now
  lives, for up to :data:`FOLLOW_S`; a script answered ASK is sent to the importing
  node after ``ASKING``.
- **Replica acknowledgement** (``SBUS_REDIS_WAIT_REPLICAS`` n > 0): every writing
  script is followed, in the same packet on the same connection, by ``WAIT n
  timeout``; an answer that reports state (anything but a refusal) with fewer than n
  acknowledgements is 503 ``unknown``. A replayed idempotency record was written by
  another call, so a replay first writes ``T:sync`` and waits for that.
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
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from hiredis import pack_command
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
from sbus.storage.redis.lanes import LanesBusy
from sbus.storage.redis.route import CONNECT_S, ClusterRoute, Node, Route, address
from sbus.storage.redis.scripts import SCRIPTS, Script
from sbus.storage.urls import CLUSTER_SCHEME, cluster_nodes, redact_url

log = logging.getLogger("sbus.redis")

CLOCK_SKEW_MS = 5_000  # how far a script's clock may be from the hashed committed_at
MAX_RACES = 16  # commit retries when a written head moved under the hashes
RACE_BACKOFF_S = 0.002  # times the attempt number, jittered: lets a hot key's writers pass
PURGE_BATCH = 500
SCRIPT_TIMEOUT_S = 5  # one script call, send to reply (plus any WAIT); then unknown
FOLLOW_S = 10  # a Redis Cluster slot's new owner is looked for this long, then not_applied
FOLLOW_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8)  # between tries while no new owner is seen
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
# Errors that Redis answers before a command runs: nothing was applied. The last ones say
# the slot is served elsewhere (or not at the moment): a cluster route follows it.
_NOT_RUN = frozenset({"OOM", "BUSY", "NOREPLICAS", "NOSCRIPT"})
_ELSEWHERE = frozenset({"READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "MOVED"})
T = TypeVar("T")
# What a commit hashes against: the store ms, each written key's head in write order
# (None: absent) and each rollback's source content by key.
_Basis = tuple[int, list[Head | None], dict[str, str]]


def _packed(*command: str | int) -> bytes:
    """One command in RESP, packed in C (redis-py's asyncio connection packs in Python,
    argument by argument, whether hiredis is installed or not)."""
    # hiredis's stub types the tuple as one element; it takes any number
    packed: bytes = pack_command(command)  # type: ignore[arg-type]
    return packed


def _code(error: BaseException) -> str:
    """The error code of a Redis error reply (redis-py strips it off the message of the
    classes it knows and keeps it as ``status_code``)."""
    code = getattr(error, "status_code", None)
    return str(code) if code else str(error).split(" ", 1)[0]


def _redirect(error: BaseException) -> str:
    """host:port a MOVED or ASK answer names."""
    assert isinstance(error, AskError)  # MovedError is one too
    return address(str(error.host), int(error.port))


def _moved_to(error: BaseException) -> str | None:
    """host:port a MOVED names, else None."""
    return _redirect(error) if isinstance(error, AskError) and _code(error) == "MOVED" else None


def _rerouted(error: BaseException) -> bool:
    """Whether a command that failed with ``error`` surely did not run and may run on
    the slot's owner once found: no connection, or an answer that names another node."""
    if isinstance(error, RedisError) and _code(error) in _ELSEWHERE | {"ASK"}:
        return True
    # BusyLoadingError (LOADING) is a ConnectionError to redis-py
    return isinstance(error, RedisConnectionError | RedisTimeoutError | OSError)


def _refusal(reply: Any) -> bool:
    """A script answer that reports nothing done: a refusal, or a race to retry."""
    return isinstance(reply, list) and bool(reply) and reply[0] in ("ERR", "RETRY")


class _Refused(Exception):
    """A command that surely did not run: ``error`` is what to answer when the slot's
    owner cannot be found in time (its cause the refusal: a MOVED names the new
    owner); ``ask`` the node an ASK named."""

    def __init__(self, error: StoreUnavailable, ask: str = "") -> None:
        super().__init__(error.detail)
        self.error, self.ask = error, ask


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

    def __init__(
        self,
        url: str,
        limits: Limits | None = None,
        namespace: str = "sbus",
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        """``wait_replicas`` > 0: every writing script waits (``WAIT``) for that many
        replicas to acknowledge it, up to ``wait_timeout_ms``. A ``redis+cluster://``
        URL routes by the namespace's hash slot (:mod:`sbus.storage.redis.route`).
        Raises ValueError for a URL or setting it cannot use."""
        if wait_replicas < 0 or wait_timeout_ms < 1:
            raise ValueError(
                f"replica acknowledgement needs replicas >= 0 and a timeout >= 1 ms, not "
                f"{wait_replicas} and {wait_timeout_ms}"
            )
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self.cluster = url.startswith(CLUSTER_SCHEME)
        if self.cluster:
            cluster_nodes(url)  # a URL it cannot use is refused here, naming why
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
        self.k_sync = f"{tag}:sync"  # written before a replay's WAIT (see _eval)
        self._route = (
            ClusterRoute(self.url, tag, self._load_scripts) if self.cluster else Route(self.url)
        )
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
        if self._route.node is not None:
            return
        try:
            node = await self._route.open()
            problem = await self._check_server(node.client)
        except (RedisError, OSError) as exc:
            await self._route.close()
            raise StoreUnavailable(f"cannot reach Redis at {redact_url(self.url)}: {exc}") from exc
        if problem is not None:
            await self._route.close()
            log.error("%s", problem)
            raise StoreMisconfigured(problem)

    async def _check_server(self, client: Redis) -> str | None:
        """Why this server must not be used, or None; sets ``durable`` and loads the
        scripts."""
        info = await client.info("server")
        version = str(info.get("redis_version", "0"))
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (7, 0):
            return f"Redis {version} is too old: S-Bus needs Redis >= 7.0"
        problem = await self._check_config(client)
        if problem is None:
            await self._load_scripts(client)
            if self.wait_replicas:
                replicas = int((await client.info("replication")).get("connected_slaves", 0))
                if replicas < self.wait_replicas:
                    log.warning(
                        "SBUS_REDIS_WAIT_REPLICAS is %d but Redis has %d replicas connected: "
                        "every write answers 503 unknown until enough replicas are",
                        self.wait_replicas,
                        replicas,
                    )
        return problem

    @staticmethod
    async def _load_scripts(client: Redis) -> None:
        for script in SCRIPTS.values():
            await client.script_load(script.source)

    async def check(self) -> None:
        """The configuration again (an operator may ``CONFIG SET`` it at run time):
        StoreMisconfigured while eviction is on, so the bus answers not-ready."""
        problem = await self._command(self._check_config)
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
        await self._route.close()

    def node(self) -> Node:
        """Where commands go now."""
        node = self._route.node
        if node is None:
            raise StoreUnavailable("the Redis store is not started")
        return node

    async def ping(self) -> None:
        await self._command(lambda client: client.ping())

    async def _follow(self, node: Node, refused: BaseException, since: float, tries: int) -> bool:
        """After a command that surely did not run on ``node``: point the route at the
        slot's owner now (a cluster), and wait a little if it is still ``node``. False
        when there is nowhere to go (a single server) or :data:`FOLLOW_S` has passed."""
        route = self._route
        if not route.follows or time.monotonic() - since > FOLLOW_S:
            return False
        await route.follow(node, _moved_to(refused))
        if route.node is node:  # no new owner yet: a failover takes a few seconds
            await asyncio.sleep(FOLLOW_BACKOFF_S[min(tries, len(FOLLOW_BACKOFF_S) - 1)])
        return True

    async def _command(self, call: Callable[[Redis], Awaitable[T]]) -> T:
        """``call`` on the pool's client; every such command is a read or idempotent
        (``SET NX GET``), so one that failed to reach the slot's owner is sent again
        where it now lives."""
        since, tries = time.monotonic(), 0
        while True:
            node = self.node()
            try:
                return await call(node.client)
            except (RedisError, OSError) as exc:
                if _rerouted(exc) and await self._follow(node, exc, since, tries):
                    tries += 1
                    continue
                raise StoreUnavailable(f"Redis unreachable: {exc}") from exc

    # running scripts and reads -------------------------------------------------------
    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run one script on a connection of its own: EVALSHA, and EVAL on NOSCRIPT,
        packed by hiredis, sent and answered within :data:`SCRIPT_TIMEOUT_S`.

        Never resent after a broken connection: once the command may have reached
        the server the outcome is ``unknown`` for a writing script. One refused before
        it ran (a cluster slot's owner moved) is sent to the new owner."""
        script: Script = SCRIPTS[name]
        if not keys:  # a cluster routes a script by its first key
            raise ValueError(f"script {name} named no key")
        since, tries, ask = time.monotonic(), 0, ""
        while True:
            node = self.node()
            try:
                if ask:
                    return await self._eval_asking(ask, name, script, keys, args)
                return await self._eval_on(node, name, script, keys, args)
            except _Refused as refused:
                if refused.ask and not ask:
                    ask = refused.ask  # a slot being migrated: try the importing node once
                    continue
                ask = ""
                cause = refused.error.__cause__ or refused
                if not await self._follow(node, cause, since, tries):
                    raise refused.error from cause
                tries += 1

    async def _eval_on(
        self, node: Node, name: str, script: Script, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        lanes = node.lanes
        try:
            conn = await lanes.take()
        except LanesBusy as exc:
            raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        except (RedisError, OSError) as exc:
            error = StoreUnavailable(f"Redis unreachable at {node.address}: {exc}")
            error.__cause__ = exc
            raise _Refused(error) from exc
        clean = False  # a connection whose exchange did not finish is never reused
        try:
            reply, acks = await self._script_exchange(conn, script, keys, args, asking=False)
            clean = True
        except (RedisError, OSError) as exc:  # TimeoutError included: the deadline passed
            lost: StoreOutcome = "unknown" if script.writes else "not_applied"
            raise StoreUnavailable(f"Redis connection lost: {exc!r}", outcome=lost) from exc
        finally:
            # Cancelled, timed out or broken with a reply pending: start afresh next time.
            if not clean:
                await conn.disconnect()
            lanes.give_back(conn)
        return self._judge(name, script, reply, acks)

    async def _eval_asking(
        self,
        address: str,
        name: str,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str | int],
    ) -> Any:
        """The script on the node an ASK named (the slot is being migrated there), after
        ``ASKING``, on a connection of its own made for this one call."""
        route = self._route
        assert isinstance(route, ClusterRoute)  # only a cluster answers ASK
        pool = ConnectionPool.from_url(
            route.node_url(address), decode_responses=True, socket_connect_timeout=CONNECT_S
        )
        conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        conn.socket_timeout = None
        try:
            try:
                async with asyncio.timeout(CONNECT_S):
                    await conn.connect()  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(f"Redis unreachable at {address}: {exc}") from exc
            try:
                reply, acks = await self._script_exchange(conn, script, keys, args, asking=True)
            except (RedisError, OSError) as exc:
                lost: StoreOutcome = "unknown" if script.writes else "not_applied"
                raise StoreUnavailable(f"Redis connection lost: {exc!r}", outcome=lost) from exc
        finally:
            await conn.disconnect()
            await pool.disconnect()
        return self._judge(name, script, reply, acks)

    async def _script_exchange(
        self,
        conn: AbstractConnection,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str | int],
        *,
        asking: bool,
    ) -> tuple[Any, int]:
        """EVALSHA (EVAL on NOSCRIPT), each followed by WAIT when writing with replica
        acknowledgement on, within one deadline. Returns the script's reply (an error
        reply as its exception) and the acknowledgements."""
        wait = self.wait_replicas if script.writes else 0
        async with asyncio.timeout(SCRIPT_TIMEOUT_S + (self.wait_timeout_ms / 1000 if wait else 0)):
            command = _packed("EVALSHA", script.sha, len(keys), *keys, *args)
            reply, acks = await self._exchange(conn, command, wait, asking)
            if isinstance(reply, NoScriptError):
                command = _packed("EVAL", script.source, len(keys), *keys, *args)
                reply, acks = await self._exchange(conn, command, wait, asking)
            if wait and isinstance(reply, list) and reply and reply[0] == "REPLAY":
                # The record replayed was written by another call, maybe on another
                # connection: WAIT here would cover only this connection's writes. A write
                # of its own, after the record's, makes the WAIT cover the record.
                _, acks = await self._exchange(conn, _packed("SET", self.k_sync, "1"), wait, asking)
        return reply, acks

    async def _exchange(
        self, conn: AbstractConnection, command: bytes, wait: int, asking: bool
    ) -> tuple[Any, int]:
        """One command (after ``ASKING``, and followed by ``WAIT`` when ``wait``) in one
        packet; the command's error reply is returned, not raised, so that the WAIT's
        reply is still read and the connection stays clean."""
        if asking:
            command = _packed("ASKING") + command
        if wait:
            command += _packed("WAIT", wait, self.wait_timeout_ms)
        await conn.send_packed_command(command, check_health=False)
        if asking:
            await conn.read_response()  # +OK
        try:
            reply = await conn.read_response()
        except ResponseError as exc:
            reply = exc
        acks = int(await conn.read_response()) if wait else 0
        return reply, acks

    def _judge(self, name: str, script: Script, reply: Any, acks: int) -> Any:
        """The script's reply, or the error it means: an error reply (refused before it
        ran: ``_Refused`` for the caller to follow the slot, or failed while running),
        or an answer that reports state with fewer replicas than required."""
        if isinstance(reply, RedisError):
            code = _code(reply)
            message = f"Redis refused {name}: {code} {reply}"
            if code in _ELSEWHERE or code == "ASK" or code in _NOT_RUN:
                error = StoreUnavailable(message, outcome="not_applied")
                error.__cause__ = reply
                if code in _NOT_RUN or not self._route.follows:
                    raise error from reply
                raise _Refused(error, ask=_redirect(reply) if code == "ASK" else "") from reply
            # A script that failed while running (a bug): what it wrote before stays.
            log.error("Redis script %s failed: %s", name, reply)
            outcome: StoreOutcome = "unknown" if script.writes else "not_applied"
            raise StoreUnavailable(message, outcome=outcome) from reply
        wait = self.wait_replicas if script.writes else 0
        if wait and acks < wait and not _refusal(reply):
            raise StoreUnavailable(
                f"{acks} of {wait} Redis replicas acknowledged {name} within "
                f"{self.wait_timeout_ms} ms: it is on the master and may not survive a failover",
                outcome="unknown",
            )
        return reply

    async def _snapshot(self, *commands: Sequence[str]) -> tuple[int, list[Any]]:
        """The store clock and the answers to ``commands``, read in one MULTI/EXEC
        (one consistent snapshot, one round trip)."""

        async def snapshot(client: Redis) -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.time()
            pipe.hget(self.k_meta, "offset")
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute()

        res = await self._command(snapshot)
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
            shard_key = self.k_shard(key)
            row = await self._command(lambda client: client.hmget(shard_key, list(SHARD_FIELDS)))
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

        async def rows_of(client: Redis) -> list[Any]:
            async with client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.hmget(self.k_shard(key), list(SHARD_FIELDS))
                return await pipe.execute()

        rows = await self._command(rows_of)
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
        found = await self._command(
            lambda client: client.zrangebylex(self.k_live, low, high, start=0, num=limit)
        )
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
        if self.wait_replicas:
            # A replay acknowledges what another call wrote: not before the replicas have it.
            await self._synced("the idempotency record replayed")
        return self._idem_record((fp, status, etag or "", body or "", ac or "", cc, dd))

    async def _synced(self, what: str) -> None:
        """Wait until the replicas have everything written before now: a write of this
        connection's own (``T:sync``) and WAIT for it, in one pipeline."""

        async def sync(client: Redis) -> int:
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(self.k_sync, "1")
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                got = await pipe.execute()
            return int(got[1])

        acks = await self._command(sync)
        if acks < self.wait_replicas:
            raise StoreUnavailable(
                f"{acks} of {self.wait_replicas} Redis replicas acknowledged {what} within "
                f"{self.wait_timeout_ms} ms",
                outcome="unknown",
            )

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

        async def keep(client: Redis) -> tuple[Any, int]:
            # With replica acknowledgement, WAIT on the same connection (one pipeline).
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(key, candidate.hex(), nx=True, get=True)
                if self.wait_replicas:
                    pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                got = await pipe.execute()
            return got[0], int(got[1]) if self.wait_replicas else 0

        kept, acks = await self._command(keep)
        if acks < self.wait_replicas:
            raise StoreUnavailable(
                f"{acks} of {self.wait_replicas} Redis replicas acknowledged the signing key",
                outcome="unknown",
            )
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
