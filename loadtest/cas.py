"""The database's raw compare-and-swap rate, driven directly from Python (no S-Bus).

The reference that ``bench.py`` puts beside the bus's dedicated-shard figure, measured in
the same run:

* PostgreSQL: asyncpg, ``UPDATE t SET v = $2, version = version + 1 WHERE k = $1 AND
  version = $3`` over ``concurrency`` connections (default 64), each on its own row of a
  scratch table (created, then dropped);
* Redis: redis-py asyncio, EVALSHA of the equivalent Lua CAS (HGET version, compare,
  HSET value and version + 1) from ``concurrency`` tasks over a pool of as many
  connections, each on its own key under a scratch hash tag (deleted afterwards).

Every CAS is expected to succeed (one writer per row); a failed one is counted and the
version re-read. The measured window follows a warm-up, like bench.py's phases.

    .venv/bin/python loadtest/cas.py --store-url postgresql+asyncpg://postgres@127.0.0.1:PORT/postgres
    .venv/bin/python loadtest/cas.py --store-url redis://127.0.0.1:PORT/0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import asyncpg
from redis.asyncio import BlockingConnectionPool, Redis

CAS_LUA = """
local v = redis.call('HGET', KEYS[1], 'version')
if v == ARGV[2] then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'version', tostring(tonumber(v) + 1))
  return 1
end
return 0
"""
VALUE = "x" * 64


@dataclass(frozen=True)
class CasResult:
    name: str
    seconds: float
    ops_per_s: float
    ok: int
    failed: int
    p50_ms: float
    p99_ms: float
    client_cpu_util: float
    db_cpu_util: float | None = None


@dataclass
class _Tally:
    ok: int = 0
    failed: int = 0
    latency_ms: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1).replace(
        "postgres://", "postgresql://", 1
    )


async def _drive(
    name: str,
    seconds: float,
    warmup: float,
    concurrency: int,
    one: Callable[[int], Awaitable[bool]],
    probe: Callable[[], float | None] | None = None,
) -> CasResult:
    """Run ``concurrency`` loops of ``one(i)`` (an async callable returning True on a
    successful CAS) for warm-up + seconds; count those started inside the window."""
    tally = _Tally()
    start = time.perf_counter() + warmup
    end = start + seconds

    async def loop(i: int) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            ok = await one(i)
            if start <= t0:
                tally.latency_ms.append((time.perf_counter() - t0) * 1000)
                if ok:
                    tally.ok += 1
                else:
                    tally.failed += 1

    cpu = [0.0, 0.0]
    db: list[float | None] = [None, None]

    async def sample() -> None:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu[0] = time.process_time()
        db[0] = probe() if probe else None
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        cpu[1] = time.process_time()
        db[1] = probe() if probe else None

    await asyncio.wait_for(
        asyncio.gather(sample(), *(loop(i) for i in range(concurrency))), warmup + seconds + 30
    )
    return CasResult(
        name=name,
        seconds=seconds,
        ops_per_s=tally.ok / seconds,
        ok=tally.ok,
        failed=tally.failed,
        p50_ms=_percentile(tally.latency_ms, 0.5),
        p99_ms=_percentile(tally.latency_ms, 0.99),
        client_cpu_util=(cpu[1] - cpu[0]) / seconds,
        db_cpu_util=None if db[0] is None or db[1] is None else (db[1] - db[0]) / seconds,
    )


async def postgres_cas(
    url: str,
    seconds: float,
    warmup: float,
    concurrency: int = 64,
    probe: Callable[[], float | None] | None = None,
) -> CasResult:
    dsn = asyncpg_dsn(url)
    table = f"sbus_bench_cas_{os.getpid()}"
    conns = [await asyncpg.connect(dsn, timeout=10) for _ in range(concurrency)]
    try:
        admin = conns[0]
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.execute(
            f"CREATE TABLE {table} (k text PRIMARY KEY, v text NOT NULL, version bigint NOT NULL)"
        )
        await admin.executemany(
            f"INSERT INTO {table} (k, v, version) VALUES ($1, $2, 0)",
            [(f"k{i}", VALUE) for i in range(concurrency)],
        )
        versions = [0] * concurrency
        sql = f"UPDATE {table} SET v = $2, version = version + 1 WHERE k = $1 AND version = $3"
        reread = f"SELECT version FROM {table} WHERE k = $1"

        async def one(i: int) -> bool:
            # execute() with arguments uses asyncpg's prepared-statement cache and
            # returns the command status, which carries the row count.
            status = await conns[i].execute(sql, f"k{i}", VALUE, versions[i])
            if status == "UPDATE 1":
                versions[i] += 1
                return True
            versions[i] = await conns[i].fetchval(reread, f"k{i}")
            return False

        try:
            return await _drive("postgres raw CAS", seconds, warmup, concurrency, one, probe)
        finally:
            await admin.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        for c in conns:
            await c.close()


async def redis_cas(
    url: str,
    seconds: float,
    warmup: float,
    concurrency: int = 64,
    probe: Callable[[], float | None] | None = None,
) -> CasResult:
    pool = BlockingConnectionPool.from_url(
        url, max_connections=concurrency, timeout=10, decode_responses=True
    )
    client = Redis(connection_pool=pool)
    tag = f"{{sbus-bench-cas-{os.getpid()}}}"
    keys = [f"{tag}:k{i}" for i in range(concurrency)]
    try:
        sha = await client.script_load(CAS_LUA)
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.hset(k, mapping={"v": VALUE, "version": "0"})
        await pipe.execute()
        versions = [0] * concurrency

        async def one(i: int) -> bool:
            ok = await client.evalsha(sha, 1, keys[i], VALUE, str(versions[i]))
            if ok == 1:
                versions[i] += 1
                return True
            versions[i] = int(await client.hget(keys[i], "version") or 0)
            return False

        # Open the connections before measuring.
        await asyncio.gather(*(client.ping() for _ in range(concurrency)))
        try:
            return await _drive("redis raw CAS (EVALSHA)", seconds, warmup, concurrency, one, probe)
        finally:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def raw_cas(
    url: str,
    seconds: float,
    warmup: float,
    concurrency: int = 64,
    probe: Callable[[], float | None] | None = None,
) -> CasResult:
    if url.startswith(("postgresql", "postgres://")):
        return await postgres_cas(url, seconds, warmup, concurrency, probe)
    if url.startswith("redis://"):
        return await redis_cas(url, seconds, warmup, concurrency, probe)
    raise ValueError(f"no raw CAS reference for {url!r} (PostgreSQL and Redis only)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--store-url", required=True, help="postgresql+asyncpg://... or redis://...")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args(argv)
    if not 0 < args.seconds <= 600:
        p.error("--seconds must be in (0, 600]")
    r = asyncio.run(raw_cas(args.store_url, args.seconds, args.warmup, args.concurrency))
    for k, v in asdict(r).items():
        print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
