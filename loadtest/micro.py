"""In-process micro-benchmark of the commit engine on the memory store (no HTTP).

Measures ``Bus.execute`` of a ``Submit`` end to end (the command's construction and the
rights check of an open-mode caller included) for single-key commits in three shapes:

* ``rs4+dl``: the target workload. The committing agent has read 4 shared shards and
  its own shard through the store (5 live DeliveryLog entries) and sends the same 4
  shared shards as an explicit ``read_set``, so the effective read set holds 4 keys
  checked twice (explicit + DL) and the written key is excluded from both.
* ``dl-only``: the same DeliveryLog, no explicit read set.
* ``blind``: no read set and an empty DeliveryLog (the floor of the commit path).

Each repetition runs a fixed number of commits round-robin over the agents and is
also capped in wall time; the table reports the median over repetitions, with the
best and worst, as commits/s and microseconds per commit. Target: >= 40,000
commits/s (<= 25 us) for ``rs4+dl``.

    .venv/bin/python loadtest/micro.py [--commits 20000] [--reps 7] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from sbus.core.commands import Caller, Submit
from sbus.core.engine import Bus, new_commit_id
from sbus.core.rights import open_capabilities
from sbus.core.types import CreateOp, ReadItem, WriteOp
from sbus.storage.memory import MemoryStore

TARGET_PER_S = 40_000.0
SHARED = 4
CONTENT = "x" * 64


@dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    commits: int
    reps: int
    median_per_s: float
    best_per_s: float
    worst_per_s: float
    median_us: float
    stdev_us: float
    median_cpu_us: float  # process CPU time per commit: robust to CPU contention


async def _setup(agents: int, read_shared: bool, read_own: bool) -> tuple[Bus, list[int]]:
    bus = Bus(MemoryStore())
    for i in range(SHARED):
        await bus.store.create(
            CreateOp(f"shared/{i}", CONTENT, "", False, "setup", new_commit_id())
        )
    for a in range(agents):
        await bus.store.create(CreateOp(f"own/{a}", CONTENT, "", False, "setup", new_commit_id()))
    for a in range(agents):
        agent = f"agent-{a}"
        if read_shared:
            for i in range(SHARED):
                await bus.store.read(f"shared/{i}", agent, "", True)
        if read_own:
            await bus.store.read(f"own/{a}", agent, "", True)
    return bus, [0] * agents


async def _one_rep(
    scenario: str, commits: int, agents: int, max_seconds: float
) -> tuple[int, float, float]:
    """Run up to ``commits`` commits; returns (commits done, wall seconds, CPU seconds)."""
    with_dl = scenario != "blind"
    bus, versions = await _setup(agents, read_shared=with_dl, read_own=with_dl)
    shared = [ReadItem(f"shared/{i}", 0) for i in range(SHARED)]
    read_set = tuple(shared) if scenario == "rs4+dl" else ()
    caps = open_capabilities(admin_enabled=False)
    callers = [Caller(f"agent-{a}", "", caps, token_bound=False) for a in range(agents)]
    keys = [f"own/{a}" for a in range(agents)]
    execute = bus.execute
    deadline = time.perf_counter() + max_seconds
    done = 0
    cpu_start = time.process_time()
    start = time.perf_counter()
    while done < commits:
        a = done % agents
        outcome = await execute(
            callers[a],
            Submit(
                op="commit",
                writes=(WriteOp(keys[a], versions[a], "commit", CONTENT),),
                read_set=read_set,
                rationale=None,
                idem=None,
            ),
        )
        assert outcome.body is not None
        versions[a] = outcome.body["new_version"]
        done += 1
        if done % 1024 == 0 and time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - start
    return done, elapsed, time.process_time() - cpu_start


def run(scenario: str, commits: int, reps: int, agents: int, max_seconds: float) -> Result:
    rates: list[float] = []
    micros: list[float] = []
    cpu_micros: list[float] = []
    total = 0
    asyncio.run(_one_rep(scenario, min(commits, 2000), agents, max_seconds))  # warm-up
    for _ in range(reps):
        gc.collect()
        done, elapsed, cpu = asyncio.run(_one_rep(scenario, commits, agents, max_seconds))
        cpu_micros.append(cpu / done * 1e6)
        total += done
        rates.append(done / elapsed)
        micros.append(elapsed / done * 1e6)
    return Result(
        scenario=scenario,
        commits=total,
        reps=reps,
        median_per_s=statistics.median(rates),
        best_per_s=max(rates),
        worst_per_s=min(rates),
        median_us=statistics.median(micros),
        stdev_us=statistics.stdev(micros) if len(micros) > 1 else 0.0,
        median_cpu_us=statistics.median(cpu_micros),
    )


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=20_000, help="commits per repetition")
    parser.add_argument("--reps", type=int, default=7, help="repetitions (median reported)")
    parser.add_argument("--agents", type=int, default=16, help="agents, one own shard each")
    parser.add_argument(
        "--max-seconds", type=float, default=10.0, help="wall-time cap per repetition"
    )
    parser.add_argument(
        "--scenarios",
        default="rs4+dl,dl-only,blind",
        help="comma-separated subset of rs4+dl, dl-only, blind",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in ("rs4+dl", "dl-only", "blind"):
            parser.error(f"unknown scenario {s!r}")
    results = [run(s, args.commits, args.reps, args.agents, args.max_seconds) for s in scenarios]
    if args.json:
        print(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "target_per_s": TARGET_PER_S,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
        return 0
    print(
        f"S-Bus engine micro-benchmark: memory store, no HTTP, Python {platform.python_version()}"
    )
    print(f"{args.commits} commits x {args.reps} reps, {args.agents} agents; median reported\n")
    header = (
        f"{'scenario':<9} {'commits/s':>10} {'best':>10} {'worst':>10} "
        f"{'us/commit':>10} {'stdev us':>9} {'cpu us':>7}  target"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = ""
        if r.scenario == "rs4+dl":
            verdict = "met" if r.median_per_s >= TARGET_PER_S else "MISSED"
        print(
            f"{r.scenario:<9} {r.median_per_s:>10,.0f} {r.best_per_s:>10,.0f} "
            f"{r.worst_per_s:>10,.0f} {r.median_us:>10.2f} {r.stdev_us:>9.2f} "
            f"{r.median_cpu_us:>7.2f}  {verdict}"
        )
    print(f"\ntarget: rs4+dl >= {TARGET_PER_S:,.0f} commits/s (<= {1e6 / TARGET_PER_S:.0f} us)")
    print("cpu us: process CPU time per commit (less sensitive to noisy neighbours than wall)")
    print(f"load average: {_loadavg()} (2 cores is 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
