"""PNG plots of a peers.py run (matplotlib, no display needed).

    .venv/bin/python loadtest/plot_peers.py                          # loadtest/out/peers.json
    .venv/bin/python loadtest/plot_peers.py run.json --out docs/img

Writes, when the run has the part:

* ``peers-throughput.png``: commits/s on dedicated keys and goodput on one hot key, the bus
  on each store beside the etcd run made right before it;
* ``peers-latency-cdf.png``: the distribution of the dedicated-key cycle latency (GET then
  commit) of every system;
* ``peers-sweep.png``: goodput against the number of agents, shared key and dedicated
  keys, the bus against the SERIALIZABLE and WATCH/MULTI baselines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent


def throughput(report: dict[str, Any], out: Path) -> Path:
    rows = report["peers"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phase, title in (
        (axes[0], "dedicated", "commits/s, one key per client"),
        (axes[1], "hot", "goodput (commits/s), one hot key"),
    ):
        stores = list(rows)
        xs = range(len(stores))
        bus = [rows[s][f"bus_{phase}"]["commits_per_s"] for s in stores]
        etcd = [rows[s][f"etcd_{phase}"]["commits_per_s"] for s in stores]
        ax.bar([x - 0.2 for x in xs], bus, width=0.4, label="S-Bus")
        ax.bar([x + 0.2 for x in xs], etcd, width=0.4, label="etcd (run just before)")
        ax.set_xticks(list(xs), stores)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"peers.py {report['date']}")
    fig.tight_layout()
    path = out / "peers-throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_cdf(report: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for store, row in report["peers"].items():
        for key, label in (("bus_dedicated", f"S-Bus/{store}"), ("etcd_dedicated", None)):
            q = row[key]["latency_quantiles_ms"]
            if not q:
                continue
            ys = [i / (len(q) - 1) for i in range(len(q))]
            style = "-" if label else ":"
            ax.plot(q, ys, style, label=label or f"etcd (before {store})")
    ax.set_xscale("log")
    ax.set_xlabel("cycle latency, ms (GET then commit, closed loop)")
    ax.set_ylabel("fraction of cycles")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "peers-latency-cdf.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep(report: dict[str, Any], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    points = report["sweep"]
    systems = sorted({p["system"] for p in points})
    for ax, topology in zip(axes, ("shared", "dedicated"), strict=True):
        for system in systems:
            mine = sorted(
                (int(p["phase"].split("-")[1]), p["commits_per_s"])
                for p in points
                if p["system"] == system and p["phase"].startswith(topology)
            )
            if mine:
                ax.plot([a for a, _ in mine], [g for _, g in mine], "o-", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("agents")
        ax.set_ylabel("goodput, commits/s")
        ax.set_title(f"{topology} key{'s' if topology == 'dedicated' else ''}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "peers-sweep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", nargs="?", type=Path, default=HERE / "out" / "peers.json")
    ap.add_argument("--out", type=Path, default=None, help="default: the report's folder")
    args = ap.parse_args(argv)
    report = json.loads(args.report.read_text())
    out = args.out or args.report.parent
    out.mkdir(parents=True, exist_ok=True)
    made = []
    if "peers" in report:
        made += [throughput(report, out), latency_cdf(report, out)]
    if "sweep" in report:
        made.append(sweep(report, out))
    for path in made:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
