"""The Python snippets of the docs run as printed against a real bus (uvicorn in a
thread, memory store): the agent loop of docs/agents.md, including its 409 path (a
commit refused because another agent moved a shard it read, CrossShardStale, or wrote,
VersionMismatch, is retried after a re-read and succeeds), and the history-chain and
context_hash code of docs/protocol.md, checked against what the bus computes."""

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

from sbus.api.runtime import runtime_of
from sbus.bootstrap import create_app
from sbus.config import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
AGENTS_MD = DOCS / "agents.md"
PRINTED_URL = 'BUS = "http://127.0.0.1:7000"'


def snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", AGENTS_MD.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/agents.md should hold exactly one python snippet"
    code: str = blocks[0]
    assert PRINTED_URL in code
    return code


@pytest.fixture
def bus_url() -> Iterator[str]:
    # A secret so that POST /mandates can issue in open mode.
    app = create_app(Settings(store="memory://", secret="x" * 32))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    # Waiting for start-up is not a speed requirement: the bound is only a hang guard.
    deadline = time.monotonic() + 60
    while not (server.started and runtime_of(app).ready):
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


def protocol_code() -> dict[str, Any]:
    """The definitions of docs/protocol.md's Python blocks, executed in order."""
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2, "protocol.md: the chain verifier and context_hash"
    namespace: dict[str, Any] = {"__name__": "protocol_snippet"}
    exec(compile("\n".join(blocks), "protocol.md", "exec"), namespace)
    return namespace


def test_the_history_chain_verifier_accepts_the_bus_and_catches_tampering(bus_url: str) -> None:
    code = protocol_code()
    json_body = {"Content-Type": "application/json"}
    with httpx.Client(base_url=bus_url, headers={"X-Agent-Id": "writer"}) as bus:
        assert bus.post("/shard", json={"key": "doc/k", "content": "v0"}).status_code == 201
        for version, rationale in [(0, 'first ✓ "quoted"'), (1, None)]:
            body = {"key": "doc/k", "expected_version": version, "delta": f"é{version}"}
            if rationale is not None:
                body["rationale"] = rationale
            assert bus.post("/commit/v2", json=body).status_code == 200
        deleted = bus.delete("/shard/doc/k?expected_version=2", headers=json_body)
        assert deleted.status_code == 204
        assert bus.post("/shard", json={"key": "doc/k", "content": "again"}).status_code == 201
        entries: list[dict[str, Any]] = bus.get("/history/doc/k").json()["entries"]
    assert [e["version"] for e in entries] == [4, 3, 2, 1, 0]
    assert [e["rationale"] for e in entries] == [
        "create",
        "delete",
        None,
        'first ✓ "quoted"',
        "create",
    ]
    assert code["chain_holds"](entries) is True
    for field, value in [("content", "forged"), ("rationale", "other"), ("agent_id", "B")]:
        forged = [dict(e) for e in entries]
        forged[2][field] = value
        assert code["chain_holds"](forged) is False, field
    assert code["chain_holds"](entries[:2] + entries[3:]) is False  # an entry removed


def test_the_context_hash_code_matches_the_bus(bus_url: str) -> None:
    code = protocol_code()
    context = {"b": 1, "a": "é", "nested": {"z": [1, "ü", True], "y": None}}
    with httpx.Client(base_url=bus_url) as bus:
        issued = []
        for extra in ({"context": context}, {}):
            body = {"agent_id": "G", "holder": "H", "keys": ["**"], "ttl_s": 60, **extra}
            answer = bus.post("/mandates", json=body)
            assert answer.status_code == 201, answer.text
            issued.append(answer.json()["context_hash"])
    assert issued == [code["context_hash"](context), code["context_hash"](None)]
    example = code["canonical_json"]({"b": 1, "a": "é"})
    assert example == '{"a":"é","b":1}'.encode()


# -- docs/sessions.md: one session per task --------------------------------------------------

SESSIONS_MD = DOCS / "sessions.md"


def test_the_sessions_example_prints_what_the_page_says(bus_url: str) -> None:
    """Two tasks of one agent in their own sessions: a plan only task 1 read moves on,
    task 2 commits, task 1 is refused with the remedy in the detail, follows it and
    commits. The page shows the exact output."""
    page = SESSIONS_MD.read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", page, re.S)
    (printed,) = re.findall(r"```text\n(.*?)```", page, re.S)
    assert PRINTED_URL in code
    _, out = run(code, bus_url)
    assert out == printed
