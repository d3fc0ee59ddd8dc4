"""Bench-only baseline: the Redis store with ORI validated by optimistic WATCH/MULTI
instead of one Lua script.

Everything but the commit's concurrency control is the real ``RedisStore``: reads record
the DeliveryLog through the same ``read`` script, creates and everything else are
unchanged, and the data layout is the store's own (module docstring of
``sbus.storage.redis.scripts``). A plain commit (``POST /commit``, or ``/commit/multi`` of
commit writes; no create, delete, rollback, mandate or idempotency key, which go to the
store's script) is decided in Python, the way a client of Redis would do it:

1. on one connection, ``WATCH`` the written and read-set shards, the session's
   DeliveryLog and the meta hash, then read them (one pipelined round trip; the shards
   behind DeliveryLog entries are watched and read in a second one when there are any);
2. ``rules.decide`` on that state, the decision every store makes;
3. a rejection writes its counters and attempt bumps and answers; an admitted commit
   writes the rows, history entries (trimmed as the script trims them), DeliveryLog
   entries and counters inside ``MULTI``/``EXEC``. ``EXEC`` answers nil when a watched
   key changed since its ``WATCH``: nothing was written, and the commit starts again at
   step 1 (at most :data:`MAX_ATTEMPTS` times).

Never shipped in the service and never selectable through SBUS_STORE: only
``loadtest/baselines/serve.py`` serves it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError, ResponseError

from sbus.core import rules
from sbus.core.errors import StoreUnavailable
from sbus.core.types import DLEntry, HistoryEntry, Outcome, SessionView, Shard, Txn
from sbus.storage.redis.store import SHARD_FIELDS, RedisStore, _entry_meta, _hash_shard, _with_hash

MAX_ATTEMPTS = 200
_HMIN, _HBYTES = SHARD_FIELDS.index("hmin"), SHARD_FIELDS.index("hbytes")


def _plain(txn: Txn) -> bool:
    return (
        txn.idem is None
        and not txn.has_mandate
        and txn.op != "rollback"
        and all(w.kind == "commit" for w in txn.writes)
    )


class _Raced(Exception):
    """EXEC found a watched key changed: nothing was written."""


class WatchRedisStore(RedisStore):
    """``RedisStore`` whose plain commits are serialized by WATCH/MULTI, not a script."""

    backend = "redis-watch"

    def __init__(self, url: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(url, *args, **kwargs)
        self.exec_aborts = 0  # EXECs refused because a watched key changed

    async def apply(self, txn: Txn) -> Outcome:
        if not _plain(txn):
            return await super().apply(txn)
        pool = self.node().pool  # StoreUnavailable before start
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.random() * 0.001 * min(attempt, 20))
            try:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
            try:
                return await self._attempt(conn, txn)
            except _Raced:
                self.exec_aborts += 1
            except (RedisError, OSError) as exc:
                await conn.disconnect()
                raise StoreUnavailable(f"Redis failed: {exc}", outcome="unknown") from exc
            except BaseException:
                await conn.disconnect()  # a reply may be pending: never reuse it
                raise
            finally:
                await pool.release(conn)
        raise StoreUnavailable(
            f"the WATCH/MULTI commit raced {MAX_ATTEMPTS} times", outcome="not_applied"
        )

    @staticmethod
    async def _batch(conn: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write and read every reply (one round trip)."""
        await conn.send_packed_command(conn.pack_commands(commands))
        replies = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    async def _attempt(self, conn: Any, txn: Txn) -> Outcome:
        dlt, dlv = self.k_dl(txn.agent_id, txn.session_id)
        keys = sorted({w.key for w in txn.writes} | {r.key for r in txn.read_set})
        fields = list(SHARD_FIELDS)
        first: list[list[Any]] = [
            ["WATCH", self.k_meta, dlt, dlv, *(self.k_shard(k) for k in keys)],
            ["TIME"],
            ["HMGET", self.k_meta, "offset", "ori"],
            ["HGETALL", dlv],
            ["ZRANGE", dlt, 0, -1, "WITHSCORES"],
            *(["HMGET", self.k_shard(k), *fields] for k in keys),
        ]
        _, clock, meta, dl_versions, dl_served, *rows = await self._batch(conn, first)
        now = int(clock[0]) * 1000 + int(clock[1]) // 1000 + int(meta[0] or 0)
        versions = _as_dict(dl_versions)
        view = SessionView(
            overflowed=versions.get("#over") == "1",
            last_served_ms=int(versions["#last"]) if "#last" in versions else None,
        )
        served = _as_dict(dl_served)
        for key, ms in served.items():
            if key in versions:
                view.entries[key] = DLEntry(int(versions[key]), int(float(ms)))
        raw = dict(zip(keys, rows, strict=True))
        more = sorted(set(view.entries) - set(raw))
        if more:
            second = [
                ["WATCH", *(self.k_shard(k) for k in more)],
                *(["HMGET", self.k_shard(k), *fields] for k in more),
            ]
            raw.update(zip(more, (await self._batch(conn, second))[1:], strict=True))
        shards = {
            k: (_hash_shard(k, row) if row[0] is not None else None) for k, row in raw.items()
        }
        fx = rules.decide(
            txn,
            shards,
            view,
            ori_enabled=meta[1] != "0",
            now_ms=now,
            ttl_ms=self.limits.session_ttl_ms,
        )
        if fx.error is not None:
            effects: list[list[Any]] = [["UNWATCH"]]
            effects += [["HINCRBY", self.k_counters, n, d] for n, d in fx.counters.items()]
            for key, (attempts, conflicts) in fx.bumps.items():
                effects.append(["HINCRBY", self.k_shard(key), "ac", attempts])
                if conflicts:
                    effects.append(["HINCRBY", self.k_shard(key), "cc", conflicts])
            await self._batch(conn, effects)
            raise fx.error
        writes = await self._row_writes(conn, fx.shards, fx.history, raw)
        tx: list[list[Any]] = [["MULTI"]]
        tx += [["HINCRBY", self.k_counters, n, d] for n, d in fx.counters.items()]
        if fx.session != "live":
            tx.append(["DEL", dlt, dlv])  # expired or purged entries go
        tx += writes
        for key, entry in fx.dl_writes.items():
            tx.append(["ZADD", dlt, entry.served_ms, key])
            tx.append(["HSET", dlv, key, entry.version])
        tx.append(["HSET", dlv, "#last", now])
        tx.append(["ZADD", self.k_sessions, 0, self.member(txn.agent_id, txn.session_id)])
        tx.append(["EXEC"])
        replies = await self._batch(conn, tx)
        if replies[-1] is None:
            raise _Raced()
        return rules.render(txn, {s.key: s for s in fx.shards})

    async def _row_writes(
        self,
        conn: Any,
        shards: list[Shard],
        history: list[HistoryEntry],
        raw: dict[str, Any],
    ) -> list[list[Any]]:
        """The commands writing each new row and history entry, trimming the history as
        the commit script does (the sizes of the entries to drop are read first)."""
        limits = self.limits
        out: list[list[Any]] = []
        for shard, entry in zip(shards, history, strict=True):
            row = raw[shard.key]
            hmin, hbytes = int(row[_HMIN]), int(row[_HBYTES] or 0)
            size = rules.entry_bytes(entry)
            hbytes += size
            hkey, version = self.k_hist(shard.key), shard.version
            need = max(0, version - hmin + 1 - limits.history_depth) + 4
            sizes: dict[int, int] = {}
            while hmin < version and (
                version - hmin + 1 > limits.history_depth or hbytes > limits.history_max_bytes
            ):
                if hmin not in sizes:
                    wanted = [f"z{v}" for v in range(hmin, min(version, hmin + need))]
                    got = (await self._batch(conn, [["HMGET", hkey, *wanted]]))[0]
                    sizes.update(
                        {hmin + i: int(z) if z is not None else 0 for i, z in enumerate(got)}
                    )
                hbytes -= sizes[hmin]
                out.append(["HDEL", hkey, f"m{hmin}", f"c{hmin}", f"z{hmin}"])
                hmin += 1
            meta = _entry_meta(
                version,
                entry.agent_id,
                entry.committed_ms,
                entry.deleted,
                entry.rationale,
                entry.commit_id,
                entry.prev_hash,
            )
            out.append(
                [
                    "HSET",
                    hkey,
                    f"m{version}",
                    _with_hash(meta, entry.hash),
                    f"c{version}",
                    entry.content,
                    f"z{version}",
                    size,
                ]
            )
            out.append(
                [
                    "HSET",
                    self.k_shard(shard.key),
                    "content",
                    shard.content,
                    "version",
                    version,
                    "updated",
                    shard.updated_ms,
                    "ac",
                    shard.attempt_count,
                    "del",
                    "1" if shard.deleted else "0",
                    "head",
                    shard.head_hash,
                    "hmin",
                    hmin,
                    "hbytes",
                    hbytes,
                ]
            )
        return out


def _as_dict(reply: Any) -> dict[str, str]:
    """A hash or WITHSCORES reply (a dict, or a flat or paired list) as a dict."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply or [])
    if items and isinstance(items[0], list | tuple):
        return {str(k): str(v) for k, v in items}
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items), 2)}
