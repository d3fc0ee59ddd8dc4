"""The embedded default store: SQLite through SQLAlchemy 2 Core.

WAL mode, ``synchronous=FULL``, ``busy_timeout=5000``. Every operation runs on one
writer thread (see :mod:`sbus.storage.sql.writer`) inside ``BEGIN IMMEDIATE``, so
the write lock is held before anything is validated; busy or I/O errors become 503
``not_applied``. The schema is versioned by the Alembic migrations and upgraded on
start. Statements are plain SQL through ``exec_driver_sql``: the hot path pays no
statement compilation.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import create_engine, event, pool
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.exc import SQLAlchemyError

from sbus.core import audit, commit, rules
from sbus.core.audit import AuditEntry, AuditEvent
from sbus.core.changes import Change, ChangePage, Conflict, ConflictPage, CursorExpired
from sbus.core.clock import MAX_OFFSET_MS, advanced_offset, wall_ms
from sbus.core.errors import (
    ShardDeleted,
    ShardNotFound,
    StoreUnavailable,
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
from sbus.storage.sql import audit_sql, keyfile, sqlite_changes
from sbus.storage.sql.migrate import upgrade_to_head
from sbus.storage.sql.writer import Writer

SHARD_COLUMNS = (
    "key, id, content, version, goal_tag, require_mandate, created_ms, updated_ms, "
    "attempt_count, conflict_count, deleted, head_hash, hist_min_version, hist_bytes"
)
COUNTER_NAMES = tuple(Counters.__dataclass_fields__)
LOAD_SQL = f"SELECT {SHARD_COLUMNS} FROM sbus_shards WHERE key = ?"
SESSION_SQL = (
    "SELECT s.overflowed, s.last_served_ms, e.key, e.version, e.served_ms "
    "FROM sbus_dl_sessions AS s LEFT JOIN sbus_dl_entries AS e "
    "ON e.agent_id = s.agent_id AND e.session_id = s.session_id "
    "WHERE s.agent_id = ? AND s.session_id = ?"
)


T = TypeVar("T")


class Cursor(sqlite3.Cursor):
    def scalar(self) -> Any:
        row = self.fetchone()
        return None if row is None else row[0]

    def one(self) -> Any:
        row = self.fetchone()
        if row is None:
            raise sqlite3.DatabaseError("expected one row")
        return row


class Db:
    """The ``sqlite3`` connection under SQLAlchemy's, for the writer thread.

    SQLAlchemy builds the engine, applies the pragmas through its connect event and
    runs the Alembic migrations; the operations then issue their statements on the
    driver connection directly, because SQLAlchemy's per-statement overhead measured
    2.6x the statement itself on this path (141 us against 55 us for a key lookup).
    The method name mirrors ``Connection.exec_driver_sql``.

    It also keeps ``sbus_meta`` (the ORI flag and the clock offset), which nearly every
    operation needs and which almost never changes: :meth:`meta` reads the table again
    only when ``PRAGMA data_version`` says another connection (another worker or
    process on the file) committed since it was read, checked once per batch, and after
    this connection wrote it (:meth:`forget_meta`). In a writing batch the check comes
    after ``BEGIN IMMEDIATE``, so nobody else can commit until the batch ends; a
    read-only batch's operations were all queued before it began, so reading the
    flags once for all of them answers each as of a moment during its request.
    """

    __slots__ = ("_meta", "_owner", "_raw", "_version", "_version_checked")

    def __init__(self, owner: SAConnection) -> None:
        self._owner = owner  # keeps the engine's connection (and pool) alive
        raw = owner.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        self._raw = raw
        self._meta: tuple[bool, int] | None = None
        self._version: int | None = None
        self._version_checked = False

    def exec_driver_sql(self, sql: str, params: Any = ()) -> Cursor:
        cursor = self._raw.cursor(Cursor)
        if isinstance(params, list):
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return cursor

    # the writer's batch (sbus.storage.sql.writer.Connection) ---------------------------
    def begin(self, write: bool) -> None:
        self._version_checked = False
        if write:
            self._raw.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._raw.execute("COMMIT")

    def rollback(self) -> None:
        self._meta = None  # it may hold what the batch wrote
        self._raw.execute("ROLLBACK")

    def meta(self) -> tuple[bool, int]:
        """(ORI enabled, clock offset in ms) as stored."""
        if not self._version_checked:
            version = self.exec_driver_sql("PRAGMA data_version").one()[0]
            if version != self._version:
                self._version, self._meta = version, None
            self._version_checked = True
        if self._meta is None:
            rows: dict[str, int] = dict(
                self.exec_driver_sql("SELECT name, value FROM sbus_meta").fetchall()
            )
            self._meta = bool(rows.get("ori_enabled", 1)), int(rows.get("clock_offset_ms", 0))
        return self._meta

    def forget_meta(self) -> None:
        """This connection wrote ``sbus_meta`` (its own writes leave data_version alone)."""
        self._meta = None

    def close(self) -> None:
        self._owner.close()


def _shard(row: Any) -> Shard:
    (
        key,
        id_,
        content,
        version,
        goal_tag,
        mandate,
        created,
        updated,
        attempts,
        conflicts,
        deleted,
        head,
        hist_min,
        _bytes,
    ) = row
    return Shard(
        key,
        id_,
        content,
        version,
        goal_tag,
        bool(mandate),
        created,
        updated,
        attempts,
        conflicts,
        bool(deleted),
        head,
        version - hist_min + 1 - (1 if hist_min == 0 else 0),
    )


def _is_store_error(exc: BaseException) -> bool:
    return isinstance(exc, SQLAlchemyError | sqlite3.Error | OSError)


class SQLiteStore:
    backend = "sqlite"
    durable = True

    def __init__(self, url: str, limits: Limits | None = None) -> None:
        self.url = url
        self.limits = limits or Limits()
        self._writer: Writer | None = None

    # lifecycle ---------------------------------------------------------------------
    def _path(self) -> str:
        path = self.url.split("///", 1)[1] if "///" in self.url else ""
        if not path or path == ":memory:":
            raise ValueError("sqlite store needs a file: sqlite:///PATH")
        return path

    def _connect(self) -> Db:
        path = self._path()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            f"sqlite:///{path}",
            poolclass=pool.StaticPool,
            connect_args={"check_same_thread": False, "isolation_level": None, "timeout": 5.0},
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

        # AUTOCOMMIT: the writer issues BEGIN IMMEDIATE / COMMIT itself.
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        # One write transaction around the migration: atomic, and two processes
        # starting on one file cannot migrate it twice.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            upgrade_to_head(conn)
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            conn.close()
            raise
        conn.exec_driver_sql("COMMIT")
        return Db(conn)

    async def start(self) -> None:
        if self._writer is not None:
            return
        writer = Writer(self._connect, is_store_error=_is_store_error)
        try:
            writer.start()
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open SQLite store: {exc}") from exc
        self._writer = writer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
            self._writer = None

    async def _call(self, op: Callable[[Db], T], write: bool = True) -> T:
        if self._writer is None:
            raise StoreUnavailable("the SQLite store is not started")
        return await self._writer.call(op, write=write)

    async def ping(self) -> None:
        await self._call(lambda c: c.exec_driver_sql("SELECT 1").scalar(), write=False)

    async def check(self) -> None:
        return None  # the file's settings are this process's own (set at start)

    # clock and flags ---------------------------------------------------------------------
    @staticmethod
    def _meta(conn: Db) -> tuple[bool, int]:
        return conn.meta()

    def _now(self, conn: Db) -> int:
        return wall_ms() + conn.meta()[1]

    async def now_ms(self) -> int:
        result: int = await self._call(self._now, write=False)
        return result

    async def advance_clock(self, ms: int, cap_ms: int = MAX_OFFSET_MS) -> int:
        def op(conn: Db) -> int:
            # Checked and written under BEGIN IMMEDIATE: advances are serialized.
            offset = advanced_offset(self._meta(conn)[1], ms, cap_ms)
            conn.exec_driver_sql(
                "UPDATE sbus_meta SET value = ? WHERE name = 'clock_offset_ms'", (offset,)
            )
            conn.forget_meta()
            return offset

        result: int = await self._call(op)
        return result

    async def set_ori(self, enabled: bool) -> None:
        def op(conn: Db) -> None:
            conn.exec_driver_sql(
                "UPDATE sbus_meta SET value = ? WHERE name = 'ori_enabled'", (int(enabled),)
            )
            conn.forget_meta()

        await self._call(op)

    # rows --------------------------------------------------------------------------------
    @staticmethod
    def _load(conn: Db, key: str) -> Shard | None:
        row = conn.exec_driver_sql(LOAD_SQL, (key,)).fetchone()
        return _shard(row) if row is not None else None

    @staticmethod
    def _load_many(conn: Db, keys: list[str]) -> dict[str, Shard | None]:
        return {k: None if r is None else _shard(r) for k, r in _rows(conn, keys).items()}

    # idempotency ---------------------------------------------------------------------------
    @staticmethod
    def _idem_get(conn: Db, agent_id: str, key: str, now: int) -> IdemRecord | None:
        row = conn.exec_driver_sql(
            "SELECT fingerprint, status, body, etag FROM sbus_idempotency "
            "WHERE agent_id = ? AND idem_key = ? AND expires_ms > ?",
            (agent_id, key, now),
        ).fetchone()
        if row is None:
            return None
        body = orjson.loads(row[2]) if row[2] is not None else None
        return IdemRecord(row[0], row[1], body, row[3])

    async def idempotent(self, agent_id: str, key: str) -> IdemRecord | None:
        result: IdemRecord | None = await self._call(
            lambda c: self._idem_get(c, agent_id, key, self._now(c)), write=False
        )
        return result

    # create and read ------------------------------------------------------------------------
    async def create(self, op: CreateOp) -> Outcome:
        def run(conn: Db) -> Outcome:
            section = _Section(conn, self.limits)
            return commit.create(section, op, now_ms=self._now(conn), limits=self.limits)

        result: Outcome = await self._call(run)
        return result

    async def admin_create(self, op: CreateOp) -> Shard | None:
        def run(conn: Db) -> Shard | None:
            return commit.create_row(_Section(conn, self.limits), op, now_ms=self._now(conn))

        result: Shard | None = await self._call(run)
        return result

    @staticmethod
    def _session(conn: Db, agent_id: str, session_id: str) -> SessionView:
        view = SessionView()
        # One statement: the session row with its entries (none when there is no row).
        rows = conn.exec_driver_sql(SESSION_SQL, (agent_id, session_id)).fetchall()
        if not rows:
            return view
        view.overflowed = bool(rows[0][0])
        view.last_served_ms = rows[0][1]
        for _, _, key, version, served in rows:
            if key is not None:
                view.entries[key] = DLEntry(version, served)
        return view

    @staticmethod
    def _put_session(
        conn: Db, agent_id: str, session_id: str, overflowed: bool, last: int | None
    ) -> None:
        conn.exec_driver_sql(
            "INSERT OR REPLACE INTO sbus_dl_sessions (agent_id, session_id, overflowed, "
            "last_served_ms) VALUES (?,?,?,?)",
            (agent_id, session_id, overflowed, last),
        )

    @staticmethod
    def _clear_entries(conn: Db, agent_id: str, session_id: str) -> None:
        conn.exec_driver_sql(
            "DELETE FROM sbus_dl_entries WHERE agent_id = ? AND session_id = ?",
            (agent_id, session_id),
        )

    @staticmethod
    def _put_entries(
        conn: Db, agent_id: str, session_id: str, entries: Mapping[str, DLEntry]
    ) -> None:
        rows = [(agent_id, session_id, k, e.version, e.served_ms) for k, e in entries.items()]
        if rows:
            conn.exec_driver_sql(
                "INSERT OR REPLACE INTO sbus_dl_entries (agent_id, session_id, key, version, "
                "served_ms) VALUES (?,?,?,?,?)",
                rows if len(rows) > 1 else rows[0],
            )

    def _record(
        self,
        conn: Db,
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
            self._put_session(conn, agent_id, session_id, True, view.last_served_ms)
            return False
        if plan == "restart":
            self._clear_entries(conn, agent_id, session_id)
        self._put_entries(conn, agent_id, session_id, {key: view.entries[key]})
        self._put_session(conn, agent_id, session_id, False, now)
        return True

    async def read(self, key: str, agent_id: str | None, session_id: str, record: bool) -> Shard:
        recording = agent_id is not None and record

        def run(conn: Db) -> Shard:
            shard = self._load(conn, key)
            if shard is None:
                raise ShardNotFound(key)
            if recording:
                assert agent_id is not None
                now = self._now(conn)
                view = self._session(conn, agent_id, session_id)
                self._record(conn, agent_id, session_id, view, key, shard.version, now)
            if shard.deleted:
                raise ShardDeleted(key, shard.version)
            return shard

        result: Shard = await self._call(run, write=recording)
        return result

    async def read_many(
        self, keys: list[str], agent_id: str | None, session_id: str, record: bool
    ) -> dict[str, Shard]:
        recording = agent_id is not None and record

        def run(conn: Db) -> dict[str, Shard]:
            found = {k: s for k, s in self._load_many(conn, keys).items() if s is not None}
            if found and recording:
                assert agent_id is not None
                now = self._now(conn)
                view = self._session(conn, agent_id, session_id)
                done = rules.record_reads(
                    view,
                    ((k, s.version) for k, s in found.items()),
                    now_ms=now,
                    ttl_ms=self.limits.session_ttl_ms,
                    max_entries=self.limits.max_dl_entries,
                )
                if done.changed:
                    if done.restart:
                        self._clear_entries(conn, agent_id, session_id)
                    self._put_entries(conn, agent_id, session_id, done.entries)
                    self._put_session(
                        conn, agent_id, session_id, done.overflowed, done.last_served_ms
                    )
            return found

        result: dict[str, Shard] = await self._call(run, write=recording)
        return result

    async def list_keys(self, prefix: str, after: str | None, limit: int) -> list[str]:
        def run(conn: Db) -> list[str]:
            # Range scan on the primary key instead of LIKE, whose wildcards would
            # need escaping; every key with the prefix sorts in [prefix, prefix+U+10FFFF).
            rows = conn.exec_driver_sql(
                "SELECT key FROM sbus_shards WHERE deleted = 0 AND key >= ? AND key < ? "
                "AND key > ? ORDER BY key LIMIT ?",
                (prefix, prefix + "\U0010ffff", after or "", limit),
            )
            return [r[0] for r in rows if r[0].startswith(prefix)]

        result: list[str] = await self._call(run, write=False)
        return result

    # the commit protocol ----------------------------------------------------------------------
    def _apply(self, conn: Db, txn: Txn) -> Outcome:
        ori, offset = self._meta(conn)
        section = _Section(conn, self.limits)
        return commit.apply(
            section, txn, now_ms=wall_ms() + offset, ori_enabled=ori, limits=self.limits
        )

    async def apply(self, txn: Txn) -> Outcome:
        result: Outcome = await self._call(lambda c: self._apply(c, txn))
        return result

    # delivery log ------------------------------------------------------------------------------
    async def reset_session(self, agent_id: str, session_id: str) -> None:
        def run(conn: Db) -> None:
            self._clear_entries(conn, agent_id, session_id)
            conn.exec_driver_sql(
                "DELETE FROM sbus_dl_sessions WHERE agent_id = ? AND session_id = ?",
                (agent_id, session_id),
            )

        await self._call(run)

    async def register(self, agent_id: str, session_id: str, keys: list[str]) -> RegisterResult:
        def run(conn: Db) -> RegisterResult:
            now = self._now(conn)
            ttl = self.limits.session_ttl_ms
            view = self._session(conn, agent_id, session_id)
            live, restarted = rules.begin_register(view, now, ttl)
            if restarted:
                self._clear_entries(conn, agent_id, session_id)
                self._put_session(conn, agent_id, session_id, False, None)
            shards = self._load_many(conn, keys)
            registered = 0
            existing: list[str] = []
            missing: list[str] = []
            for key in keys:
                shard = shards.get(key)
                if key in live:
                    existing.append(key)
                elif shard is None or shard.deleted:
                    missing.append(key)
                elif self._record(conn, agent_id, session_id, view, key, shard.version, now):
                    registered += 1
            return RegisterResult(registered, existing, missing)

        result: RegisterResult = await self._call(run)
        return result

    async def inject_stale(self, agent_id: str, session_id: str, key: str, version: int) -> None:
        def run(conn: Db) -> None:
            shard = self._load(conn, key)
            if shard is None or shard.deleted:
                raise ShardNotFound(key)
            if version > shard.version:
                raise ValidationFailed.past_current_version(key, shard.version)
            now = self._now(conn)
            view = self._session(conn, agent_id, session_id)
            state = rules.session_state(view, now, self.limits.session_ttl_ms)
            if state not in ("live", "overflowed"):
                self._clear_entries(conn, agent_id, session_id)
            self._put_entries(conn, agent_id, session_id, {key: DLEntry(version, now)})
            self._put_session(conn, agent_id, session_id, view.overflowed, now)

        await self._call(run)

    async def dump_delivery_log(self, after: str | None, limit: int) -> tuple[DLDump, str | None]:
        ttl = self.limits.session_ttl_ms

        def run(conn: Db) -> tuple[DLDump, str | None]:
            now = self._now(conn)
            cutoff = now - ttl if ttl > 0 else -(2**62)
            # Agent ids are never empty (an empty identity records nothing), so ""
            # is a safe lower bound for the first page.
            agents = [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT DISTINCT agent_id FROM sbus_dl_entries WHERE served_ms > ? "
                    "AND agent_id > ? ORDER BY agent_id LIMIT ?",
                    (cutoff, after if after is not None else "", limit + 1),
                )
            ]
            more = len(agents) > limit
            agents = agents[:limit]
            out: DLDump = {}
            for agent in agents:
                for session, key, version, served in conn.exec_driver_sql(
                    "SELECT session_id, key, version, served_ms FROM sbus_dl_entries "
                    "WHERE agent_id = ? AND served_ms > ? ORDER BY session_id, key",
                    (agent, cutoff),
                ):
                    out.setdefault(agent, {}).setdefault(session, {})[key] = {
                        "version": version,
                        "age_secs": (now - served) / 1000,
                    }
            return out, (agents[-1] if more else None)

        result: tuple[DLDump, str | None] = await self._call(run, write=False)
        return result

    async def open_mode_secret(self, candidate: bytes) -> bytes:
        path = keyfile.key_path(self._path())
        try:
            return await asyncio.to_thread(keyfile.shared_secret, path, candidate)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot keep the open-mode signing key in {path}: {exc}"
            ) from exc

    async def purge(self) -> int:
        """Delete expired state: DL entries past the TTL, sessions past their expired
        marker, consumed mandates and revocations past their retention."""
        ttl = self.limits.session_ttl_ms

        def run(conn: Db) -> int:
            now = self._now(conn)
            gone = 0
            if ttl > 0:
                gone += conn.exec_driver_sql(
                    "DELETE FROM sbus_dl_entries WHERE served_ms <= ?", (now - ttl,)
                ).rowcount
                gone += conn.exec_driver_sql(
                    "DELETE FROM sbus_dl_sessions WHERE overflowed = 0 AND last_served_ms <= ?",
                    (now - 2 * ttl,),
                ).rowcount
            gone += conn.exec_driver_sql(
                "DELETE FROM sbus_consumed_mandates WHERE retain_until_ms <= ?", (now,)
            ).rowcount
            gone += conn.exec_driver_sql(
                "DELETE FROM sbus_revocations WHERE until_ms <= ?", (now,)
            ).rowcount
            gone += sqlite_changes.purge(conn, now, self.limits)
            return int(gone) + _purge_audit(conn, now, self.limits)

        result: int = await self._call(run)
        return result

    async def audit(self, event: AuditEvent) -> None:
        await self._call(lambda c: _write_audit(c, event, self._now(c)))

    async def audit_log(self, after: int | None, limit: int) -> list[AuditEntry]:
        def run(conn: Db) -> list[AuditEntry]:
            rows = conn.exec_driver_sql(audit_sql.PAGE, (after or 0, limit)).fetchall()
            return audit_sql.entries(rows)

        result: list[AuditEntry] = await self._call(run, write=False)
        return result

    async def take_token(self, agent_id: str, rate: RateLimit) -> int:
        def run(conn: Db) -> int:
            now = self._now(conn)
            row = conn.exec_driver_sql(
                "SELECT tokens, updated_ms FROM sbus_rate_buckets WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            left, wait = rules.bucket_take(
                row[0] if row else None, row[1] if row else None, now, rate
            )
            conn.exec_driver_sql(
                "INSERT OR REPLACE INTO sbus_rate_buckets (agent_id, tokens, updated_ms) "
                "VALUES (?, ?, ?)",
                (agent_id, left, now),
            )
            return wait

        result: int = await self._call(run)
        return result

    async def revoke(self, jti: str, until_ms: int) -> None:
        await self._call(
            lambda c: c.exec_driver_sql(
                "INSERT INTO sbus_revocations (jti, until_ms) VALUES (?, ?) ON CONFLICT (jti) "
                "DO UPDATE SET until_ms = max(until_ms, excluded.until_ms)",
                (jti, until_ms),
            )
        )

    async def revocation(self, jti: str) -> Revocation:
        def run(conn: Db) -> Revocation:
            row = conn.exec_driver_sql(
                "SELECT until_ms FROM sbus_revocations WHERE jti = ?", (jti,)
            ).fetchone()
            return Revocation(self._now(conn), None if row is None else int(row[0]))

        result: Revocation = await self._call(run, write=False)
        return result

    # history, counters, admin -----------------------------------------------------------------
    async def history(self, key: str, before: int | None, limit: int) -> list[HistoryEntry]:
        def run(conn: Db) -> list[HistoryEntry]:
            if self._load(conn, key) is None:
                raise ShardNotFound(key)
            rows = conn.exec_driver_sql(
                "SELECT key, version, agent_id, committed_ms, content, deleted, rationale, "
                "commit_id, prev_hash, hash FROM sbus_history WHERE key = ? AND version < ? "
                "ORDER BY version DESC LIMIT ?",
                (key, before if before is not None else 2**62, limit),
            )
            return [_entry(r) for r in rows]

        result: list[HistoryEntry] = await self._call(run, write=False)
        return result

    async def stats(self) -> StoreStats:
        ttl = self.limits.session_ttl_ms

        def run(conn: Db) -> StoreStats:
            ori, offset = self._meta(conn)
            now = wall_ms() + offset
            cutoff = now - ttl if ttl > 0 else -(2**62)
            sums: dict[str, int] = dict(
                conn.exec_driver_sql(
                    "SELECT name, SUM(value) FROM sbus_counters GROUP BY name"
                ).fetchall()
            )
            counters = Counters(**{n: int(sums.get(n, 0)) for n in COUNTER_NAMES})
            total = conn.exec_driver_sql(
                "SELECT COUNT(*) FROM sbus_shards WHERE deleted = 0"
            ).scalar()
            agents, deliveries = conn.exec_driver_sql(
                "SELECT COUNT(DISTINCT agent_id), COUNT(*) FROM sbus_dl_entries "
                "WHERE served_ms > ?",
                (cutoff,),
            ).one()
            return StoreStats(counters, int(total or 0), int(agents), int(deliveries), ori)

        result: StoreStats = await self._call(run, write=False)
        return result

    async def reset_all(self) -> int:
        def run(conn: Db) -> int:
            cleared = int(conn.exec_driver_sql("SELECT COUNT(*) FROM sbus_shards").scalar() or 0)
            for table in (
                "sbus_shards",
                "sbus_history",
                "sbus_dl_entries",
                "sbus_dl_sessions",
                "sbus_counters",
                "sbus_idempotency",
                "sbus_consumed_mandates",  # revocations survive a reset (protocol.md §2.9)
                "sbus_rate_buckets",
            ):
                conn.exec_driver_sql(f"DELETE FROM {table}")
            conn.exec_driver_sql("UPDATE sbus_meta SET value = 0 WHERE name = 'clock_offset_ms'")
            conn.forget_meta()
            return cleared

        result: int = await self._call(run)
        return result

    # the change log (sbus.storage.sql.sqlite_changes) --------------------------------------
    async def change_head(self) -> str:
        result: str = await self._call(sqlite_changes.head, write=False)
        return result

    async def changes_after(self, cursor: str, prefix: str, limit: int) -> ChangePage:
        sqlite_changes.parse(cursor)  # InvalidCursor before the writer thread
        result: ChangePage | None = await self._call(
            lambda c: sqlite_changes.after(c, cursor, prefix, limit), write=False
        )
        if result is None:
            raise CursorExpired(cursor)
        return result

    async def record_conflict(self, conflict: Conflict) -> None:
        ring = max(1, self.limits.conflict_ring)
        await self._call(lambda c: sqlite_changes.record_conflict(c, conflict, ring))

    async def conflict_head(self) -> str:
        result: str = await self._call(sqlite_changes.conflict_head, write=False)
        return result

    async def conflicts_after(self, cursor: str, limit: int) -> ConflictPage:
        result: ConflictPage = await self._call(
            lambda c: sqlite_changes.conflicts_after(c, cursor, limit), write=False
        )
        return result


def _write_audit(conn: Db, event: AuditEvent, now_ms: int) -> None:
    conn.exec_driver_sql(audit_sql.INSERT, audit_sql.insert_params(event, now_ms))


def _purge_audit(conn: Db, now_ms: int, limits: Limits) -> int:
    gone = 0
    cutoff = audit.retention_cutoff(now_ms, limits.audit_ttl_ms)
    if cutoff is not None:
        gone += conn.exec_driver_sql(audit_sql.EXPIRED, (cutoff,)).rowcount
    gone += conn.exec_driver_sql(audit_sql.OVER_CAP, (limits.audit_max_rows,)).rowcount
    return int(gone)


def _rows(conn: Db, keys: list[str]) -> dict[str, Any]:
    """The stored rows of ``keys`` (SHARD_COLUMNS), None for a missing key."""
    found: dict[str, Any] = dict.fromkeys(keys)
    if len(keys) == 1:
        found[keys[0]] = conn.exec_driver_sql(LOAD_SQL, (keys[0],)).fetchone()
        return found
    # SQLite allows 32766 host parameters; chunk well below that.
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.exec_driver_sql(
            f"SELECT {SHARD_COLUMNS} FROM sbus_shards WHERE key IN ({marks})", tuple(chunk)
        ):
            found[row[0]] = row
    return found


def _entry(row: Any) -> HistoryEntry:
    key, version, agent, committed, content, deleted, rationale, commit_id, prev, digest = row
    return HistoryEntry(
        key, version, agent, committed, content, bool(deleted), rationale, commit_id, prev, digest
    )


class _Section:
    """The commit skeleton's port (:class:`sbus.core.commit.Section`) over one open
    ``BEGIN IMMEDIATE`` transaction, on the writer thread."""

    __slots__ = ("_conn", "_hist", "_limits")

    def __init__(self, conn: Db, limits: Limits) -> None:
        self._conn = conn
        self._limits = limits
        # (hist_min_version, hist_bytes) of the rows rows() loaded, which write_shard
        # needs and the Shard does not carry; taken once, so a second write reads again.
        self._hist: dict[str, tuple[int, int] | None] = {}

    def idem_record(self, agent_id: str, key: str, now_ms: int) -> IdemRecord | None:
        return SQLiteStore._idem_get(self._conn, agent_id, key, now_ms)

    def put_idem(
        self, agent_id: str, key: str, record: IdemRecord, now_ms: int, expires_ms: int
    ) -> None:
        conn = self._conn
        # Expired records go as new ones arrive (indexed on expires_ms), so the table
        # is bounded by the request rate times SBUS_IDEMPOTENCY_TTL.
        conn.exec_driver_sql("DELETE FROM sbus_idempotency WHERE expires_ms <= ?", (now_ms,))
        conn.exec_driver_sql(
            "INSERT OR REPLACE INTO sbus_idempotency (agent_id, idem_key, fingerprint, status, "
            "body, etag, expires_ms) VALUES (?,?,?,?,?,?,?)",
            (
                agent_id,
                key,
                record.fingerprint,
                record.status,
                orjson.dumps(record.body).decode() if record.body is not None else None,
                record.etag,
                expires_ms,
            ),
        )

    def session(self, agent_id: str, session_id: str) -> SessionView:
        return SQLiteStore._session(self._conn, agent_id, session_id)

    def rows(self, keys: Collection[str]) -> Mapping[str, Shard | None]:
        out: dict[str, Shard | None] = {}
        for key, row in _rows(self._conn, list(keys)).items():
            self._hist[key] = None if row is None else (row[12], row[13])
            out[key] = None if row is None else _shard(row)
        return out

    def history_entry(self, key: str, version: int) -> HistoryEntry | None:
        row = self._conn.exec_driver_sql(
            "SELECT key, version, agent_id, committed_ms, content, deleted, rationale, "
            "commit_id, prev_hash, hash FROM sbus_history WHERE key = ? AND version = ?",
            (key, version),
        ).fetchone()
        return None if row is None else _entry(row)

    def mandate_consumed(self, jti: str, now_ms: int) -> bool:
        row = self._conn.exec_driver_sql(
            "SELECT 1 FROM sbus_consumed_mandates WHERE jti = ? AND retain_until_ms > ?",
            (jti, now_ms),
        ).fetchone()
        return row is not None

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        for name, delta in deltas.items():
            self._conn.exec_driver_sql(
                "INSERT INTO sbus_counters (name, slot, value) VALUES (?, 0, ?) "
                "ON CONFLICT (name, slot) DO UPDATE SET value = value + excluded.value",
                (name, delta),
            )

    def bump(self, key: str, attempts: int, conflicts: int) -> None:
        self._conn.exec_driver_sql(
            "UPDATE sbus_shards SET attempt_count = attempt_count + ?, "
            "conflict_count = conflict_count + ? WHERE key = ?",
            (attempts, conflicts, key),
        )

    def write_shard(self, shard: Shard, entry: HistoryEntry) -> Shard:
        conn = self._conn
        size = rules.entry_bytes(entry)
        if shard.key in self._hist:
            row = self._hist.pop(shard.key)
        else:
            row = conn.exec_driver_sql(
                "SELECT hist_min_version, hist_bytes FROM sbus_shards WHERE key = ?", (shard.key,)
            ).fetchone()
        hist_min, hist_bytes = (entry.version, 0) if row is None else (row[0], row[1])
        hist_bytes += size
        conn.exec_driver_sql(
            "INSERT INTO sbus_history (key, version, agent_id, committed_ms, content, deleted, "
            "rationale, commit_id, prev_hash, hash, size) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                entry.key,
                entry.version,
                entry.agent_id,
                entry.committed_ms,
                entry.content,
                entry.deleted,
                entry.rationale,
                entry.commit_id,
                entry.prev_hash,
                entry.hash,
                size,
            ),
        )
        limits = self._limits
        while hist_min < entry.version and (
            entry.version - hist_min + 1 > limits.history_depth
            or hist_bytes > limits.history_max_bytes
        ):
            dropped = conn.exec_driver_sql(
                "DELETE FROM sbus_history WHERE key = ? AND version = ? RETURNING size",
                (shard.key, hist_min),
            ).scalar()
            hist_bytes -= int(dropped or 0)
            hist_min += 1
        conn.exec_driver_sql(
            f"INSERT OR REPLACE INTO sbus_shards ({SHARD_COLUMNS}) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                shard.key,
                shard.id,
                shard.content,
                shard.version,
                shard.goal_tag,
                shard.require_mandate,
                shard.created_ms,
                shard.updated_ms,
                shard.attempt_count,
                shard.conflict_count,
                shard.deleted,
                shard.head_hash,
                hist_min,
                hist_bytes,
            ),
        )
        depth = shard.version - hist_min + 1 - (1 if hist_min == 0 else 0)
        return shard._replace(history_depth=depth)

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
        conn = self._conn
        if restart:
            SQLiteStore._clear_entries(conn, agent_id, session_id)
        SQLiteStore._put_entries(conn, agent_id, session_id, entries)
        SQLiteStore._put_session(conn, agent_id, session_id, view.overflowed, now_ms)

    def consume(self, mandate: MandateRef) -> None:
        self._conn.exec_driver_sql(
            "INSERT OR REPLACE INTO sbus_consumed_mandates (jti, retain_until_ms) VALUES (?, ?)",
            (mandate.jti, mandate.retain_until_ms),
        )

    def audit(self, event: AuditEvent, now_ms: int) -> None:
        _write_audit(self._conn, event, now_ms)

    def log_change(self, change: Change) -> None:
        sqlite_changes.append(self._conn, change)
