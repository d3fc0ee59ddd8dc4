"""sbus_client.mcp through mcp's in-memory Client: the tools, their annotations, and
what the model reads when the bus refuses (the text of the tool error, as delivered)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mcp import Client, MCPError
from mcp.server import MCPServer
from mcp.types import CallToolResult, TextContent

from sbus_client import AsyncBus, TransportRetry
from sbus_client.mcp import build_server
from sbus_client.testing import AsyncLocalBus
from tests.api.auth_helpers import SECRET, token

TOOLS = {
    # name: (read_only, destructive, idempotent)
    "read_shard": (True, None, True),
    "list_shards": (True, None, True),
    "shard_history": (True, None, True),
    "create_shard": (False, False, True),
    "commit_shard": (False, True, True),
    "commit_shards": (False, True, True),
    "append_to_shard": (False, False, False),
    "rollback_shard": (False, True, False),
    "begin_task": (False, False, False),
}


@pytest.fixture
async def local() -> AsyncIterator[AsyncLocalBus]:
    async with AsyncLocalBus() as running:
        yield running


def server_for(local: AsyncLocalBus, agent: str, **kwargs: Any) -> MCPServer:
    return build_server(AsyncBus(local.url, agent_id=agent, http_client=local.http), **kwargs)


async def ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, text(result)
    structured: dict[str, Any] | None = result.structured_content
    assert structured is not None
    return structured


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result
    return text(result)


def text(result: CallToolResult) -> str:
    """What the model reads: the result's text content."""
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def test_exactly_the_tools_with_truthful_annotations_and_defaults(
    local: AsyncLocalBus,
) -> None:
    async with Client(server_for(local, "a")) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == set(TOOLS)
    for name, (read_only, destructive, idempotent) in TOOLS.items():
        hints = tools[name].annotations
        assert hints is not None, name
        assert (hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint) == (
            read_only,
            destructive,
            idempotent,
        ), name
        assert hints.open_world_hint is False, name
        # Identity is configuration: no tool lets the model name an agent or session.
        props = tools[name].input_schema["properties"]
        assert not {"agent_id", "agent", "session_id"} & set(props), name

    def defaults(name: str) -> dict[str, Any]:
        props = tools[name].input_schema["properties"]
        return {k: v["default"] for k, v in props.items() if "default" in v}

    assert defaults("read_shard") == {}
    assert defaults("list_shards") == {"prefix": "", "limit": 100, "after": None}
    assert defaults("shard_history") == {"limit": 10, "before": None}
    assert defaults("create_shard") == {"goal_tag": ""}
    assert defaults("commit_shard") == {"rationale": None}
    assert defaults("commit_shards") == {"rationale": None}
    assert defaults("append_to_shard") == {"separator": "\n"}
    assert defaults("rollback_shard") == {"expected_version": None}
    assert defaults("begin_task") == {"label": None}
    assert tools["commit_shards"].input_schema["required"] == ["writes"]


async def test_loser_gets_version_mismatch_and_succeeds_after_rereading(
    local: AsyncLocalBus,
) -> None:
    async with (
        Client(server_for(local, "alice")) as alice,
        Client(server_for(local, "bob")) as bob,
    ):
        created = await ok(alice, "create_shard", key="plan", content="step 1")
        assert (created["key"], created["version"], created["content"]) == ("plan", 0, "step 1")
        a = await ok(alice, "read_shard", key="plan")
        b = await ok(bob, "read_shard", key="plan")
        assert a["version"] == b["version"] == 0
        won = await ok(bob, "commit_shard", key="plan", content="step 1\nbob", expected_version=0)
        assert won["version"] == 1

        lost = await refused(
            alice, "commit_shard", key="plan", content="step 1\nalice", expected_version=0
        )
        assert lost == (
            "Error executing tool commit_shard: VersionMismatch: 'plan' is at version 1, "
            "not 0: another agent committed first, and nothing was written. Stale keys: "
            "'plan' (current version 1). Next: re-read, merge, retry: read_shard('plan') "
            "again, apply your change to its current content (keep what the other agent "
            "wrote), and commit with the version you just read."
        )

        again = await ok(alice, "read_shard", key="plan")
        assert (again["version"], again["content"]) == (1, "step 1\nbob")
        merged = await ok(
            alice,
            "commit_shard",
            key="plan",
            content=again["content"] + "\nalice",
            expected_version=again["version"],
            rationale="merged",
        )
        assert merged["version"] == 2
        history = await ok(bob, "shard_history", key="plan")
    assert [(e["version"], e["agent_id"], e["content"]) for e in history["entries"]] == [
        (2, "alice", "step 1\nbob\nalice"),
        (1, "bob", "step 1\nbob"),
        (0, "alice", "step 1"),
    ]
    assert history["entries"][0]["rationale"] == "merged"


