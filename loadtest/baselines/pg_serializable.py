"""Bench-only baseline: the PostgreSQL store with ORI validated by a SERIALIZABLE
transaction instead of row locks.

Everything but the commit's concurrency control is the real ``PostgresStore``: reads
record the DeliveryLog through the same ``sbus_read`` call, and a commit runs the same
``apply`` body (``rules.decide`` on the loaded state, the same ``sbus_txn_apply`` writes).
Two things differ, inside ``apply`` only:

* the transaction is ``SERIALIZABLE`` and its load is plain reads (:data:`UNLOCKED_LOAD`,
  the result ``sbus_txn_load`` returns, without its ``FOR UPDATE`` / ``FOR SHARE`` locks):
  PostgreSQL's serializable snapshot isolation, not a lock, stops two commits that read
  one version from both landing. A serialization failure (at any statement or at COMMIT)
  rolls the attempt back and retries it from the load, up to :data:`MAX_ATTEMPTS` times;
* the statistics counters (``sbus_counters``, 16 rows shared by every commit) are added
  after the transaction, in their own statement: inside it every pair of concurrent commits
  that drew one counter row would abort one of them, a cost of the bus's telemetry rather
  than of the concurrency control compared.

Never shipped in the service and never selectable through SBUS_STORE: only
``loadtest/baselines/serve.py`` serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import asyncpg
import orjson

from sbus.core.errors import StoreUnavailable
from sbus.core.types import Outcome, Txn
from sbus.storage.sql.postgres import (
    CONNECTION_ERRORS,
    COUNTER_SLOTS,
    RETRYABLE,
    PostgresStore,
    _Final,
    _Refusal,
)

T = TypeVar("T")
MAX_ATTEMPTS = 200
LOAD_CALL = "SELECT sbus_txn_load("

# What sbus_txn_load answers (migration 0002), read without taking a lock. Parameters as
# the store passes them: agent, session, written keys, read-set keys, rollback keys and
# target versions, idempotency key.
UNLOCKED_LOAD = """
WITH now AS MATERIALIZED (SELECT sbus_now_ms() AS v),
dl AS (SELECT key, version, served_ms FROM sbus_dl_entries
        WHERE agent_id = $1 AND session_id = $2),
idem AS (SELECT jsonb_build_array(fingerprint, status, body, etag) AS rec
           FROM sbus_idempotency, now
          WHERE $7::text IS NOT NULL AND agent_id = $1 AND idem_key = $7
            AND expires_ms > now.v),
keys AS (SELECT unnest($3::text[]) AS k UNION SELECT unnest($4::text[])
         UNION SELECT key FROM dl)
SELECT CASE WHEN EXISTS (SELECT 1 FROM idem) THEN
  jsonb_build_object('now', (SELECT v FROM now), 'idem', (SELECT rec FROM idem))
