"""The PostgreSQL store: asyncpg, with SQLAlchemy 2 Core and Alembic for the schema.

A commit is one READ COMMITTED transaction of two server-side calls (migration 0002):
``sbus_txn_load`` locks the session row, then every written key FOR UPDATE and every
read-only key FOR SHARE in ONE pass in ascending byte order, and returns the rows;
:func:`sbus.core.rules.decide` decides in Python; ``sbus_txn_apply`` writes the effects.
Three round trips (BEGIN, load, then apply and COMMIT in one message) whatever the size
of the read set, so a 64-entry read set costs about what a 1-entry one does. Deadlocks
(40P01) and serialization failures (40001) are retried up to three times, then answered 503
``not_applied``; a connection lost while COMMIT was in flight is 503 ``unknown``.

Counters are split over 16 slots per name (each commit adds to a random slot), so no
single hot row serializes every commit; readers sum the slots.

Every use takes an asyncpg connection from a fixed pool of its own (sql.pgpool):
SQLAlchemy's async adaptation and its pool's checkout cost more per statement than the
statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sbus.core import audit, rules
from sbus.core.audit import AuditEntry, AuditEvent
from sbus.core.changes import changes_of, created
from sbus.core.clock import MAX_OFFSET_MS, advanced_offset
from sbus.core.errors import (
    SBusError,
    ShardAlreadyExists,
    ShardDeleted,
    ShardNotFound,
    StoreMisconfigured,
    StoreUnavailable,
    ValidationFailed,
)
from sbus.core.idempotency import replay
from sbus.core.types import (
    Counters,
    CreateOp,
    DLDump,
    DLEntry,
    HistoryEntry,
    IdemRecord,
    IdemRef,
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
from sbus.storage.sql import audit_sql
from sbus.storage.sql.migrate import current_revision, head_revision
from sbus.storage.sql.pg_changes import INSERT as CHANGES_INSERT
from sbus.storage.sql.pg_changes import PostgresChangeLog, rows_json
from sbus.storage.sql.pgpool import Connector, PgPool, PoolExhausted
from sbus.storage.sql.pgurl import asyncpg_dsn as asyncpg_dsn  # re-exported: tests use it
from sbus.storage.sql.pgurl import asyncpg_dsns

log = logging.getLogger("sbus.storage.postgres")

T = TypeVar("T")
COUNTER_SLOTS = 16
COUNTER_NAMES = tuple(Counters.__dataclass_fields__)
RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,  # another backend crashed: the server restarts
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


# Every connection: statements that hang are cut after 30 s, and no JIT compilation (its
# start-up cost exceeds what the short statements of the bus could gain).
CONNECT_ARGS: dict[str, Any] = {"command_timeout": 30, "server_settings": {"jit": "off"}}
POOL_TIMEOUT_S = 10.0  # a request waits this long for a free connection, then 503
# Opening a connection, over every host of the URL (asyncpg's default is 60 s): a host
# that hangs is given up on after this, and the next connection starts at the next host.
CONNECT_TIMEOUT_S = 5.0


def _refuse_unusable_url(exc: BaseException) -> None:
    """Raise StoreMisconfigured when ``exc`` (under SQLAlchemy's wrapping) is asyncpg
    refusing the URL's parameters before it connects (a bad ``sslmode``, more ports than
    hosts, a missing root certificate): retrying cannot fix that, so ``sbus serve`` and
    ``sbus migrate`` stop with the reason instead of waiting for the store."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, asyncpg.ClientConfigurationError):
            raise StoreMisconfigured(f"SBUS_STORE cannot be used: {seen}") from exc
        seen = seen.__cause__


class SchemaOutOfDate(StoreMisconfigured):
    """The database schema is behind the code: ``sbus migrate`` must run first."""


def shard_from(row: dict[str, Any]) -> Shard:
    """A row as returned by the load function; read-only rows come without content."""
    hist_min = row["hist_min_version"]
    version = row["version"]
    return Shard(
        row["key"],
        row["id"],
        row.get("content", ""),
        version,
        row["goal_tag"],
        bool(row["require_mandate"]),
        row["created_ms"],
        row["updated_ms"],
        row["attempt_count"],
        row["conflict_count"],
        bool(row["deleted"]),
        row["head_hash"],
        version - hist_min + 1 - (1 if hist_min == 0 else 0),
    )


def entry_from(row: Any) -> HistoryEntry:
    return HistoryEntry(
        row["key"],
        row["version"],
        row["agent_id"],
        row["committed_ms"],
        row["content"],
        bool(row["deleted"]),
        row["rationale"],
        row["commit_id"],
        row["prev_hash"],
        row["hash"],
    )


def _shard_json(s: Shard) -> dict[str, Any]:
    return {
        "key": s.key,
        "id": s.id,
        "content": s.content,
        "version": s.version,
        "goal_tag": s.goal_tag,
        "require_mandate": s.require_mandate,
        "created_ms": s.created_ms,
        "updated_ms": s.updated_ms,
        "attempt_count": s.attempt_count,
        "conflict_count": s.conflict_count,
        "deleted": s.deleted,
        "head_hash": s.head_hash,
    }


def _entry_json(h: HistoryEntry) -> dict[str, Any]:
    return {
        "key": h.key,
        "version": h.version,
        "agent_id": h.agent_id,
        "committed_ms": h.committed_ms,
        "content": h.content,
        "deleted": h.deleted,
        "rationale": h.rationale,
        "commit_id": h.commit_id,
        "prev_hash": h.prev_hash,
        "hash": h.hash,
        "size": rules.entry_bytes(h),  # retention counts it (migration 0005)
    }


