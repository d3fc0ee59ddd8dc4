"""CPU per GET+commit cycle through the whole ASGI app, in process.

No sockets and no load generator: the app (gate, routing, validation, engine, render)
over the memory store, driven by one httpx client over ASGI, timed by this process's
CPU clock. It isolates what a change to the request path costs. Compare two versions
of the code by running it alternately under each, e.g. with ``PYTHONPATH`` pointing at
an older checkout's ``service/`` folder, and compare the per-run ratios, never absolute
numbers across runs:

    .venv/bin/python loadtest/app_cycle.py --cycles 3000 --label new

``--log json`` (or ``text``) configures logging as ``sbus serve`` does at the default
level, so every request writes its log line (to stderr: redirect it); the default,
``off``, leaves logging unconfigured (warnings only), so no request line is built.
"""

from __future__ import annotations

import argparse
import asyncio
import logging.config
import time

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from sbus.config import Settings

try:
    from sbus.bootstrap import create_app
except ImportError:  # an older checkout, where the API layer built the app
    from sbus.api.app import create_app  # type: ignore[attr-defined,no-redef]

JSON = {"Content-Type": "application/json"}


def _ready(app: FastAPI) -> bool:
    # Older checkouts kept the ready flag on app.state itself, not on its runtime.
    holder = getattr(app.state, "runtime", app.state)
    return bool(holder.ready)


class AppClock:
    """CPU time spent inside the ASGI app (the server's share of the cycle): the client
    awaits the app in the same thread, so the process clock around each call is the
    app's, give or take the transport's receive and send callbacks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seconds = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.process_time()
        try:
            await self.app(scope, receive, send)
        finally:
            self.seconds += time.process_time() - start


async def measure(cycles: int, warmup: int) -> tuple[float, float]:
    """Milliseconds of CPU per cycle (GET with an agent id, then commit at that version),
    for the whole process and for the app alone."""
    app = create_app(Settings(store="memory://"))
    async with LifespanManager(app) as manager:
        for _ in range(1000):  # the store connects in the background; 10 s at most
            if _ready(app):
                break
            await asyncio.sleep(0.01)
        else:
            raise SystemExit("the store never became ready")
        clock = AppClock(manager.app)
        transport = httpx.ASGITransport(app=clock)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            created = await client.post("/shard", json={"key": "k", "content": "0"}, headers=JSON)
            created.raise_for_status()

            async def cycle(version: int) -> None:
                read = await client.get("/shard/k", params={"agent_id": "A"})
                read.raise_for_status()
                body = {"key": "k", "expected_version": version, "delta": str(version)}
                commit = await client.post(
                    "/commit/v2", json=body | {"agent_id": "A"}, headers=JSON
                )
                commit.raise_for_status()

            for version in range(warmup):
                await cycle(version)
            start = time.process_time()
            clock.seconds = 0.0
            for version in range(warmup, warmup + cycles):
                await cycle(version)
            total = time.process_time() - start
            return total / cycles * 1000, clock.seconds / cycles * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3000, help="measured cycles")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured cycles first")
    parser.add_argument("--label", default="", help="printed before the figure")
    parser.add_argument(
        "--log", choices=["off", "json", "text"], default="off", help="the request log"
    )
    args = parser.parse_args()
    if args.log != "off":
        from sbus.telemetry.logs import log_config

        logging.config.dictConfig(log_config("info", args.log, False))
    ms, app_ms = asyncio.run(measure(args.cycles, args.warmup))
    print(f"{args.label} {ms:.3f} ms CPU per GET+commit cycle, {app_ms:.3f} ms in the app".strip())


if __name__ == "__main__":
    main()
