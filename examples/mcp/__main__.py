"""``python -m examples.mcp``: two scripted agents, each with its own S-Bus MCP server,
edit one plan and append to one log, calling the tools exactly as a model would.

Everything runs in this process: an in-process bus (``sbus_client.testing``) and mcp's
in-memory client. With a real bus and a real host the servers are ``sbus-mcp``
processes instead (docs/integrations/mcp.md); the tool calls are the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mcp import Client
from mcp.types import TextContent

from sbus_client import AsyncBus
from sbus_client.mcp import build_server
from sbus_client.testing import AsyncLocalBus


async def call(agent: str, client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """One tool call, printed as a transcript line; a refusal prints what the model reads."""
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        said = "".join(c.text for c in result.content if isinstance(c, TextContent))
        print(f"{agent}: {tool} -> ERROR\n    {said}")
        return {}
    out: dict[str, Any] = result.structured_content or {}
    if tool == "begin_task":
        print(f"{agent}: begin_task -> a new task (its old reads no longer count)")
    else:
        shown = {k: v for k, v in out.items() if k not in ("updated_at", "commit_id")}
        print(f"{agent}: {tool} -> {shown}")
    return out


async def main() -> None:
    async with AsyncLocalBus() as local:
        servers = {
            name: build_server(AsyncBus(local.url, agent_id=name, http_client=local.http))
            for name in ("planner", "reviewer")
        }
        async with Client(servers["planner"]) as planner, Client(servers["reviewer"]) as rev:
            await call("planner", planner, "create_shard", key="plan", content="1. draft")
            mine = await call("planner", planner, "read_shard", key="plan")
            theirs = await call("reviewer", rev, "read_shard", key="plan")

            # Both edit the version they read; the reviewer commits first.
            await call(
                "reviewer",
                rev,
                "commit_shard",
                key="plan",
                content=theirs["content"] + "\n2. review",
                expected_version=theirs["version"],
            )
            lost = await call(
                "planner",
                planner,
                "commit_shard",
                key="plan",
                content=mine["content"] + "\n2. ship",
                expected_version=mine["version"],
            )
            if not lost:  # the tool error said: re-read, merge, retry
                fresh = await call("planner", planner, "read_shard", key="plan")
                await call(
                    "planner",
                    planner,
                    "commit_shard",
                    key="plan",
                    content=fresh["content"] + "\n3. ship",
                    expected_version=fresh["version"],
                )

            # New work: the reads of the plan must not constrain it any more.
            await call("planner", planner, "begin_task", label="log")
            await call("reviewer", rev, "begin_task", label="log")
            # Appends from both at once: the tool re-reads and retries on its own.
            appends = await asyncio.gather(
                *(
                    client.call_tool("append_to_shard", {"key": "log", "text": f"{who} {i}"})
                    for who, client in (("planner", planner), ("reviewer", rev))
                    for i in range(3)
                )
            )
            assert not any(a.is_error for a in appends)
            # (Read directly, not printed: the order of the lines depends on who won.)
            log = (await rev.call_tool("read_shard", {"key": "log"})).structured_content or {}
            plan = await call("reviewer", rev, "read_shard", key="plan")
        print(f"\nplan (version {plan['version']}):\n{plan['content']}")
        print(f"log (version {log['version']}):\n" + "\n".join(sorted(log["content"].split("\n"))))


if __name__ == "__main__":
    asyncio.run(main())