async def test_recorded_reads_make_a_stale_task_refuse_until_begin_task(
    local: AsyncLocalBus,
) -> None:
    async with (
        Client(server_for(local, "alice")) as alice,
        Client(server_for(local, "bob")) as bob,
    ):
        for key in ("budget", "spend", "quiet"):
            await ok(alice, "create_shard", key=key, content="0")
        await ok(alice, "read_shard", key="budget")  # recorded
        await ok(alice, "list_shards")  # records nothing
        await ok(alice, "shard_history", key="quiet")  # records nothing
        await ok(bob, "commit_shard", key="quiet", content="1", expected_version=0)
        await ok(bob, "commit_shard", key="budget", content="5", expected_version=0)

        stale = await refused(alice, "commit_shard", key="spend", content="9", expected_version=0)
        assert stale == (
            "Error executing tool commit_shard: CrossShardStale: keys this task read have "
            "changed since it read them, so nothing was written. Stale keys: 'budget' (read "
            "at version 0, now 1). Next: re-read, merge, retry: read_shard each stale key "
            "again, check that your change still holds with their new content, and commit "
            "again; or call begin_task first if those earlier reads no longer matter to "
            "this change."
        )
        assert (await ok(bob, "read_shard", key="spend"))["version"] == 0  # nothing written

        task = await ok(alice, "begin_task", label="spend report")
        assert task["session_id"].startswith("spend-report-")
        done = await ok(alice, "commit_shard", key="spend", content="9", expected_version=0)
        assert done["version"] == 1


async def test_expired_reads_are_a_tool_error_pointing_at_begin_task(
    local: AsyncLocalBus,
) -> None:
    async with Client(server_for(local, "alice")) as alice:
        await ok(alice, "create_shard", key="k", content="0")
        await ok(alice, "read_shard", key="k")
        await local.advance_clock(local.settings.session_ttl + 1)
        expired = await refused(alice, "commit_shard", key="k", content="1", expected_version=0)
        assert expired == (
            "Error executing tool commit_shard: SessionExpired: this task's reads expired "
            "(ttl), so nothing was written. Next: re-read, merge, retry: call begin_task, "
            "read_shard the keys you need again, merge your change into their current "
            "content, and commit again."
        )
        await ok(alice, "begin_task")
        assert (await ok(alice, "read_shard", key="k"))["version"] == 0
        assert (await ok(alice, "commit_shard", key="k", content="1", expected_version=0))[
            "version"
        ] == 1


async def test_commit_shards_is_all_or_nothing(local: AsyncLocalBus) -> None:
    async with Client(server_for(local, "alice")) as alice:
        await ok(alice, "create_shard", key="from", content="10")
        await ok(alice, "create_shard", key="to", content="0")
        writes = [
            {"key": "from", "content": "9", "expected_version": 0},
            {"key": "to", "content": "1", "expected_version": 3},
        ]
        lost = await refused(alice, "commit_shards", writes=writes)
        # No other agent is involved: the text must not say one committed first.
        assert lost == (
            "Error executing tool commit_shards: VersionMismatch: 'to' is at version 0, not 3: "
            "it has no version 3 yet, so that version was not read from it, and nothing was "
            "written. Next: read_shard('to') and commit with the version it returns."
        )
        assert (await ok(alice, "read_shard", key="from"))["content"] == "10"
        writes[1]["expected_version"] = 0
        done = await ok(alice, "commit_shards", writes=writes, rationale="move one")
        assert sorted((r["key"], r["version"]) for r in done["results"]) == [
            ("from", 1),
            ("to", 1),
        ]
        assert len({r["commit_id"] for r in done["results"]}) == 1  # one atomic step


