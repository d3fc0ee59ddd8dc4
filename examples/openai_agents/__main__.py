"""``python -m examples.openai_agents [--url URL]``: the help desk on an in-process bus,
or on the bus at URL (``sbus serve``)."""

from __future__ import annotations

import argparse
import asyncio

import httpx

from examples.openai_agents.desk import run
from sbus_client import AsyncBus


async def on_url(url: str) -> list[str]:
    async with httpx.AsyncClient(timeout=30.0) as http:
        front = AsyncBus(url, agent_id="front-desk", http_client=http)
        back = AsyncBus(url, agent_id="back-office", http_client=http)
        return await run(front, back)


async def in_process() -> list[str]:
    from sbus_client.testing import AsyncLocalBus  # needs the `testing` extra

    async with AsyncLocalBus() as local:
        front = AsyncBus(local.url, agent_id="front-desk", http_client=local.http)
        back = AsyncBus(local.url, agent_id="back-office", http_client=local.http)
        return await run(front, back)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.openai_agents",
        description="Two agent processes share one conversation through SBusSession.",
    )
    parser.add_argument("--url", help="a running bus (default: one inside this process)")
    args = parser.parse_args()
    lines = asyncio.run(on_url(args.url) if args.url else in_process())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
