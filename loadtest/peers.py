"""The bus against the peers users would pick instead, in one run (``make peers``).

    .venv/bin/python loadtest/peers.py                # the full comparison, several minutes
    .venv/bin/python loadtest/peers.py --quick        # every row, short phases (~1 minute)
    .venv/bin/python loadtest/peers.py --parts peers --stores redis --seconds 20

It installs etcd (Debian's etcd-server) if missing, starts etcd, a durable PostgreSQL and a
durable Redis in a temporary directory (peerlib.py), then runs these parts:

``peers``: for each store (SQLite with 1 bus worker, Redis and PostgreSQL with
``--bus-workers``, 2), etcd's phases and then the bus's, back to back, so each ratio
compares two systems measured one right after the other. One stdlib client for all
(loop.py): ``--clients`` (32) closed-loop clients in ``--procs`` (2) processes, a phase is
``--warmup`` s unmeasured then ``--seconds`` (8) s; a cycle is a recorded GET then a commit
at the version read (etcd: a range read, then a txn comparing the mod_revision).
``dedicated``: one key per client; ``hot``: one key for all (goodput: successful commits/s).
Server CPU per cycle is read from the process trees' counters over the window, the bus's
and the store's separately (SQLite runs inside the bus). The generator's CPU share is
reported; a generator process using 90% of a core or more is saturated, and the table
says so. ``--openloop`` then runs openloop.py at half the measured dedicated peak on SQLite
and Redis (commit latency from the scheduled send).

``sweep``: the contention sweep against the bench-only baselines of loadtest/baselines/
(PostgreSQL SERIALIZABLE, Redis WATCH/MULTI) and the bus on the same servers: for each
agent count of ``--sweep-agents`` and each topology (``shared``: one key, ``dedicated``:
one key each), goodput, conflict rate (409s / cycles) and lost updates (commits
acknowledged minus the final counter in the content, which each commit increments).

``workers``: dedicated-key throughput and CPU of the bus with each ``--workers-sweep``
count on PostgreSQL and Redis (1 -> 2 on this machine; give ``1,2,4,8`` on a bigger one).

Results: the tables on stdout, and ``--out`` (loadtest/out/) ``peers.json``, which
plot_peers.py turns into PNGs. Loopback only; every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from peerlib import (
    ServerProc,
    free_port,
    migrate,
    sbus_command,
    start_bus,
    start_etcd,
    start_postgres,
    start_redis,
)

HERE = Path(__file__).resolve().parent
LOOP = HERE / "loop.py"
OPENLOOP = HERE / "openloop.py"
BASELINE_SERVE = HERE / "baselines" / "serve.py"
STORES = ("sqlite", "redis", "postgres")
PARTS = ("peers", "sweep", "workers")
SATURATED = 0.9  # a generator process busier than this share of a core limits the figures
LAT_POINTS = 200  # latency quantiles kept per phase in peers.json (the CDF plots)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def quantiles(values: list[float], n: int = LAT_POINTS) -> list[float]:
    if not values:
        return []
    ordered = sorted(values)
    return [
        ordered[min(len(ordered) - 1, round(i * (len(ordered) - 1) / (n - 1)))] for i in range(n)
    ]


@dataclass
class Phase:
    """One measured phase of one system."""

    system: str
    phase: str
    clients: int
    seconds: float
    cycles: int
    commits: int
    conflicts: int
    errors: int
    commits_per_s: float
    conflict_rate: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms: dict[str, float]  # per cycle, by process tree ("bus", "store", "etcd")
    gen_cores: float  # generator CPU over the window, in cores
    gen_max_core: float  # the busiest generator process, share of one core
    lost_updates: int | None = None
    latency_quantiles_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def cpu_ms(self) -> float:
        return sum(self.server_cpu_ms.values())

    @property
    def saturated(self) -> bool:
        return self.gen_max_core >= SATURATED


# --------------------------------------------------------------------------- HTTP set-up


def _http(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def make_keys(system: str, url: str, keys: list[str]) -> None:
    """Create each key with the counter "0"."""
    for key in sorted(set(keys)):
        if system == "etcd":
            enc = base64.b64encode(key.encode()).decode()
            status, body = _http(url, "POST", "/v3/kv/put", {"key": enc, "value": "MA=="})
            ok = status == 200
        else:
            status, body = _http(url, "POST", "/shard", {"key": key, "content": "0"} | AGENT)
            ok = status == 201
        if not ok:
            raise RuntimeError(f"create {key} on {system}: {status} {body}")


AGENT = {"agent_id": "peers-setup"}


def final_counters(url: str, keys: list[str]) -> dict[str, int]:
    out = {}
    for key in sorted(set(keys)):
        status, body = _http(url, "GET", f"/shard/{key}")
        if status != 200:
            raise RuntimeError(f"final read of {key}: {status} {body}")
        out[key] = int(body["content"] or 0)
    return out


# --------------------------------------------------------------------------- one phase


def run_phase(
    system: str,
    url: str,
    phase: str,
    assignments: list[tuple[str, str]],
    args: argparse.Namespace,
    trees: dict[str, ServerProc],
    seconds: float | None = None,
    check_lost: bool = False,
) -> Phase:
    """Run the closed loop on ``assignments`` (key, agent per client) split over
    ``args.procs`` processes; CPU of ``trees`` (name -> server) over the window."""
    seconds = seconds if seconds is not None else args.seconds
    make_keys(system, url, [k for k, _ in assignments])
    launch = time.time() + 0.5
    start = launch + args.warmup
    end = start + seconds
    procs: list[subprocess.Popen[str]] = []
    for p in range(args.procs):
        mine = assignments[p :: args.procs]
        if not mine:
            continue
        cfg = {"system": system, "url": url, "keys": mine, "start": start, "end": end}
        cfg |= {"stop": end, "timeout": args.timeout}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(LOOP), json.dumps(cfg)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    time.sleep(max(0.0, start - time.time()))
    cpu0 = {name: server.cpu() for name, server in trees.items()}
    time.sleep(max(0.0, end - time.time()))
    cpu1 = {name: server.cpu() for name, server in trees.items()}
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.timeout + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"loop.py exited {proc.returncode}")
        results.append(json.loads(out))
    cycles = sum(r["cycles"] for r in results)
    commits = sum(r["commits"] for r in results)
    conflicts = sum(r["conflicts"] for r in results)
    latencies = [x for r in results for x in r["latencies_ms"]]
    lost = None
    if check_lost:
        acked: dict[str, int] = {}
        for r in results:
            for k, n in r["commits_by_key"].items():
                acked[k] = acked.get(k, 0) + n
        final = final_counters(url, list(acked))
        lost = sum(acked[k] - final[k] for k in acked)
    per_cycle = max(cycles, 1)
    return Phase(
        system=system,
        phase=phase,
        clients=len(assignments),
        seconds=seconds,
        cycles=cycles,
        commits=commits,
        conflicts=conflicts,
        errors=sum(r["errors"] for r in results),
        commits_per_s=commits / seconds,
        conflict_rate=conflicts / per_cycle,
        p50_ms=percentile(latencies, 0.5),
        p99_ms=percentile(latencies, 0.99),
        server_cpu_ms={n: (cpu1[n] - cpu0[n]) * 1000 / per_cycle for n in trees},
        gen_cores=sum(r["cpu_s"] for r in results) / seconds,
        gen_max_core=max((r["cpu_s"] for r in results), default=0.0) / seconds,
        lost_updates=lost,
        latency_quantiles_ms=quantiles(latencies),
        error_samples=[s for r in results for s in r["error_samples"]][:5],
    )


def dedicated(tag: str, n: int) -> list[tuple[str, str]]:
    return [(f"{tag}/own/{i}", f"{tag}-agent-{i}") for i in range(n)]


def shared(tag: str, n: int) -> list[tuple[str, str]]:
    return [(f"{tag}/hot", f"{tag}-agent-{i}") for i in range(n)]


# --------------------------------------------------------------------------- deployments


@dataclass
class Services:
    root: Path
    etcd: ServerProc
    postgres: ServerProc
    redis: ServerProc


@contextmanager
def services(root: Path, need_pg: bool, need_redis: bool) -> Iterator[Services]:
    with ExitStack() as stack:
        etcd = start_etcd(root)
        stack.callback(etcd.stop)
        pg = redis = ServerProc("none", "", [])
        if need_pg:
            pg = start_postgres(root)
            stack.callback(pg.stop)
            migrate(pg.url)
        if need_redis:
            redis = start_redis(root)
            stack.callback(redis.stop)
        yield Services(root, etcd, pg, redis)


def bus_command(kind: str) -> list[str]:
    """``sbus serve`` for the bus, the baselines' script for ``serializable``/``watch``."""
    if kind in ("serializable", "watch"):
        return [sys.executable, str(BASELINE_SERVE), kind]
    return sbus_command()