async def test_append_creates_then_appends_with_the_separator(local: AsyncLocalBus) -> None:
    async with (
        Client(server_for(local, "alice")) as alice,
        Client(server_for(local, "bob")) as bob,
    ):
        first = await ok(alice, "append_to_shard", key="log", text="one")
        assert first == {"key": "log", "version": 0, "attempts": 1}
        await ok(bob, "append_to_shard", key="log", text="two")
        third = await ok(alice, "append_to_shard", key="log", text="three", separator=" | ")
        assert third == {"key": "log", "version": 2, "attempts": 1}
        assert (await ok(bob, "read_shard", key="log"))["content"] == "one\ntwo | three"


async def test_append_is_refused_when_another_read_of_the_task_is_stale(
    local: AsyncLocalBus,
) -> None:
    async with (
        Client(server_for(local, "alice")) as alice,
        Client(server_for(local, "bob")) as bob,
    ):
        await ok(alice, "create_shard", key="source", content="fact 1")
        await ok(alice, "create_shard", key="notes", content="")
        await ok(alice, "read_shard", key="source")
        await ok(bob, "commit_shard", key="source", content="fact 2", expected_version=0)
        stale = await refused(alice, "append_to_shard", key="notes", text="fact 1 holds")
        assert stale.startswith(
            "Error executing tool append_to_shard: CrossShardStale: keys this task read have "
            "changed since it read them, so nothing was written. Stale keys: 'source' (read "
            "at version 0, now 1)."
        )
        assert (await ok(bob, "read_shard", key="notes"))["version"] == 0  # nothing appended
        await ok(alice, "read_shard", key="source")
        done = await ok(alice, "append_to_shard", key="notes", text="fact 2 holds")
        assert done == {"key": "notes", "version": 1, "attempts": 1}


async def test_rollback_restores_an_old_version_as_a_new_one(local: AsyncLocalBus) -> None:
    async with Client(server_for(local, "alice")) as alice:
        await ok(alice, "create_shard", key="doc", content="good")
        await ok(alice, "commit_shard", key="doc", content="bad", expected_version=0)
        stale = await refused(
            alice, "rollback_shard", key="doc", target_version=0, expected_version=0
        )
        assert stale.startswith("Error executing tool rollback_shard: VersionMismatch: 'doc'")
        restored = await ok(alice, "rollback_shard", key="doc", target_version=0)
        assert (restored["version"], restored["content"]) == (2, "good")
        gone = await refused(alice, "rollback_shard", key="doc", target_version=7)
        assert "VersionNotFound" in gone
        assert "shard_history lists the versions that are" in gone


async def test_lookup_errors_name_the_tool_to_call(local: AsyncLocalBus) -> None:
    async with Client(server_for(local, "alice")) as alice:
        missing = await refused(alice, "read_shard", key="nope")
        assert missing.startswith("Error executing tool read_shard: ShardNotFound: ")
        assert missing.endswith("Next: 'nope' does not exist: create it with create_shard.")
        await ok(alice, "create_shard", key="here", content="")
        twice = await refused(alice, "create_shard", key="here", content="")
        assert twice.startswith("Error executing tool create_shard: ShardAlreadyExists: ")
        assert twice.endswith(
            "Next: 'here' exists already: read_shard it and commit_shard on the version you read."
        )
        bad = await refused(alice, "read_shard", key="a b")
        assert bad.startswith("Error executing tool read_shard: ValidationError: ")


