"""The agent loop of docs/agents.md runs as printed against a real bus (uvicorn in a
thread, memory store), including its 409 path: a commit refused because another agent
moved a shard it read (CrossShardStale) or wrote (VersionMismatch) is retried after a
re-read and succeeds."""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from sbus.api.app import create_app
from sbus.config import Settings

AGENTS_MD = Path(__file__).resolve().parents[2] / "docs" / "agents.md"
PRINTED_URL = 'BUS = "http://127.0.0.1:7000"'


def snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", AGENTS_MD.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/agents.md should hold exactly one python snippet"
    code: str = blocks[0]
    assert PRINTED_URL in code
    return code


@pytest.fixture
def bus_url() -> Iterator[str]:
    app = create_app(Settings(store="memory://"))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    # Waiting for start-up is not a speed requirement: the bound is only a hang guard.
    deadline = time.monotonic() + 60
    while not (server.started and app.state.ready):
        assert thread.is_alive() and time.monotonic() < deadline, "the bus did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=60)


def run(code: str, url: str) -> tuple[dict[str, Any], str]:
    namespace: dict[str, Any] = {"__name__": "agents_snippet"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace(PRINTED_URL, f'BUS = "{url}"'), "agents.md", "exec"), namespace)
    return namespace, out.getvalue()


def test_the_snippet_runs_as_printed(bus_url: str) -> None:
    _, first = run(snippet(), bus_url)
    assert first == "committed version 1\n"
    # Again on the same bus: the shards exist (the create's 409 is ignored), the draft moves on.
    _, second = run(snippet(), bus_url)
    assert second == "committed version 2\n"


@pytest.mark.parametrize(
    ("moved", "code"), [("plan", "CrossShardStale"), ("draft", "VersionMismatch")]
)
def test_a_409_is_answered_by_reading_again(bus_url: str, moved: str, code: str) -> None:
    definitions = snippet().split("\nwith httpx.Client(")[0]
    namespace, _ = run(definitions, bus_url)
    other = httpx.Client(base_url=bus_url, headers={"X-Agent-Id": "someone-else"})
    agent = httpx.Client(base_url=bus_url, headers=namespace["WHO"])
    for key in ("plan", "draft"):
        assert other.post("/shard", json={"key": key, "content": "v0"}).status_code == 201
    original = namespace["think"]
    calls: list[str] = []

    def think_while_another_agent_writes(plan: str, draft: str) -> str:
        calls.append(plan)
        if len(calls) == 1:  # between this agent's reads and its commit
            version = other.get(f"/shard/{moved}").json()["version"]
            answer = other.post(
                "/commit/v2",
                json={"key": moved, "expected_version": version, "delta": "moved on"},
            )
            assert answer.status_code == 200, answer.text
        result: str = original(plan, draft)
        return result

    namespace["think"] = think_while_another_agent_writes
    refusals: list[str] = []

    def note_refusal(response: httpx.Response) -> None:
        if response.status_code == 409:
            response.read()
            refusals.append(response.json()["error"])

    agent.event_hooks["response"] = [note_refusal]
    try:
        new_version = namespace["work"](agent)
        assert refusals == [code]
        assert len(calls) == 2
        assert new_version == (1 if moved == "plan" else 2)
        assert calls[1] == ("moved on" if moved == "plan" else "v0")
        assert agent.get("/shard/draft").json()["version"] == new_version
    finally:
        agent.close()
        other.close()