ELSE jsonb_build_object(
  'now', (SELECT v FROM now),
  'ori', (SELECT value <> 0 FROM sbus_meta WHERE name = 'ori_enabled'),
  'session', (SELECT jsonb_build_array(overflowed, last_served_ms) FROM sbus_dl_sessions
               WHERE agent_id = $1 AND session_id = $2),
  'entries', (SELECT COALESCE(jsonb_agg(jsonb_build_array(key, version, served_ms)),
                              '[]'::jsonb) FROM dl),
  'shards', (SELECT COALESCE(jsonb_agg(CASE WHEN s.key = ANY($3::text[]) THEN to_jsonb(s)
                                            ELSE to_jsonb(s) - 'content' END), '[]'::jsonb)
               FROM sbus_shards s WHERE s.key IN (SELECT k FROM keys)),
  'sources', (SELECT COALESCE(jsonb_agg(to_jsonb(h)), '[]'::jsonb)
                FROM sbus_history h
                JOIN unnest($5::text[], $6::bigint[]) AS r(k, v)
                  ON h.key = r.k AND h.version = r.v)
) END
"""


class _Conflict(Exception):
    """A concurrent commit inserted the same history version first (a unique violation
    PostgreSQL does not report as a serialization failure, because this transaction
    never read that index entry): the same conflict, retried the same way."""


class _Attempt:
    """One transaction attempt of a commit: whether its load was served unlocked, and the
    counter deltas its writes carried (added after the transaction)."""

    def __init__(self) -> None:
        self.loaded = False
        self.counters: dict[str, int] = {}


_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("sbus_serializable_attempt", default=None)


class _UnlockedConnection:
    """The asyncpg connection ``apply``'s body sees: its ``sbus_txn_load`` call is served
    by :data:`UNLOCKED_LOAD`; everything else goes to the real connection."""

    def __init__(self, conn: asyncpg.Connection, attempt: _Attempt) -> None:
        self._conn = conn
        self._attempt = attempt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchval(self, query: str, *args: Any) -> Any:
        if query.startswith(LOAD_CALL):
            self._attempt.loaded = True
            return await self._conn.fetchval(UNLOCKED_LOAD, *args)
        return await self._conn.fetchval(query, *args)


class SerializablePostgresStore(PostgresStore):
    """``PostgresStore`` whose commits are serialized by SERIALIZABLE, not by locks."""

    backend = "postgres-serializable"

    def __init__(self, url: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self.serialization_retries = 0  # attempts rolled back by a serialization failure

    async def apply(self, txn: Txn) -> Outcome:
        token = _ATTEMPT.set(_Attempt())
        try:
            return await super().apply(txn)
        finally:
            _ATTEMPT.reset(token)

    def _apply_payload(self, payload: dict[str, Any]) -> str:
        attempt = _ATTEMPT.get()
        if attempt is not None:
            counters = payload.pop("counters", None)
            if counters:
                attempt.counters = counters
            payload["counters"] = {}
        return super()._apply_payload(payload)

    async def _run(self, body: Callable[[asyncpg.Connection], Awaitable[T | _Final[T]]]) -> T:
        if _ATTEMPT.get() is None:
            return await super()._run(body)  # not a commit: the store's own transaction
        for attempt_no in range(MAX_ATTEMPTS):
            attempt = _Attempt()
            _ATTEMPT.set(attempt)
            try:
                return await self._serializable(body, attempt)
            except (*RETRYABLE, _Conflict):
                self.serialization_retries += 1
                # Randomised, growing backoff so the retries of a hot key spread out.
                await asyncio.sleep(random.random() * 0.001 * min(attempt_no + 1, 20))
        raise StoreUnavailable(
            f"the SERIALIZABLE commit failed {MAX_ATTEMPTS} times", outcome="not_applied"
        )

    async def _serializable(
        self,
        body: Callable[[asyncpg.Connection], Awaitable[T | _Final[T]]],
        attempt: _Attempt,
    ) -> T:
        """One attempt, as ``PostgresStore._run`` makes one, at SERIALIZABLE."""
        committing = False
        try:
            async with self._conn() as conn:
                await conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                try:
                    result = await body(_UnlockedConnection(conn, attempt))
                except BaseException:
                    with contextlib.suppress(Exception):
                        await conn.execute("ROLLBACK")
                    raise
                if not attempt.loaded:
                    # The store's statement changed: refuse rather than measure locks.
                    with contextlib.suppress(Exception):
                        await conn.execute("ROLLBACK")
                    raise StoreUnavailable("baseline: the commit did not call sbus_txn_load")
                committing = True
                if isinstance(result, _Final):
                    try:
                        await conn.execute(result.statement + ";\nCOMMIT")
                    except CONNECTION_ERRORS:
                        raise
                    except asyncpg.PostgresError as exc:
                        committing = False
                        with contextlib.suppress(Exception):
                            await conn.execute("ROLLBACK")
                        if isinstance(exc, asyncpg.UniqueViolationError):
                            raise _Conflict(str(exc)) from exc
                        raise
                    if isinstance(result, _Refusal):
                        # Its counter deltas after the transaction, as a commit's.
                        await self._add_counters(conn, attempt)
                        raise result.error
                    value = result.value
                else:
                    await conn.execute("COMMIT")
                    value = result
                await self._add_counters(conn, attempt)
                return value
        except StoreUnavailable as exc:
            if committing:
                raise StoreUnavailable(exc.detail, outcome="unknown") from exc
            raise

    async def _add_counters(self, conn: asyncpg.Connection, attempt: _Attempt) -> None:
        """The attempt's counter deltas, in their own (autocommit) statement."""
        if not attempt.counters:
            return
        payload = {
            "counters": attempt.counters,
            "slot": random.randrange(COUNTER_SLOTS),
            "depth": self.limits.history_depth,
            "max_bytes": self.limits.history_max_bytes,
        }
        await conn.fetchval(
            "SELECT sbus_txn_apply($1::text::jsonb)", orjson.dumps(payload).decode()
        )