async def test_list_shards_pages_by_limit_and_after(local: AsyncLocalBus) -> None:
    async with Client(server_for(local, "alice")) as alice:
        for key in ("n/a", "n/b", "n/c", "other"):
            await ok(alice, "create_shard", key=key, content="")
        first = await ok(alice, "list_shards", prefix="n/", limit=2)
        assert first == {"keys": ["n/a", "n/b"], "next_after": "n/b"}
        rest = await ok(alice, "list_shards", prefix="n/", limit=2, after="n/b")
        assert rest == {"keys": ["n/c"], "next_after": None}
        assert (await ok(alice, "list_shards"))["keys"] == ["n/a", "n/b", "n/c", "other"]


async def test_agent_comes_from_configuration(local: AsyncLocalBus) -> None:
    bus = AsyncBus(local.url, agent_id="configured", http_client=local.http)
    async with Client(build_server(bus)) as by_bus:
        await ok(by_bus, "create_shard", key="a", content="")
    async with Client(build_server(bus, agent_id="override")) as by_argument:
        await ok(by_argument, "create_shard", key="b", content="")
        history = [await ok(by_argument, "shard_history", key=k) for k in ("a", "b")]
    assert [h["entries"][0]["agent_id"] for h in history] == ["configured", "override"]
    with pytest.raises(ValueError, match="needs an agent"):
        build_server(AsyncBus(local.url, http_client=local.http))


@pytest.mark.parametrize(
    ("where", "agent", "session"),
    [("agent_id", "agent-\u00fc", None), ("agent_id", "a" * 257, None),
     ("agent_id", " padded", None), ("agent_id", "", None),
     ("session_id", "agent", "s\u00e9ance"), ("session_id", "agent", "s" * 257)],
)  # fmt: skip
async def test_an_identity_the_bus_cannot_carry_is_refused_when_built(
    local: AsyncLocalBus, where: str, agent: str, session: str | None
) -> None:
    # Every tool call would fail on it, and the model can do nothing about an identity.
    with pytest.raises(ValueError, match=f"^{where} .* (printable ASCII|at most 256)"):
        bus = AsyncBus(local.url, http_client=local.http)
        build_server(bus, agent_id=agent, session_id=session)
    if where == "agent_id":  # the SDK refuses it as early: where the AsyncBus is made
        with pytest.raises(ValueError, match=r"^agent_id "):
            AsyncBus(local.url, agent_id=agent, http_client=local.http)


async def test_token_mode_acts_as_the_token_subject() -> None:
    async with AsyncLocalBus(auth="token", secret=SECRET) as local:
        tok = token(local.app, "agent-7", ("**", "read,write,create,delete"))
        server = build_server(AsyncBus(local.url, token=tok, http_client=local.http))
        async with Client(server) as client:
            await ok(client, "create_shard", key="k", content="")
            history = await ok(client, "shard_history", key="k")
        assert history["entries"][0]["agent_id"] == "agent-7"

        narrow = token(local.app, "agent-8", ("k", "read"))
        server = build_server(AsyncBus(local.url, token=narrow, http_client=local.http))
        async with Client(server) as client:
            denied = await refused(client, "commit_shard", key="k", content="x", expected_version=0)
        assert denied.startswith("Error executing tool commit_shard: CapabilityDenied: ")
        assert "lacks the 'write' right on 'k'" in denied


async def test_a_bad_token_is_a_protocol_error() -> None:
    async with AsyncLocalBus(auth="token", secret=SECRET) as local:
        server = build_server(AsyncBus(local.url, token="garbage", http_client=local.http))
        async with Client(server) as client:
            with pytest.raises(MCPError) as err:
                await client.call_tool("read_shard", {"key": "k"})
    assert "refused this server's identity (Unauthorized" in str(err.value)


async def test_an_unreachable_bus_is_a_protocol_error() -> None:
    with socket_closed() as url:
        bus = AsyncBus(url, agent_id="a", retry=TransportRetry(attempts=1))
        async with bus, Client(build_server(bus)) as client:
            with pytest.raises(MCPError) as err:
                await client.call_tool("read_shard", {"key": "k"})
    assert f"the S-Bus at {url} is unreachable (ConnectError" in str(err.value)


class socket_closed:
    """A loopback URL nothing listens on (the port is bound, never listened on)."""

    def __enter__(self) -> str:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