# What makes an acknowledged commit survive a crash of the server or the machine: WAL
# flushed by fsync before COMMIT returns (synchronous_commit not off), and full-page
# writes so a torn page can be repaired from the WAL. Read again by ``check``: an operator
# may change them with a reload.
DURABILITY_SQL = (
    "SELECT current_setting('fsync'), current_setting('synchronous_commit'), "
    "current_setting('full_page_writes')"
)
# The periodic check (upkeep): the durability settings, and whether this connection's
# server still takes writes.
CHECK_SQL = DURABILITY_SQL + ", current_setting('transaction_read_only')"


def is_durable(fsync: str, synchronous_commit: str, full_page_writes: str) -> bool:
    return fsync == "on" and synchronous_commit != "off" and full_page_writes == "on"


class PostgresStore(PostgresChangeLog):
    backend = "postgres"

    def __init__(self, url: str, limits: Limits | None = None, pool_size: int = 32) -> None:
        self.url = (
            url if "+asyncpg" in url else url.replace("postgresql://", "postgresql+asyncpg://", 1)
        )
        # ValueError: a URL no connection can use. Every connection, the pool's and
        # Alembic's, comes from this one connector.
        self._connector = Connector(asyncpg_dsns(self.url), CONNECT_TIMEOUT_S, **CONNECT_ARGS)
        self.limits = limits or Limits()
        self._pool_size = pool_size
        self._pool: PgPool | None = None
        self.durable = False  # until the server says so (start, check)
        self._durability: tuple[str, ...] | None = None

    # lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._pool is not None:
            return
        # SQLAlchemy (Alembic) reads the schema's revision once, on a connection of its
        # own; every use after that takes a connection from the pool below.
        engine = self._engine()
        try:
            async with engine.connect() as conn:
                current = await conn.run_sync(current_revision)
                settings = (await conn.exec_driver_sql(DURABILITY_SQL)).one()
        except Exception as exc:
            _refuse_unusable_url(exc)
            raise StoreUnavailable(f"cannot reach PostgreSQL: {exc}") from exc
        finally:
            await engine.dispose()
        head = head_revision()
        if current != head:
            raise SchemaOutOfDate(
                f"database schema is at {current or 'nothing'}, this release needs {head}: "
                "run `sbus migrate`"
            )
        self._note_durability(tuple(str(value) for value in settings))
        # A fixed pool: connections opened and closed per burst made the bus open and
        # close a backend per request under the benchmark (143 sessions in 4 s).
        self._pool = PgPool(self._connector, self._pool_size, POOL_TIMEOUT_S)

    def _engine(self) -> AsyncEngine:
        """A SQLAlchemy engine (for Alembic) whose connections come from the store's
        connector, like the pool's: SQLAlchemy's URL parser takes one host, so it never
        sees the store URL (sql.pgurl)."""
        return create_async_engine(
            "postgresql+asyncpg://", poolclass=NullPool, async_creator=self._connector.connect
        )

    async def check(self) -> None:
        async with self._conn() as conn:
            row = await conn.fetchrow(CHECK_SQL)
        assert row is not None
        self._note_durability(tuple(str(value) for value in row[:3]))
        if row[3] == "on" and self._pool is not None:
            # A server set read-only under the bus (a fenced old primary, or one turned
            # standby): a worker that only reads never meets 25006, and its connections
            # there would go on serving reads that the new primary has moved past.
            self._pool.discard_idle()
            raise StoreUnavailable("PostgreSQL is read-only: connecting again")

    def _note_durability(self, settings: tuple[str, ...]) -> None:
        """Set ``durable`` from (fsync, synchronous_commit, full_page_writes); log when
        it is first known or changes, so the warning is not repeated every check."""
        if settings == self._durability:
            return
        self._durability = settings
        fsync, synchronous_commit, full_page_writes = settings
        self.durable = is_durable(fsync, synchronous_commit, full_page_writes)
        if not self.durable:
            log.warning(
                "PostgreSQL is not durable (fsync=%s, synchronous_commit=%s, "
                "full_page_writes=%s): acknowledged commits can be lost on a crash; set "
                "fsync on, synchronous_commit on and full_page_writes on",
                fsync,
                synchronous_commit,
                full_page_writes,
            )
        else:
            log.info("PostgreSQL is durable (fsync on, synchronous_commit=%s)", synchronous_commit)

    async def migrate(self) -> None:
        """Upgrade the schema to head (``sbus migrate``)."""
        from sbus.storage.sql.migrate import upgrade_to_head

        engine = self._engine()
        try:
            async with engine.begin() as conn:
                await conn.run_sync(upgrade_to_head)
        except Exception as exc:
            _refuse_unusable_url(exc)
            raise
        finally:
            await engine.dispose()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection. Driver failures inside the block become
        StoreUnavailable; a dead connection (the server restarted or went away) is
        closed together with the idle ones, so the next request opens a fresh connection
        instead of drawing another stale one."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("the PostgreSQL store is not started")
        try:
            conn = await pool.acquire()
        except PoolExhausted as exc:
            raise StoreUnavailable(str(exc)) from exc
        except asyncpg.TargetServerAttributeNotMatched as exc:
            # Every host answered, none accepts writes: a standby not yet promoted.
            raise StoreUnavailable(f"no PostgreSQL host accepts writes yet: {exc}") from exc
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            # e.g. refused, or "the database system is starting up"
            raise StoreUnavailable(f"cannot get a PostgreSQL connection: {exc}") from exc
        # Kept for the next use unless it failed on its socket or the use was cancelled
        # mid-flight; the pool closes, rather than keeps, one left inside a transaction
        # (a use that could not roll back), so no later use runs inside it.
        reuse = False
        try:
            yield conn
            reuse = True
        except SBusError:
            reuse = True
            raise
        except RETRYABLE:
            reuse = True
            raise  # _run retries these
        except CONNECTION_ERRORS as exc:
            pool.discard_idle()
            raise StoreUnavailable(f"PostgreSQL connection failed: {exc}") from exc
        except asyncpg.ReadOnlySQLTransactionError as exc:
            # 25006: the server refused a write, so nothing of it was applied. It is in
            # recovery or set read-only (a standby, a demoted or fenced primary): drop
            # its connections, so the next use connects again and finds the primary.
            pool.discard_idle()
            raise StoreUnavailable(f"PostgreSQL is read-only: {exc}") from exc
        except asyncpg.PostgresError as exc:
            reuse = True
            log.exception("PostgreSQL error")
            raise StoreUnavailable(f"PostgreSQL error: {exc}") from exc
        finally:
            pool.release(conn, reuse)

    async def _run(self, body: Callable[[asyncpg.Connection], Awaitable[T | _Final[T]]]) -> T:
        """Run ``body`` in one READ COMMITTED transaction, retrying deadlocks and
        serialization failures. A failure before COMMIT was sent is ``not_applied``; a
        failure while it was in flight is ``unknown`` (the commit may have landed).

        ``body`` may return :class:`_Final`: its last statement is then sent together
        with the COMMIT, in one simple-query message (one round trip fewer; if the
        statement fails, PostgreSQL skips the COMMIT and the transaction rolls back).
        A :class:`_Refusal` is a :class:`_Final` whose error is raised once it committed."""
        for attempt in range(4):
            committing = False
            try:
                async with self._conn() as conn:
                    await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                    try:
                        result = await body(conn)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await conn.execute("ROLLBACK")
                        raise
                    committing = True
                    if isinstance(result, _Final):
                        try:
                            await conn.execute(result.statement + ";\nCOMMIT")
                        except CONNECTION_ERRORS:
                            raise  # lost in flight: the COMMIT may have landed (unknown)
                        except asyncpg.PostgresError:
                            # The server refused the statement, so it skipped the COMMIT
                            # and the transaction is aborted: nothing was applied.
                            committing = False
                            with contextlib.suppress(Exception):
                                await conn.execute("ROLLBACK")
                            raise
                        if isinstance(result, _Refusal):
                            raise result.error
                        return result.value
                    await conn.execute("COMMIT")
                    return result
            except StoreUnavailable as exc:
                if committing:
                    raise StoreUnavailable(exc.detail, outcome="unknown") from exc
                raise
            except RETRYABLE as exc:
                if attempt == 3:
                    raise StoreUnavailable(
                        f"PostgreSQL kept aborting the transaction: {exc}", outcome="not_applied"
                    ) from exc
                await asyncio.sleep(0.002 * (attempt + 1) * random.random())
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    # clock and flags -------------------------------------------------------------------
    async def now_ms(self) -> int:
        async with self._conn() as conn:
            value: int = await conn.fetchval("SELECT sbus_now_ms()")
            return value

    async def advance_clock(self, ms: int, cap_ms: int = MAX_OFFSET_MS) -> int:
        async def body(conn: asyncpg.Connection) -> int:
            # The row lock serializes concurrent advances, on every replica.
            current: int = await conn.fetchval(
                "SELECT value FROM sbus_meta WHERE name = 'clock_offset_ms' FOR UPDATE"
            )
            offset = advanced_offset(current, ms, cap_ms)
            await conn.execute(
                "UPDATE sbus_meta SET value = $1 WHERE name = 'clock_offset_ms'", offset
            )
            return offset

        return await self._run(body)

    async def set_ori(self, enabled: bool) -> None:
        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "UPDATE sbus_meta SET value = $1 WHERE name = 'ori_enabled'", int(enabled)
            )

        await self._run(body)

    # idempotency -----------------------------------------------------------------------
    async def idempotent(self, agent_id: str, key: str) -> IdemRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT fingerprint, status, body, etag FROM sbus_idempotency "
                "WHERE agent_id = $1 AND idem_key = $2 AND expires_ms > sbus_now_ms()",
                agent_id,
                key,
            )
        if row is None:
            return None
        return _idem_record(list(row))

    @staticmethod
    def _replay(idem: IdemRef, record: list[Any]) -> Outcome:
        """A live record loaded in the atomic step, under the one replay rule."""
        return replay(_idem_record(record), idem.fingerprint)

    def _idem_json(self, idem: IdemRef | None, out: Outcome, now: int) -> list[Any] | None:
        if idem is None:
            return None
        body = orjson.dumps(out.body).decode() if out.body is not None else None
        expires = now + self.limits.idempotency_ttl_ms
        return [idem.agent_id, idem.key, idem.fingerprint, out.status, body, out.etag, expires]

    def _apply_payload(self, payload: dict[str, Any]) -> str:
        payload.setdefault("slot", random.randrange(COUNTER_SLOTS))
        payload.setdefault("counters", {})
        payload["depth"] = self.limits.history_depth
        payload["max_bytes"] = self.limits.history_max_bytes
        return orjson.dumps(payload).decode()

    def _apply_statement(self, payload: dict[str, Any]) -> str:
        """The ``sbus_txn_apply`` call as SQL text, for :class:`_Final` (the simple
        query protocol takes no parameters, so the JSON is a dollar-quoted literal)."""
        return f"SELECT sbus_txn_apply({_dollar_quoted(self._apply_payload(payload))}::jsonb)"

    async def _apply_effects(
        self, conn: asyncpg.Connection, payload: dict[str, Any]
    ) -> dict[str, int]:
        """One ``sbus_txn_apply`` call; returns each written key's oldest retained
        history version after trimming."""
        raw = await conn.fetchval(
            "SELECT sbus_txn_apply($1::text::jsonb)", self._apply_payload(payload)
        )
        mins: dict[str, int] = _json(raw) if raw is not None else {}
        return mins

    # create and read -------------------------------------------------------------------
    async def _create(self, conn: asyncpg.Connection, op: CreateOp, now: int) -> Shard | None:
        row = await conn.fetchrow(
            "SELECT to_jsonb(s) AS j FROM sbus_shards s WHERE key = $1 FOR UPDATE", op.key
        )
        existing = shard_from(_json(row["j"])) if row is not None else None
        if existing is not None and not existing.deleted:
            return None
        shard, entry = rules.create_shard(op, existing, now)
        mins = await self._apply_effects(
            conn, {"shards": [_shard_json(shard)], "history": [_entry_json(entry)]}
        )
        # its change, in this transaction, under the key's lock (pg_changes says why)
        await conn.execute(CHANGES_INSERT.format(rows="$1"), rows_json([created(entry)]))
        return _with_depth(shard, mins[op.key])

    async def create(self, op: CreateOp) -> Outcome:
        async def body(conn: asyncpg.Connection) -> Outcome:
            # The advisory lock on the key makes two concurrent creates of a missing key
            # queue instead of failing on the primary key.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))", op.key)
            now: int = await conn.fetchval("SELECT sbus_now_ms()")
            if op.idem is not None:
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))",
                    op.idem.agent_id,
                    op.idem.key,
                )
                record = await conn.fetchrow(
                    "SELECT fingerprint, status, body, etag FROM sbus_idempotency "
                    "WHERE agent_id = $1 AND idem_key = $2 AND expires_ms > $3",
                    op.idem.agent_id,
                    op.idem.key,
                    now,
                )
                if record is not None:
                    return self._replay(op.idem, list(record))
            shard = await self._create(conn, op, now)
            if shard is None:
                raise ShardAlreadyExists(op.key)
            outcome = rules.render_create(shard)
            idem = self._idem_json(op.idem, outcome, now)
            if idem is not None:
                await self._apply_effects(conn, {"idem": idem, "now": now})
            return outcome

        return await self._run(body)

    async def admin_create(self, op: CreateOp) -> Shard | None:
        async def body(conn: asyncpg.Connection) -> Shard | None:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))", op.key)
            now: int = await conn.fetchval("SELECT sbus_now_ms()")
            return await self._create(conn, op, now)

        return await self._run(body)

    async def read(self, key: str, agent_id: str | None, session_id: str, record: bool) -> Shard:
        # One statement is its own transaction: the recorded read is atomic in one round
        # trip, without BEGIN/COMMIT around it. A failure means nothing was recorded.
        for attempt in range(4):
            try:
                async with self._conn() as conn:
                    raw = await conn.fetchval(
                        "SELECT sbus_read($1, $2, $3, $4, $5, $6)",
                        key,
                        agent_id,
                        session_id,
                        record,
                        self.limits.session_ttl_ms,
                        self.limits.max_dl_entries,
                    )
                break
            except RETRYABLE as exc:
                if attempt == 3:
                    raise StoreUnavailable(f"PostgreSQL kept aborting the read: {exc}") from exc
                await asyncio.sleep(0.002 * (attempt + 1) * random.random())
        result = _json(raw)
        if result["shard"] is None:
            raise ShardNotFound(key)
        shard = shard_from(result["shard"])
        if shard.deleted:
            raise ShardDeleted(key, shard.version)
        return shard

    async def read_many(
        self, keys: list[str], agent_id: str | None, session_id: str, record: bool
    ) -> dict[str, Shard]:
        async def rows(conn: asyncpg.Connection) -> dict[str, Shard]:
            loaded = {
                shard.key: shard
                for shard in (
                    shard_from(_json(r["j"]))
                    for r in await conn.fetch(
                        "SELECT to_jsonb(s) AS j FROM sbus_shards s WHERE key = ANY($1::text[])",
                        keys,
                    )
                )
            }
            return {k: loaded[k] for k in keys if k in loaded}  # request order

        if agent_id is None or not record:
            async with self._conn() as conn:
                return await rows(conn)
        agent = agent_id

        async def body(conn: asyncpg.Connection) -> dict[str, Shard] | _Final[dict[str, Shard]]:
            # One transaction for the N keys, in the order a GET takes: the rows first,
            # then the session row locked (created if new: it serializes this session's
            # reads and commits, so the DL bound holds), then the DL written once.
            found = await rows(conn)
            if not found:
                return found
            await conn.execute(
                "INSERT INTO sbus_dl_sessions (agent_id, session_id, overflowed, last_served_ms) "
                "VALUES ($1, $2, false, NULL) ON CONFLICT DO NOTHING",
                agent,
                session_id,
            )
            view = await self._session(conn, agent, session_id, lock=True)
            now: int = await conn.fetchval("SELECT sbus_now_ms()")
            done = rules.record_reads(
                view,
                ((k, s.version) for k, s in found.items()),
                now_ms=now,
                ttl_ms=self.limits.session_ttl_ms,
                max_entries=self.limits.max_dl_entries,
            )
            if not done.changed:
                return found
            payload = {
                "agent": agent,
                "session": session_id,
                "clear_dl": done.restart,
                "dl": [[k, e.version, e.served_ms] for k, e in done.entries.items()],
                "overflowed": done.overflowed,
                "last_served": done.last_served_ms,
            }
            return _Final(found, self._apply_statement(payload))

        return await self._run(body)

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT key FROM sbus_shards WHERE NOT deleted AND starts_with(key, $1) "
                'AND key COLLATE "C" > $2 ORDER BY key COLLATE "C" LIMIT $3',
                prefix,
                after or "",
                limit,
            )
        return [r["key"] for r in rows]

    # the commit protocol -----------------------------------------------------------------
    async def apply(self, txn: Txn) -> Outcome:
        limits = self.limits
        writes = [w.key for w in txn.writes]
        reads = [r.key for r in txn.read_set]
        rb = [w for w in txn.writes if w.kind == "rollback"]
        creates = sorted(w.key for w in txn.writes if w.kind == "create")

        async def body(conn: asyncpg.Connection) -> Outcome | _Final[Outcome]:
            if creates:
                # A key being created may have no row for FOR UPDATE to lock: take the
                # advisory lock POST /shard takes, in ascending order, so two creates
                # of one missing key queue (the second then finds the row and answers
                # ShardAlreadyExists) instead of both deciding against its absence and
                # the second upsert overwriting the first.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(k, 1)) "
                    "FROM unnest($1::text[]) AS k",
                    creates,
                )
            raw = await conn.fetchval(
                "SELECT sbus_txn_load($1, $2, $3, $4, $5, $6, $7)",
                txn.agent_id,
                txn.session_id,
                writes,
                reads,
                [w.key for w in rb],
                [w.target_version for w in rb],
                txn.idem.key if txn.idem is not None else None,
            )
            loaded = _json(raw)
            now: int = loaded["now"]
            if "idem" in loaded:
                assert txn.idem is not None
                return self._replay(txn.idem, loaded["idem"])
            view = SessionView()
            if loaded["session"] is not None:
                view.overflowed = bool(loaded["session"][0])
                view.last_served_ms = loaded["session"][1]
            for key, version, served in loaded["entries"]:
                view.entries[key] = DLEntry(version, served)
            shards: dict[str, Shard | None] = {s["key"]: shard_from(s) for s in loaded["shards"]}
            consumed = False
            if txn.mandate is not None:
                # Concurrent commits carrying one mandate queue on its advisory lock,
                # on any replica; the function checks for a consumed record in a
                # statement of its own after the lock, so it sees the winner's record
                # (migration 0004 says why that needs a function, not one statement).
                consumed = bool(
                    await conn.fetchval(
                        "SELECT sbus_mandate_consumed($1, $2)", txn.mandate.jti, now
                    )
                )
            sources = {h["key"]: entry_from(h) for h in loaded["sources"]}
            fx = rules.decide(
                txn,
                shards,
                view,
                ori_enabled=bool(loaded["ori"]),
                now_ms=now,
                ttl_ms=limits.session_ttl_ms,
                rollback_sources=sources,
                mandate_consumed=consumed,
            )
            if fx.error is not None:
                # A refusal's counter writes land: they ride with the COMMIT, then the
                # error is answered.
                refusal = {
                    "counters": fx.counters,
                    "bumps": [[k, a, c] for k, (a, c) in fx.bumps.items()],
                }
                return _Refusal(fx.error, self._apply_statement(refusal))
            payload: dict[str, Any] = {
                "counters": fx.counters,
                "shards": [_shard_json(s) for s in fx.shards],
                "history": [_entry_json(h) for h in fx.history],
                "agent": txn.agent_id,
                "session": txn.session_id,
                "clear_dl": fx.session != "live",
                "dl": [[k, e.version, e.served_ms] for k, e in fx.dl_writes.items()],
                "overflowed": view.overflowed,
                "last_served": now,
                "now": now,
            }
            changes = changes_of(txn, fx.history)
            if fx.consume is not None:
                payload["consume"] = [fx.consume.jti, fx.consume.retain_until_ms]
                # Its audit entry, in this transaction: it commits with the commit or not
                # at all (one round trip more, for mandate commits only).
                await conn.execute(AUDIT_INSERT, *audit_sql.insert_params(audit.consumed(txn), now))
            # Only a rollback's body (a ShardResponse) shows the retained depth, which
            # trimming inside the apply call decides; other bodies render up front so the
            # idempotency record rides in the same call.
            if txn.op != "rollback":
                outcome = rules.render(txn, {s.key: s for s in fx.shards})
                payload["idem"] = self._idem_json(txn.idem, outcome, now)
                # The apply call rides with the COMMIT (its answer is not needed here),
                # and the changes with it, under the keys' locks (pg_changes says why).
                log = CHANGES_INSERT.format(rows=_dollar_quoted(rows_json(changes)))
                return _Final(outcome, self._apply_statement(payload) + ";\n" + log)
            await conn.execute(CHANGES_INSERT.format(rows="$1"), rows_json(changes))
            mins = await self._apply_effects(conn, payload)
            outcome = rules.render(txn, {s.key: _with_depth(s, mins[s.key]) for s in fx.shards})
            idem = self._idem_json(txn.idem, outcome, now)
            if idem is not None:
                await self._apply_effects(conn, {"idem": idem, "now": now})
            return outcome

        return await self._run(body)

    # delivery log ---------------------------------------------------------------------------
    async def reset_session(self, agent_id: str, session_id: str) -> None:
        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "DELETE FROM sbus_dl_entries WHERE agent_id = $1 AND session_id = $2",
                agent_id,
                session_id,
            )
            await conn.execute(
                "DELETE FROM sbus_dl_sessions WHERE agent_id = $1 AND session_id = $2",
                agent_id,
                session_id,
            )

        await self._run(body)

    async def register(self, agent_id: str, session_id: str, keys: list[str]) -> RegisterResult:
        ttl = self.limits.session_ttl_ms

        async def body(conn: asyncpg.Connection) -> RegisterResult:
            now: int = await conn.fetchval("SELECT sbus_now_ms()")
            await conn.execute(
                "INSERT INTO sbus_dl_sessions (agent_id, session_id, overflowed, last_served_ms) "
                "VALUES ($1, $2, false, NULL) ON CONFLICT DO NOTHING",
                agent_id,
                session_id,
            )
            view = await self._session(conn, agent_id, session_id, lock=True)
            live, restarted = rules.begin_register(view, now, ttl)
            if restarted:
                await self._apply_effects(
                    conn,
                    {
                        "agent": agent_id,
                        "session": session_id,
                        "clear_dl": True,
                        "dl": [],
                        "overflowed": False,
                        "last_served": None,
                    },
                )
            rows = await conn.fetch(
                "SELECT key, version, deleted FROM sbus_shards WHERE key = ANY($1)", keys
            )
            current = {r["key"]: (r["version"], r["deleted"]) for r in rows}
            registered = 0
            existing: list[str] = []
            missing: list[str] = []
            for key in keys:
                found = current.get(key)
                if key in live:
                    existing.append(key)
                elif found is None or found[1]:
                    missing.append(key)
                elif await self._record(conn, agent_id, session_id, view, key, found[0], now):
                    registered += 1
            return RegisterResult(registered, existing, missing)

        return await self._run(body)

    @staticmethod
    async def _session(
        conn: asyncpg.Connection, agent_id: str, session_id: str, lock: bool = False
    ) -> SessionView:
        view = SessionView()
        row = await conn.fetchrow(
            "SELECT overflowed, last_served_ms FROM sbus_dl_sessions "
            "WHERE agent_id = $1 AND session_id = $2" + (" FOR UPDATE" if lock else ""),
            agent_id,
            session_id,
        )
        if row is None:
            return view
        view.overflowed = bool(row["overflowed"])
        view.last_served_ms = row["last_served_ms"]
        for r in await conn.fetch(
            "SELECT key, version, served_ms FROM sbus_dl_entries "
            "WHERE agent_id = $1 AND session_id = $2",
            agent_id,
            session_id,
        ):
            view.entries[r["key"]] = DLEntry(r["version"], r["served_ms"])
        return view

    async def _record(
        self,
        conn: asyncpg.Connection,
        agent_id: str,
        session_id: str,
        view: SessionView,
        key: str,
        version: int,
        now: int,
    ) -> bool:
        plan = rules.record_read(
            view,
            key,
            version,
            now_ms=now,
            ttl_ms=self.limits.session_ttl_ms,
            max_entries=self.limits.max_dl_entries,
        )
        if plan == "skip":
            return False
        if plan == "overflow":
            await conn.execute(
                "UPDATE sbus_dl_sessions SET overflowed = true "
                "WHERE agent_id = $1 AND session_id = $2",
                agent_id,
                session_id,
            )
            return False
        await self._apply_effects(
            conn,
            {
                "agent": agent_id,
                "session": session_id,
                "clear_dl": plan == "restart",
                "dl": [[key, version, now]],
                "overflowed": False,
                "last_served": now,
            },
        )
        return True

    async def inject_stale(self, agent_id: str, session_id: str, key: str, version: int) -> None:
        ttl = self.limits.session_ttl_ms

        async def body(conn: asyncpg.Connection) -> None:
            row = await conn.fetchrow(
                "SELECT version, deleted FROM sbus_shards WHERE key = $1", key
            )
            if row is None or row["deleted"]:
                raise ShardNotFound(key)
            if version > row["version"]:
                raise ValidationFailed.past_current_version(key, row["version"])
            now: int = await conn.fetchval("SELECT sbus_now_ms()")
            view = await self._session(conn, agent_id, session_id, lock=True)
            state = rules.session_state(view, now, ttl)
            await self._apply_effects(
                conn,
                {
                    "agent": agent_id,
                    "session": session_id,
                    "clear_dl": state not in ("live", "overflowed"),
                    "dl": [[key, version, now]],
                    "overflowed": view.overflowed,
                    "last_served": now,
                },
            )

        await self._run(body)

    async def dump_delivery_log(self, after: str | None, limit: int) -> tuple[DLDump, str | None]:
        ttl = self.limits.session_ttl_ms
        async with self._conn() as conn:
            now: int = await conn.fetchval("SELECT sbus_now_ms()")
            cutoff = now - ttl if ttl > 0 else -(2**62)
            agents = [
                r["agent_id"]
                for r in await conn.fetch(
                    'SELECT DISTINCT agent_id COLLATE "C" AS agent_id FROM sbus_dl_entries '
                    'WHERE served_ms > $1 AND agent_id COLLATE "C" > $2 ORDER BY 1 LIMIT $3',
                    cutoff,
                    after if after is not None else "",
                    limit + 1,
                )
            ]
            more = len(agents) > limit
            agents = agents[:limit]
            rows = await conn.fetch(
                "SELECT agent_id, session_id, key, version, served_ms FROM sbus_dl_entries "
                "WHERE agent_id = ANY($1) AND served_ms > $2 "
                'ORDER BY agent_id COLLATE "C", session_id COLLATE "C", key COLLATE "C"',
                agents,
                cutoff,
            )
        out: DLDump = {}
        for r in rows:
            out.setdefault(r["agent_id"], {}).setdefault(r["session_id"], {})[r["key"]] = {
                "version": r["version"],
                "age_secs": (now - r["served_ms"]) / 1000,
            }
        return out, (agents[-1] if more else None)

    async def open_mode_secret(self, candidate: bytes) -> bytes:
        async def body(conn: asyncpg.Connection) -> bytes:
            # Two statements under READ COMMITTED: an insert racing another replica's
            # waits for it and does nothing, and the SELECT (a fresh snapshot) then sees
            # the row that won.
            await conn.execute(
                "INSERT INTO sbus_secrets (name, value) VALUES ('open_mode', $1) "
                "ON CONFLICT (name) DO NOTHING",
                candidate,
            )
            value: bytes = await conn.fetchval(
                "SELECT value FROM sbus_secrets WHERE name = 'open_mode'"
            )
            return value

        return await self._run(body)

    async def purge(self) -> int:
        """Delete expired DL entries, sessions past their marker, idempotency records,
        consumed mandates and revocations."""
        ttl = self.limits.session_ttl_ms

        async def body(conn: asyncpg.Connection) -> int:
            now: int = await conn.fetchval("SELECT sbus_now_ms()")
            tags = []
            if ttl > 0:
                tags.append(
                    await conn.execute(
                        "DELETE FROM sbus_dl_entries WHERE served_ms <= $1", now - ttl
                    )
                )
                tags.append(
                    await conn.execute(
                        "DELETE FROM sbus_dl_sessions WHERE NOT overflowed "
                        "AND last_served_ms <= $1",
                        now - 2 * ttl,
                    )
                )
            for sql in (
                "DELETE FROM sbus_idempotency WHERE expires_ms <= $1",
                "DELETE FROM sbus_consumed_mandates WHERE retain_until_ms <= $1",
                "DELETE FROM sbus_revocations WHERE until_ms <= $1",
            ):
                tags.append(await conn.execute(sql, now))
            cutoff = audit.retention_cutoff(now, self.limits.audit_ttl_ms)
            if cutoff is not None:
                tags.append(await conn.execute(audit_sql.numbered(audit_sql.EXPIRED), cutoff))
            tags.append(
                await conn.execute(
                    audit_sql.numbered(audit_sql.OVER_CAP), self.limits.audit_max_rows
                )
            )
            gone = await self.trim_changes(conn, now)
            return gone + sum(int(tag.split()[-1]) for tag in tags)

        return await self._run(body)

    async def audit(self, event: AuditEvent) -> None:
        # One statement on the store clock, its own transaction: the unique group key
        # makes concurrent aggregated events of one minute add to one entry.
        async with self._conn() as conn:
            await conn.execute(
                AUDIT_NOW_INSERT, event.kind, event.agent, audit.encode(event.details), event.group
            )

    async def audit_log(self, after: int | None, limit: int) -> list[AuditEntry]:
        async with self._conn() as conn:
            rows = await conn.fetch(audit_sql.numbered(audit_sql.PAGE), after or 0, limit)
        return audit_sql.entries([list(r) for r in rows])

    async def take_token(self, agent_id: str, rate: RateLimit) -> int:
        """One statement (its own transaction): the row lock serializes an agent's
        requests across replicas; the arithmetic is rules.bucket_take's."""
        async with self._conn() as conn:
            row = await conn.fetchrow(
                """
                WITH now AS (SELECT sbus_now_ms() AS ms),
                cur AS (
                  SELECT least($3::float8, coalesce(
                           (SELECT b.tokens + greatest(0, now.ms - b.updated_ms) * $2::float8
                              FROM sbus_rate_buckets b WHERE b.agent_id = $1 FOR UPDATE),
                           $3::float8)) AS level, now.ms AS ms
                    FROM now
                )
                INSERT INTO sbus_rate_buckets AS b (agent_id, tokens, updated_ms)
                SELECT $1, CASE WHEN level >= 1 THEN level - 1 ELSE level END, ms FROM cur
                ON CONFLICT (agent_id) DO UPDATE
                  SET tokens = excluded.tokens, updated_ms = excluded.updated_ms
                RETURNING (SELECT level FROM cur) AS level
                """,
                agent_id,
                rate.per_ms,
                float(rate.burst),
            )
        assert row is not None
        level = float(row["level"])
        return 0 if level >= 1.0 else max(1, int((1.0 - level) / rate.per_ms + 0.999))

    async def revoke(self, jti: str, until_ms: int) -> None:
        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO sbus_revocations (jti, until_ms) VALUES ($1, $2) ON CONFLICT (jti) "
                "DO UPDATE SET until_ms = greatest(sbus_revocations.until_ms, excluded.until_ms)",
                jti,
                until_ms,
            )

        await self._run(body)

    async def revocation(self, jti: str) -> Revocation:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT sbus_now_ms() AS now, "
                "(SELECT until_ms FROM sbus_revocations WHERE jti = $1) AS until",
                jti,
            )
        assert row is not None
        return Revocation(int(row["now"]), None if row["until"] is None else int(row["until"]))

    # history, counters, admin ------------------------------------------------------------
    async def history(self, key: str, before: int | None, limit: int) -> list[HistoryEntry]:
        async with self._conn() as conn:
            exists = await conn.fetchval("SELECT 1 FROM sbus_shards WHERE key = $1", key)
            if exists is None:
                raise ShardNotFound(key)
            rows = await conn.fetch(
                "SELECT key, version, agent_id, committed_ms, content, deleted, rationale, "
                "commit_id, prev_hash, hash FROM sbus_history WHERE key = $1 AND version < $2 "
                "ORDER BY version DESC LIMIT $3",
                key,
                before if before is not None else 2**62,
                limit,
            )
        return [entry_from(r) for r in rows]

    async def stats(self) -> StoreStats:
        ttl = self.limits.session_ttl_ms
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT sbus_now_ms() AS now, "
                "(SELECT value FROM sbus_meta WHERE name = 'ori_enabled') AS ori, "
                "(SELECT count(*) FROM sbus_shards WHERE NOT deleted) AS total"
            )
            assert row is not None
            cutoff = row["now"] - ttl if ttl > 0 else -(2**62)
            sums = {
                r["name"]: int(r["total"])
                for r in await conn.fetch(
                    "SELECT name, sum(value) AS total FROM sbus_counters GROUP BY name"
                )
            }
            dl = await conn.fetchrow(
                "SELECT count(DISTINCT agent_id) AS agents, count(*) AS deliveries "
                "FROM sbus_dl_entries WHERE served_ms > $1",
                cutoff,
            )
            assert dl is not None
        counters = Counters(**{n: sums.get(n, 0) for n in COUNTER_NAMES})
        return StoreStats(
            counters, int(row["total"]), int(dl["agents"]), int(dl["deliveries"]), bool(row["ori"])
        )

    async def reset_all(self) -> int:
        async def body(conn: asyncpg.Connection) -> int:
            # Lock the tables in one fixed order so a reset and commits cannot deadlock
            # halfway; the reset is one atomic step.
            await conn.execute(
                "LOCK TABLE sbus_shards, sbus_history, sbus_dl_entries, sbus_dl_sessions, "
                "sbus_counters, sbus_idempotency, sbus_consumed_mandates, sbus_rate_buckets "
                "IN ACCESS EXCLUSIVE MODE"
            )
            cleared: int = await conn.fetchval("SELECT count(*) FROM sbus_shards")
            await conn.execute(
                "TRUNCATE sbus_shards, sbus_history, sbus_dl_entries, sbus_dl_sessions, "
                "sbus_counters, sbus_idempotency, sbus_consumed_mandates, sbus_rate_buckets"
            )
            await conn.execute("UPDATE sbus_meta SET value = 0 WHERE name = 'clock_offset_ms'")
            return cleared

        return await self._run(body)


