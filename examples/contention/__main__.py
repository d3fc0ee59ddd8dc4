"""``python -m examples.contention [--agents N] [--rounds R]`` (``make demo``)."""

from __future__ import annotations

import argparse

from examples.contention.demo import AGENTS, ROUNDS, render, run


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.contention",
        description="Lost updates and write skew: a JSON file, per-key CAS, and the bus.",
    )
    parser.add_argument("--agents", type=int, default=AGENTS, help="agents on the board")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of each workload")
    args = parser.parse_args()
    print(render(run(args.agents, args.rounds), args.agents, args.rounds))


if __name__ == "__main__":
    main()
