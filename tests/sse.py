"""Helpers for the change-stream tests: a real HTTP server in the test's event loop
(httpx's ASGI transport buffers a whole response, and a stream never ends), and a
Server-Sent Events reader that keeps comments, so a test sees ``: subscribed``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from sbus.api import closing
from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings

# A guard against a hung test, never a measure of speed.
PATIENCE_S = 30.0


@dataclass
class Message:
    """One SSE block: its comments, and the event fields (None when absent)."""

    comments: list[str] = field(default_factory=list)
    event: str | None = None
    id: str | None = None
    data: str | None = None

    def json(self) -> Any:
        assert self.data is not None, self
        return json.loads(self.data)


class Stream:
    """The blocks of one open ``GET /watch`` response, read as they arrive."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> Message | None:
        """The next block; None when the stream ended."""
        message = Message()
        seen = False
        async with asyncio.timeout(PATIENCE_S):
            async for line in self._lines:
                if line == "":
                    if seen:
                        return message
                    continue
                seen = True
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "":
                    message.comments.append(value)
                elif name == "event":
                    message.event = value
                elif name == "id":
                    message.id = value
                elif name == "data":
                    message.data = value if message.data is None else message.data + "\n" + value
        return message if seen else None

    async def subscribed(self) -> str:
        """The cursor of the opening ``: subscribed <cursor>`` comment."""
        first = await self.next()
        assert first is not None and first.comments, first
        word, _, cursor = first.comments[0].partition(" ")
        assert word == "subscribed" and cursor, first
        return cursor

    async def events(self, count: int) -> list[Message]:
        """The next ``count`` events (blocks with data), skipping heartbeats."""
        out: list[Message] = []
        while len(out) < count:
            message = await self.next()
            assert message is not None, f"the stream ended after {len(out)} of {count} events"
            if message.data is not None:
                out.append(message)
        return out


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, prefix: str, **options: Any
) -> AsyncIterator[Stream]:
    """``GET /watch?prefix=``; ``options``: ``include``, ``last_event_id``, ``headers``."""
    params = {"prefix": prefix}
    if options.get("include"):
        params["include"] = options["include"]
    headers = dict(options.get("headers") or {})
    if options.get("last_event_id"):
        headers["Last-Event-ID"] = options["last_event_id"]
    async with client.stream("GET", "/watch", params=params, headers=headers) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient
    server: uvicorn.Server
    port: int


@contextlib.asynccontextmanager
async def serve(settings: Settings, port: int | None = None) -> AsyncIterator[Served]:
    """``create_app(settings)`` behind uvicorn on ``port`` (default: a free loopback
    port), ready."""
    app = create_app(settings)
    closing.event().clear()  # an earlier server's shutdown in this event loop
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_level="warning",
        # the bus's protocol, whose shutdown ends the streams (sbus.api.closing)
        http="sbus.api.connections:GuardedHttpToolsProtocol",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(PATIENCE_S):
            while not server.started or not runtime_of(app).ready:
                assert not task.done(), task
                await asyncio.sleep(0.01)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=PATIENCE_S
        ) as client:
            yield Served(app, client, server, port)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