AUDIT_INSERT = audit_sql.numbered(audit_sql.INSERT)
# audit_sql.INSERT with the time and the group key made from sbus_now_ms() in the
# statement (audit.group_key: the group, '|', the store-clock minute).
AUDIT_NOW_INSERT = (
    "INSERT INTO sbus_audit (at_ms, kind, agent, details, grp, count) "
    "SELECT now.ms, $1, $2, $3, $4::text || '|' || (now.ms / 60000)::text, 1 "
    "FROM (SELECT sbus_now_ms() AS ms) AS now "
    "ON CONFLICT (grp) DO UPDATE SET count = sbus_audit.count + 1"
)


def _idem_record(row: list[Any]) -> IdemRecord:
    """An idempotency record from its (fingerprint, status, body JSON, etag) columns."""
    fingerprint, status, body, etag = row
    return IdemRecord(fingerprint, status, orjson.loads(body) if body is not None else None, etag)


def _json(value: Any) -> Any:
    """jsonb as asyncpg hands it over without a codec (text), or already decoded."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _with_depth(shard: Shard, hist_min: int) -> Shard:
    return shard._replace(history_depth=shard.version - hist_min + 1 - (1 if hist_min == 0 else 0))


class _Final(Generic[T]):
    """What a transaction body answers when its last statement should travel with the
    COMMIT (see ``PostgresStore._run``)."""

    __slots__ = ("statement", "value")

    def __init__(self, value: T, statement: str) -> None:
        self.value = value
        self.statement = statement


def _dollar_quoted(text: str) -> str:
    """``text`` as a dollar-quoted literal. Dollar quoting has no escapes: the literal
    ends at the first occurrence of its tag, so the tag must first occur exactly where
    it closes, not inside ``text`` nor straddling its end (text ending in ``$j``)."""
    tag = "$j$"
    while (text + tag).find(tag) != len(text):
        tag = f"$j{secrets.token_hex(4)}$"
    return f"{tag}{text}{tag}"


class _Refusal(_Final[Any]):
    """A decided refusal: its counter writes travel with the COMMIT like any
    :class:`_Final` statement, and ``error`` is raised once they committed."""

    __slots__ = ("error",)

    def __init__(self, error: SBusError, statement: str) -> None:
        super().__init__(None, statement)
        self.error = error
