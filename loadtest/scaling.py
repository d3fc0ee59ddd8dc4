"""Commit-cost scaling: explicit read-set size, and the number of stored shards.

``readset``: per-commit latency with an explicit read set of 1, 8 and 64 keys (all of
them unchanged, so every commit is admitted), sequential, the sizes interleaved
round-robin so machine noise hits them alike. Measured two ways per store:

* ``inproc``: ``store.apply(commit_txn(...))`` against the store object
  (``open_store(url, Limits())``), no HTTP, no Bus;
* ``http``: ``POST /commit`` to one ``sbus serve`` (1 worker) over one connection.

Target: a 64-entry read set costs <= 2x a 1-entry one (validation batched).

``shards``: bulk-loads shards straight into the store (PostgreSQL: INSERT ... SELECT
generate_series into sbus_shards and sbus_history; Redis: pipelined HSET/ZADD in the
layout of docs/redis.md), growing to each size in turn, and at each size measures
``store.apply`` latency of single-key commits on shards picked at random among all of
them (a fresh agent per commit, so no DeliveryLog grows). Target: p50 within 1.3x from
1,000 to 1,000,000 shards.

Every phase is bounded by ``--max-seconds``; PostgreSQL is migrated (``sbus migrate``)
and every store is wiped (``reset_all``) first.

    scripts/with-services.sh .venv/bin/python loadtest/scaling.py readset
    scripts/with-services.sh .venv/bin/python loadtest/scaling.py shards --store postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from redis.asyncio import Redis

from bench import (
    ENV_URLS,
    Deployment,
    free_port,
    prepare_store,
    sbus_command,
    stop_deployment,
    store_kind,
    wait_ready,
)
from cas import asyncpg_dsn
from sbus.core.chain import GENESIS, content_id
from sbus.core.engine import commit_txn, new_commit_id
from sbus.core.store import Store
from sbus.core.types import CreateOp, Limits, ReadItem, WriteOp
from sbus.storage.factory import open_store

CONTENT = "x" * 64
READ_KEYS = 64
HEX64 = "ab" * 32
RS_TARGET = 2.0
SHARDS_TARGET = 1.3


@dataclass(frozen=True)
class Stat:
    store: str
    mode: str
    size: int  # read-set entries, or stored shards
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    load_s: float | None = None  # shards: seconds the bulk load took


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def stat(store: str, mode: str, size: int, lat: list[float], load_s: float | None = None) -> Stat:
    return Stat(
        store,
        mode,
        size,
        len(lat),
        pct(lat, 0.5),
        pct(lat, 0.99),
        statistics.fmean(lat) if lat else float("nan"),
        load_s,
    )


def resolve(kind: str, workdir: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'scaling.db'}"
    url = os.environ.get(ENV_URLS.get(kind, ""), "")
    if not url:
        raise SystemExit(f"scaling: {kind} needs {ENV_URLS.get(kind)} (scripts/with-services.sh)")
    return url


async def open_started(url: str) -> Store:
    store = open_store(url, Limits())
    await store.start()
    await store.reset_all()
    return store


def txn(agent: str, key: str, version: int, reads: list[ReadItem]) -> Any:
    return commit_txn(
        op="commit",
        agent_id=agent,
        session_id="",
        writes=[WriteOp(key, version, "commit", CONTENT)],
        read_set=reads,
        rationale=None,
        idem=None,
    )


# ----------------------------------------------------------------------------- read set


async def readset_inproc(
    kind: str, url: str, sizes: list[int], reps: int, max_s: float
) -> list[Stat]:
    store = await open_started(url)
    try:
        for i in range(READ_KEYS):
            await store.create(CreateOp(f"rs/{i}", CONTENT, "", False, "setup", new_commit_id()))
        for n in sizes:
            await store.create(CreateOp(f"own/{n}", CONTENT, "", False, "setup", new_commit_id()))
        versions = dict.fromkeys(sizes, 0)
        lat: dict[int, list[float]] = {n: [] for n in sizes}
        reads = {n: [ReadItem(f"rs/{i}", 0) for i in range(n)] for n in sizes}
        deadline = time.perf_counter() + max_s
        for rep in range(reps + 20):
            if time.perf_counter() > deadline:
                break
            order = sizes[rep % len(sizes) :] + sizes[: rep % len(sizes)]
            for n in order:
                t = txn("rs-agent", f"own/{n}", versions[n], reads[n])
                t0 = time.perf_counter()
                out = await store.apply(t)
                dt = (time.perf_counter() - t0) * 1000
                assert out.status == 200 and out.body is not None, out
                versions[n] = out.body["new_version"]
                if rep >= 20:  # the first rounds warm caches and prepared statements
                    lat[n].append(dt)
        return [stat(kind, "inproc", n, lat[n]) for n in sizes]
    finally:
        await store.reset_all()
        await store.close()


def spawn_server(kind: str, url: str, workdir: Path) -> Deployment:
    """One ``sbus serve`` with 1 worker (the HTTP read-set measurement is sequential)."""
    port = free_port()
    env = dict(os.environ, SBUS_ADMIN_ENABLED="1", SBUS_HOST="127.0.0.1")
    cmd = [*sbus_command(), "serve", "--port", str(port), "--store", url, "--workers", "1"]
    log = (workdir / f"server-{kind}.log").open("wb")
    dep = Deployment(urls=[f"http://127.0.0.1:{port}"], store=url, workers=1)
    dep.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return dep


async def readset_http(
    kind: str, url: str, sizes: list[int], reps: int, max_s: float, workdir: Path
) -> list[Stat]:
    dep = spawn_server(kind, url, workdir)
    base = dep.urls[0]
    headers = {"content-type": "application/json"}
    try:
        await wait_ready(dep)
        async with httpx.AsyncClient(timeout=10.0) as c:

            async def post(path: str, body: dict[str, Any]) -> httpx.Response:
                return await c.post(f"{base}{path}", content=orjson.dumps(body), headers=headers)

            r = await post("/admin/reset", {})
            assert r.status_code == 200, r.text
            keys = [f"rs/{i}" for i in range(READ_KEYS)] + [f"own/{n}" for n in sizes]
            for key in keys:
                r = await post("/shard", {"key": key, "content": CONTENT, "agent_id": "setup"})
                assert r.status_code == 201, r.text
            versions = dict.fromkeys(sizes, 0)
            lat: dict[int, list[float]] = {n: [] for n in sizes}
            reads = {n: [{"key": f"rs/{i}", "version_at_read": 0} for i in range(n)] for n in sizes}
            deadline = time.perf_counter() + max_s
            for rep in range(reps + 20):
                if time.perf_counter() > deadline:
                    break
                order = sizes[rep % len(sizes) :] + sizes[: rep % len(sizes)]
                for n in order:
                    body = {
                        "key": f"own/{n}",
                        "expected_version": versions[n],
                        "delta": CONTENT,
                        "agent_id": "rs-agent",
                        "read_set": reads[n],
                    }
                    t0 = time.perf_counter()
                    r = await post("/commit", body)
                    dt = (time.perf_counter() - t0) * 1000
                    assert r.status_code == 200, r.text
                    versions[n] = orjson.loads(r.content)["new_version"]
                    if rep >= 20:
                        lat[n].append(dt)
            await post("/admin/reset", {})
        return [stat(kind, "http", n, lat[n]) for n in sizes]
    finally:
        dep.workdir = None
        stop_deployment(dep)


# ----------------------------------------------------------------------------- shard count


def bulk_key(i: int) -> str:
    return f"bulk/{i:07d}"


async def bulk_postgres(url: str, start: int, stop: int) -> None:
    """Rows ``start .. stop-1`` as the store writes a create: version 0, one history
    entry, hist_min_version 0, hist_bytes = size."""
    conn = await asyncpg.connect(asyncpg_dsn(url), timeout=10, command_timeout=900)
    try:
        now = int(time.time() * 1000)
        size = len(CONTENT.encode())
        key = "'bulk/' || lpad(g::text, 7, '0')"
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO sbus_shards (key, id, content, version, goal_tag, require_mandate, "
                "created_ms, updated_ms, attempt_count, conflict_count, deleted, head_hash, "
                "hist_min_version, hist_bytes) "
                f"SELECT {key}, $3, $4, 0, '', false, $5, $5, 0, 0, false, $6, 0, $7 "
                "FROM generate_series($1::int, $2::int) AS g",
                start,
                stop - 1,
                content_id(CONTENT),
                CONTENT,
                now,
                HEX64,
                size,
            )
            await conn.execute(
                "INSERT INTO sbus_history (key, version, agent_id, committed_ms, content, "
                "deleted, rationale, commit_id, prev_hash, hash, size) "
                f"SELECT {key}, 0, 'bulk', $3, $4, false, 'create', 'bulk-' || g, $5, $6, $7 "
                "FROM generate_series($1::int, $2::int) AS g",
                start,
                stop - 1,
                now,
                CONTENT,
                GENESIS,
                HEX64,
                size,
            )
        await conn.execute("ANALYZE sbus_shards")
        await conn.execute("ANALYZE sbus_history")
    finally:
        await conn.close()


async def bulk_redis(url: str, start: int, stop: int, namespace: str = "sbus") -> None:
    """Pipelined HSET/ZADD in the layout of docs/redis.md (T:s:<key>, T:h:<key> with
    m0/c0, T:live and T:shards)."""
    tag = "{sbus:" + namespace + "}"
    client = Redis.from_url(url, decode_responses=True, socket_timeout=60)
    now = int(time.time() * 1000)
    meta = orjson.dumps(
        {
            "version": 0,
            "agent_id": "bulk",
            "committed_ms": now,
            "deleted": False,
            "rationale": "create",
            "commit_id": "bulk",
            "prev_hash": GENESIS,
            "hash": HEX64,
        }
    ).decode()
    row: dict[Any, Any] = {
        "id": content_id(CONTENT),
        "content": CONTENT,
        "version": "0",
        "goal": "",
        "mand": "0",
        "created": str(now),
        "updated": str(now),
        "ac": "0",
        "cc": "0",
        "del": "0",
        "head": HEX64,
        "hmin": "0",
        "hbytes": str(len(CONTENT.encode())),
    }
    try:
        batch = 5000
        for lo in range(start, stop, batch):
            hi = min(stop, lo + batch)
            pipe = client.pipeline(transaction=False)
            members: dict[str, float] = {}
            for i in range(lo, hi):
                k = bulk_key(i)
                pipe.hset(f"{tag}:s:{k}", mapping=row)
                pipe.hset(f"{tag}:h:{k}", mapping={"m0": meta, "c0": CONTENT})
                members[k] = 0
            pipe.zadd(f"{tag}:live", members)
            pipe.zadd(f"{tag}:shards", members)
            await pipe.execute()
    finally:
        await client.aclose()


async def shards_run(
    kind: str, url: str, sizes: list[int], commits: int, max_s: float
) -> list[Stat]:
    store = await open_started(url)
    out: list[Stat] = []
    try:
        loaded = 0
        versions: dict[str, int] = {}
        rng = random.Random(7)
        serial = 0
        for size in sizes:
            t_load = time.perf_counter()
            if kind == "postgres":
                await asyncio.wait_for(bulk_postgres(url, loaded, size), 900)
            elif kind == "redis":
                await asyncio.wait_for(bulk_redis(url, loaded, size), 900)
            else:
                raise SystemExit("scaling shards: postgres or redis")
            load_s = time.perf_counter() - t_load
            loaded = size
            print(f"  {kind}: {size:,} shards loaded in {load_s:.1f}s", file=sys.stderr)
            lat: list[float] = []
            deadline = time.perf_counter() + max_s
            for j in range(commits + 100):
                if time.perf_counter() > deadline:
                    break
                key = bulk_key(rng.randrange(size))
                serial += 1
                t = txn(f"sc-{serial}", key, versions.get(key, 0), [])
                t0 = time.perf_counter()
                res = await store.apply(t)
                dt = (time.perf_counter() - t0) * 1000
                assert res.status == 200 and res.body is not None, res
                versions[key] = res.body["new_version"]
                if j >= 100:
                    lat.append(dt)
            out.append(stat(kind, "inproc", size, lat, load_s))
            print(f"  {kind} @ {size:,}: p50 {out[-1].p50_ms:.2f} ms", file=sys.stderr)
    finally:
        t_reset = time.perf_counter()
        try:
            await store.reset_all()
            print(f"  {kind}: reset in {time.perf_counter() - t_reset:.1f}s", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - report the figures anyway
            # Redis reset_all is one script over the namespace: at 1M shards it outlives
            # the client's socket timeout (it still completes inside Redis).
            print(
                f"  {kind}: reset_all failed after {time.perf_counter() - t_reset:.1f}s: {exc}",
                file=sys.stderr,
            )
        await store.close()
    return out


# ----------------------------------------------------------------------------- output


def ratio_lines(stats: list[Stat], what: str, target: float) -> Iterator[str]:
    groups: dict[tuple[str, str], list[Stat]] = {}
    for s in stats:
        groups.setdefault((s.store, s.mode), []).append(s)
    for (store, mode), group in groups.items():
        lo, hi = min(group, key=lambda s: s.size), max(group, key=lambda s: s.size)
        r50 = hi.p50_ms / lo.p50_ms if lo.p50_ms else float("nan")
        rmean = hi.mean_ms / lo.mean_ms if lo.mean_ms else float("nan")
        verdict = "met" if r50 <= target else "MISSED"
        yield (
            f"{store:<9}{mode:<8} {what} {hi.size:,} vs {lo.size:,}: p50 x{r50:.2f}, "
            f"mean x{rmean:.2f}  (target <= {target}x: {verdict})"
        )


def print_table(stats: list[Stat], label: str) -> None:
    print(f"{'store':<9}{'mode':<8}{label:>10}{'n':>7}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for s in stats:
        load = f"  (loaded in {s.load_s:.1f}s)" if s.load_s is not None else ""
        print(
            f"{s.store:<9}{s.mode:<8}{s.size:>10,}{s.n:>7}{s.p50_ms:>9.3f}{s.p99_ms:>9.3f}"
            f"{s.mean_ms:>9.3f}{load}"
        )


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sbus-scaling-"))
    stats: list[Stat] = []
    load_before = loadavg()
    try:
        if args.cmd == "readset":
            sizes = [int(x) for x in args.sizes.split(",")]
            if max(sizes) > READ_KEYS:
                raise SystemExit(f"scaling: read sets up to {READ_KEYS}")
            for kind in args.stores.split(","):
                url = resolve(kind, workdir)
                prepare_store(url)
                modes = args.modes.split(",")
                if "inproc" in modes:
                    stats += await readset_inproc(kind, url, sizes, args.reps, args.max_seconds)
                if "http" in modes:
                    stats += await readset_http(
                        kind, url, sizes, args.reps, args.max_seconds, workdir
                    )
                print(f"  {kind}: done", file=sys.stderr)
        else:
            sizes = [int(x) for x in args.sizes.split(",")]
            url = resolve(args.store, workdir)
            if store_kind(url) not in ("postgres", "redis"):
                raise SystemExit("scaling shards: --store postgres or redis")
            prepare_store(url)
            stats += await shards_run(args.store, url, sizes, args.commits, args.max_seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        doc = {
            "cmd": args.cmd,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "stats": [asdict(s) for s in stats],
        }
        print(json.dumps(doc, indent=2))
        return 0
    if args.cmd == "readset":
        print(f"S-Bus read-set scaling: sequential commits, {args.reps} per size, interleaved")
        print_table(stats, "read set")
        print()
        for line in ratio_lines(stats, "read set", RS_TARGET):
            print(line)
    else:
        print(f"S-Bus shard-count scaling: store.apply on random shards, {args.commits} per size")
        print_table(stats, "shards")
        print()
        for line in ratio_lines(stats, "shards", SHARDS_TARGET):
            print(line)
    print(f"load average before/after: {load_before} / {loadavg()} (2 cores is 2.0)")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rs = sub.add_parser("readset", help="commit latency vs explicit read-set size")
    rs.add_argument("--stores", default="memory,sqlite,postgres,redis")
    rs.add_argument("--modes", default="inproc,http", help="inproc, http or both")
    rs.add_argument("--sizes", default="1,8,64")
    rs.add_argument("--reps", type=int, default=300, help="commits per size")
    rs.add_argument("--max-seconds", type=float, default=60.0, help="cap per store and mode")
    sh = sub.add_parser("shards", help="commit latency vs number of stored shards")
    sh.add_argument("--store", default="postgres", choices=("postgres", "redis"))
    sh.add_argument("--sizes", default="1000,100000,1000000")
    sh.add_argument("--commits", type=int, default=2000, help="measured commits per size")
    sh.add_argument("--max-seconds", type=float, default=60.0, help="cap per size (commits)")
    for q in (rs, sh):
        q.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.max_seconds <= 0 or args.max_seconds > 600:
        p.error("--max-seconds must be in (0, 600]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(amain(args))
    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
