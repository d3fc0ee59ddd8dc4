"""``python -m examples.langgraph [--url URL]``: in process unless a bus URL is given."""

from __future__ import annotations

import argparse

from examples.langgraph.notes import run
from sbus_client import Bus
from sbus_client.testing import LocalBus


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.langgraph",
        description="Two agents fold LLM proposals into one shared LangGraph store item.",
    )
    parser.add_argument("--url", help="a running bus (default: one inside this process)")
    args = parser.parse_args()
    if args.url:
        with Bus(args.url) as bus:
            print(run(bus))
        return
    with LocalBus() as local:
        print(run(local.bus))


if __name__ == "__main__":
    main()
