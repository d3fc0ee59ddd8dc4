"""The memory-server lost-write scenario (modelcontextprotocol/servers issue 4797) on real
processes: two ``sbus-mcp`` stdio servers on one ``sbus serve``, each appending 50 lines
while the other does, end with all 100 lines, and really collided on the way."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters

from tests.concurrency.conftest import Server, ServerGroup, free_port, sqlite_url

pytestmark = pytest.mark.concurrency

LINES = 50


def sbus_mcp() -> str:
    beside = Path(sys.executable).parent / "sbus-mcp"
    assert beside.exists(), "the sbus-mcp command is not installed (run `make dev`)"
    return str(beside)


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp_path = tmp_path_factory.mktemp("bus")
    group = ServerGroup(tmp_path / "logs")
    server = group.start(sqlite_url(tmp_path))
    yield server
    group.fail_on(group.stop_all())


def stdio_server(url: str, agent: str) -> StdioServerParameters:
    # Only what the server needs: no SBUS_* of the developer's shell may leak in.
    env = {"PATH": "/usr/bin:/bin", "SBUS_URL": url, "SBUS_AGENT_ID": agent}
    return StdioServerParameters(command=sbus_mcp(), args=[], env=env)


async def test_two_stdio_servers_appending_concurrently_lose_no_line(bus: Server) -> None:
    attempts: dict[str, list[int]] = {"a": [], "b": []}

    async def append(client: Client, writer: str, i: int) -> None:
        result = await client.call_tool(
            "append_to_shard", {"key": "memory/graph", "text": f"{writer}-{i:02d}"}
        )
        assert not result.is_error, result.content
        assert result.structured_content is not None
        attempts[writer].append(result.structured_content["attempts"])

    connected = 0
    both_up = anyio.Event()

    async def writer(name: str) -> None:
        nonlocal connected
        async with Client(stdio_server(bus.base_url, f"mcp-{name}")) as client:
            # Start together: a process that came up first must not finish alone.
            connected += 1
            if connected == 2:
                both_up.set()
            await both_up.wait()
            for i in range(LINES):
                await append(client, name, i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer, "a")
        tg.start_soon(writer, "b")

    async with httpx.AsyncClient(base_url=bus.base_url, trust_env=False) as http:
        shard = (await http.get("/shard/memory/graph", params={"record": "false"})).json()
        health = (await http.get("/admin/health")).json()
    expected = [f"{w}-{i:02d}" for w in "ab" for i in range(LINES)]
    assert sorted(shard["content"].split("\n")) == expected  # none lost, none doubled
    assert shard["version"] == 2 * LINES - 1  # one create, then one commit per line
    # Each writer's own lines in the order it appended them.
    for w in "ab":
        mine = [line for line in shard["content"].split("\n") if line.startswith(w)]
        assert mine == [f"{w}-{i:02d}" for i in range(LINES)]

    # They really collided: some appends lost a race and went round again, and the bus
    # counted the refused commits.
    assert [len(attempts["a"]), len(attempts["b"])] == [LINES, LINES]
    tries = sum(attempts["a"]) + sum(attempts["b"])
    assert tries > 2 * LINES
    # A lost create race (ShardAlreadyExists) is a try but not a refused commit.
    assert 1 <= health["total_conflicts"] <= tries - 2 * LINES


@pytest.fixture
def http_mcp(bus: Server, tmp_path: Path) -> Iterator[str]:
    """``sbus-mcp --transport streamable-http`` on a free loopback port; its base URL."""
    port = free_port()
    log = (tmp_path / "sbus-mcp.log").open("wb")
    env = {"PATH": "/usr/bin:/bin", "SBUS_URL": bus.base_url, "SBUS_AGENT_ID": "mcp-http"}
    argv = [sbus_mcp(), "--transport", "streamable-http", "--port", str(port)]
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "sbus-mcp.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sbus-mcp did not listen within 30 s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


async def test_streamable_http_serves_loopback_and_refuses_other_hosts(http_mcp: str) -> None:
    async with Client(http_mcp + "/mcp") as client:
        created = await client.call_tool("create_shard", {"key": "http/k", "content": "x"})
        assert created.structured_content is not None
        assert created.structured_content["version"] == 0
        history = await client.call_tool("shard_history", {"key": "http/k"})
        assert history.structured_content is not None
        assert history.structured_content["entries"][0]["agent_id"] == "mcp-http"

    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host and
    # Origin; both are refused before any tool runs.
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(trust_env=False) as http:
        wrong_host = await http.post(
            http_mcp + "/mcp", json=body, headers={**headers, "Host": "evil.example"}
        )
        wrong_origin = await http.post(
            http_mcp + "/mcp", json=body, headers={**headers, "Origin": "http://evil.example"}
        )
    assert (wrong_host.status_code, wrong_host.text) == (421, "Invalid Host header")
    assert (wrong_origin.status_code, wrong_origin.text) == (403, "Invalid Origin header")


async def test_the_openai_agents_sdk_drives_sbus_mcp_over_stdio(bus: Server) -> None:
    # As docs/integrations/mcp.md configures it: MCPServerStdio with the command and env.
    from agents.mcp import MCPServerStdio

    env = {"PATH": "/usr/bin:/bin", "SBUS_URL": bus.base_url, "SBUS_AGENT_ID": "researcher"}
    async with MCPServerStdio(name="sbus", params={"command": sbus_mcp(), "env": env}) as sbus:
        names = [t.name for t in await sbus.list_tools()]
        assert "append_to_shard" in names
        assert len(names) == 9
        done = await sbus.call_tool("append_to_shard", {"key": "oai/notes", "text": "found"})
        assert not done.is_error
        assert done.structured_content == {"key": "oai/notes", "version": 0, "attempts": 1}