@contextmanager
def bus(svc: Services, store: str, workers: int, kind: str = "bus") -> Iterator[ServerProc]:
    n = len(list(svc.root.glob("bus-*.log")))
    url = {
        "sqlite": lambda: f"sqlite:///{svc.root / f'bus-{n}.db'}",
        "postgres": lambda: svc.postgres.url,
        "redis": lambda: svc.redis.url,
    }[store]()
    server = start_bus(url, free_port(), workers, svc.root / f"bus-{n}.log", bus_command(kind))
    try:
        yield server
    finally:
        server.stop()


def store_tree(svc: Services, store: str) -> dict[str, ServerProc]:
    return {"postgres": {"store": svc.postgres}, "redis": {"store": svc.redis}}.get(store, {})


# --------------------------------------------------------------------------- parts


def run_store(svc: Services, store: str, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Every part's phases on one store, each bus process started once: the bus (peer
    phases, its sweep points, its workers point), then the store's baseline, then the
    other worker counts."""
    workers = 1 if store == "sqlite" else args.bus_workers
    served = store in ("postgres", "redis")
    with bus(svc, store, workers) as server:
        trees = {"bus": server, **store_tree(svc, store)}
        if "peers" in args.parts:
            peers_row(svc, store, server, workers, args, report)
        if "sweep" in args.parts and served:
            sweep_points(f"bus-{store}", server, trees, args, report)
        if "workers" in args.parts and served and workers in args.workers_sweep:
            workers_point(store, workers, server, trees, args, report)
    if "sweep" in args.parts and served:
        kind = "serializable" if store == "postgres" else "watch"
        with bus(svc, store, args.bus_workers, kind) as baseline:
            trees = {"bus": baseline, **store_tree(svc, store)}
            sweep_points(kind, baseline, trees, args, report)
    if "workers" in args.parts and served:
        for count in args.workers_sweep:
            if count != workers:
                with bus(svc, store, count) as server:
                    trees = {"bus": server, **store_tree(svc, store)}
                    workers_point(store, count, server, trees, args, report)


def peers_row(
    svc: Services,
    store: str,
    server: ServerProc,
    workers: int,
    args: argparse.Namespace,
    report: dict[str, Any],
) -> None:
    """etcd's two phases, then the bus's, back to back."""
    tag = f"p-{store}"
    etcd = {"etcd": svc.etcd}
    row: dict[str, Any] = {"workers": workers}
    row["etcd_dedicated"] = run_phase(
        "etcd", svc.etcd.url, "dedicated", dedicated(f"{tag}-e", args.clients), args, etcd
    )
    row["etcd_hot"] = run_phase(
        "etcd", svc.etcd.url, "hot", shared(f"{tag}-e", args.clients), args, etcd
    )
    trees = {"bus": server, **store_tree(svc, store)}
    row["bus_dedicated"] = run_phase(
        "sbus", server.url, "dedicated", dedicated(tag, args.clients), args, trees
    )
    row["bus_hot"] = run_phase("sbus", server.url, "hot", shared(tag, args.clients), args, trees)
    if args.openloop and store in ("sqlite", "redis"):
        rate = max(1.0, row["bus_dedicated"].commits_per_s * 0.5)
        row["openloop"] = run_openloop(server.url, rate, args)
    report.setdefault("peers", {})[store] = row
    print_peer_row(store, row)


def run_openloop(url: str, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(OPENLOOP), "--url", url, "--rate", f"{rate:.1f}"]
    cmd += ["--seconds", str(args.openloop_seconds), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openloop.py failed: {done.stderr[-1000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def sweep_points(
    name: str,
    server: ServerProc,
    trees: dict[str, ServerProc],
    args: argparse.Namespace,
    report: dict[str, Any],
) -> None:
    points: list[Phase] = report.setdefault("sweep", [])
    for agents in args.sweep_agents:
        for topology in ("shared", "dedicated"):
            tag = f"s-{name}-{agents}-{topology}"
            keys = shared(tag, agents) if topology == "shared" else dedicated(tag, agents)
            phase = run_phase(
                "sbus",
                server.url,
                f"{topology}-{agents}",
                keys,
                args,
                trees,
                seconds=args.sweep_seconds,
                check_lost=True,
            )
            phase.system = name
            points.append(phase)
            print(
                f"sweep {name:>13} {topology:>9} {agents:>3} agents: "
                f"{phase.commits_per_s:8.1f} commits/s  conflicts "
                f"{phase.conflict_rate:5.1%}  lost {phase.lost_updates}  "
                f"errors {phase.errors}",
                flush=True,
            )


def workers_point(
    store: str,
    workers: int,
    server: ServerProc,
    trees: dict[str, ServerProc],
    args: argparse.Namespace,
    report: dict[str, Any],
) -> None:
    points: list[Phase] = report.setdefault("workers", [])
    phase = run_phase(
        "sbus",
        server.url,
        "dedicated",
        dedicated(f"w-{store}-{workers}", args.clients),
        args,
        trees,
    )
    phase.system = f"{store}-{workers}w"
    points.append(phase)
    print(
        f"workers {store:>8} {workers}: {phase.commits_per_s:8.1f} commits/s, "
        f"{phase.cpu_ms:.2f} ms CPU per cycle",
        flush=True,
    )


# --------------------------------------------------------------------------- output


def _r(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_peer_row(store: str, row: dict[str, Any]) -> None:
    bd, bh, ed, eh = row["bus_dedicated"], row["bus_hot"], row["etcd_dedicated"], row["etcd_hot"]
    print(
        f"peers {store}: bus {bd.commits_per_s:.0f} commits/s (etcd {ed.commits_per_s:.0f}), "
        f"hot {bh.commits_per_s:.0f} (etcd {eh.commits_per_s:.0f}), CPU/cycle "
        f"{bd.cpu_ms:.2f} ms (etcd {ed.cpu_ms:.2f})",
        flush=True,
    )


def peer_table(rows: dict[str, Any]) -> list[str]:
    out = [
        "| bus / etcd, same run | commits/s, dedicated keys | goodput, 1 hot key "
        "| server CPU per cycle | CPU ms per cycle: bus + store (etcd) | p99/p50 (etcd) |",
        "|---|---|---|---|---|---|",
    ]
    for store, row in rows.items():
        bd, bh = row["bus_dedicated"], row["bus_hot"]
        ed, eh = row["etcd_dedicated"], row["etcd_hot"]
        workers = f"{row['workers']} worker{'s' if row['workers'] > 1 else ''}"
        cpu = bd.server_cpu_ms
        in_store = _ms(cpu["store"]) if "store" in cpu else "in the bus"
        split = f"{cpu['bus']:.2f} + {in_store} ({ed.cpu_ms:.2f})"
        out.append(
            f"| {store} ({workers}) | {_r(bd.commits_per_s, ed.commits_per_s)} "
            f"| {_r(bh.commits_per_s, eh.commits_per_s)} | {_r(bd.cpu_ms, ed.cpu_ms)} "
            f"| {split} | {bd.p99_ms / bd.p50_ms:.1f} ({ed.p99_ms / ed.p50_ms:.1f}) |"
        )
    out += [
        "",
        "| system | phase | commits/s | conflicts | p50 ms | p99 ms | CPU ms/cycle: bus "
        "| store | etcd | generator cores (busiest process) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for store, row in rows.items():
        for key in ("etcd_dedicated", "etcd_hot", "bus_dedicated", "bus_hot"):
            p: Phase = row[key]
            name = "etcd" if key.startswith("etcd") else f"bus/{store}"
            cpu = p.server_cpu_ms
            sat = " SATURATED" if p.saturated else ""
            out.append(
                f"| {name} | {p.phase} | {p.commits_per_s:.0f} | {p.conflict_rate:.0%} "
                f"| {p.p50_ms:.1f} | {p.p99_ms:.1f} | {_ms(cpu.get('bus'))} "
                f"| {_ms(cpu.get('store'))} | {_ms(cpu.get('etcd'))} "
                f"| {p.gen_cores:.2f} ({p.gen_max_core:.0%}){sat} | {p.errors} |"
            )
    opens = {s: r["openloop"] for s, r in rows.items() if "openloop" in r}
    if opens:
        out += [
            "",
            "| open loop (50% of peak) | rate/s | commit p50 ms | p99 ms | p99.9 ms "
            "| late sends p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for store, o in opens.items():
            out.append(
                f"| {store} | {o['rate']:.0f} | {o['p50_ms']:.1f} | {o['p99_ms']:.1f} "
                f"| {o['p999_ms']:.1f} | {o['late_p99_ms']:.1f} |"
            )
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def sweep_table(points: list[Phase]) -> list[str]:
    out = [
        "| system | topology | agents | goodput/s | conflict rate | lost updates | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        topology, agents = p.phase.split("-")
        out.append(
            f"| {p.system} | {topology} | {agents} | {p.commits_per_s:.0f} "
            f"| {p.conflict_rate:.0%} | {p.lost_updates} | {p.errors} |"
        )
    by = {(p.system, p.phase): p.commits_per_s for p in points}
    ratios = []
    for p in points:
        if p.system == "bus-postgres" and ("serializable", p.phase) in by:
            ratios.append(
                f"{p.phase} bus/serializable {_r(p.commits_per_s, by['serializable', p.phase])}"
            )
        if p.system == "bus-redis" and ("watch", p.phase) in by:
            ratios.append(f"{p.phase} bus/watch {_r(p.commits_per_s, by['watch', p.phase])}")
    return [*out, "", "Goodput ratios: " + "; ".join(ratios)]


def workers_table(points: list[Phase]) -> list[str]:
    out = [
        "| store, workers | commits/s | CPU ms/cycle: bus | store | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for p in points:
        out.append(
            f"| {p.system} | {p.commits_per_s:.0f} | {_ms(p.server_cpu_ms.get('bus'))} "
            f"| {_ms(p.server_cpu_ms.get('store'))} | {p.p99_ms:.1f} |"
        )
    return out


def to_json(report: dict[str, Any]) -> dict[str, Any]:
    def conv(value: Any) -> Any:
        if isinstance(value, Phase):
            return asdict(value)
        if isinstance(value, dict):
            return {k: conv(v) for k, v in value.items()}
        if isinstance(value, list):
            return [conv(v) for v in value]
        return value

    return {k: conv(v) for k, v in report.items()}


# --------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="short phases and fewer sweep points: every row in about a minute",
    )
    ap.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    ap.add_argument("--stores", default=",".join(STORES))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--procs", type=int, default=2, help="generator processes")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--bus-workers", type=int, default=2, help="on PostgreSQL and Redis")
    ap.add_argument("--sweep-agents", default="4,8,16,32,64")
    ap.add_argument("--sweep-seconds", type=float, default=5.0)
    ap.add_argument("--workers-sweep", default="1,2")
    ap.add_argument("--openloop", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--openloop-seconds", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.sweep_seconds = 1.0, 0.5, 1.0
        args.openloop_seconds = 1.0
        args.sweep_agents = "8"
        if args.parts == ",".join(PARTS):
            args.parts = "peers,sweep"
    args.parts = [p for p in args.parts.split(",") if p]
    args.stores = [s for s in args.stores.split(",") if s]
    args.sweep_agents = [int(n) for n in str(args.sweep_agents).split(",")]
    args.workers_sweep = [int(n) for n in str(args.workers_sweep).split(",")]
    for name in args.parts:
        if name not in PARTS:
            ap.error(f"unknown part {name!r}")
    for name in args.stores:
        if name not in STORES:
            ap.error(f"unknown store {name!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = datetime.datetime.now(datetime.UTC)
    load0 = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="sbus-peers-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        root.chmod(0o755)
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["loadtest/peers.py", *(argv or sys.argv[1:])]),
        "cores": os.cpu_count(),
        "load_before": load0,
    }
    try:
        need_pg = "postgres" in args.stores
        need_redis = "redis" in args.stores
        with services(root, need_pg, need_redis) as svc:
            for store in args.stores:
                run_store(svc, store, args, report)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    report["seconds_total"] = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    lines = [
        f"peers.py {report['date']}, {report['cores']} cores, load average "
        f"{load0[0]:.1f} before, {report['load_after'][0]:.1f} after",
        "",
    ]
    if "peers" in report:
        lines += [*peer_table(report["peers"]), ""]
    if "sweep" in report:
        lines += [*sweep_table(report["sweep"]), ""]
    if "workers" in report:
        lines += [*workers_table(report["workers"]), ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(to_json(report), indent=1))
    (args.out / "peers.md").write_text(text)
    lost = sum(p.lost_updates or 0 for p in report.get("sweep", []))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
