"""The MCP server: nine tools over one :class:`~sbus_client.AsyncBus`, as one agent.

The agent is fixed when the server is built (configuration, never a tool argument: the
model must not pick who it is). Every tool call runs in the server's current *task*, one
bus session: reads recorded there constrain the task's later commits, which is what makes
a commit refuse to build on stale reads. ``begin_task`` starts a fresh one.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from mcp.server import MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from sbus_client._async import AsyncBus
from sbus_client._codes import (
    CrossShardStale,
    ShardAlreadyExists,
    ShardDeleted,
    ShardNotFound,
)
from sbus_client._errors import SBusError
from sbus_client._models import HistoryEntry, Shard
from sbus_client._version import __version__
from sbus_client._wire import identifier_problem
from sbus_client.mcp._errors import translate

T = TypeVar("T")

INSTRUCTIONS = """\
S-Bus is shared state for several agents: named text shards, each with a version that
grows by one per commit. To change a shard: read_shard it, then commit_shard with
expected_version set to the version you read. The bus refuses a commit (VersionMismatch,
CrossShardStale) when the shard, or anything else you read in this task, changed since
you read it; nothing is written then: re-read, merge your change into the current content,
and retry. Never copy a current version from an error into a commit without re-reading:
that would overwrite the other agent's work. To add a line to a log or note, use
append_to_shard: it never loses a concurrent append. Call begin_task when you start an
unrelated piece of work, so that old reads stop constraining your commits."""

# How long append_to_shard keeps retrying a contended key before it gives up.
APPEND_BUDGET_S = 30.0
# A session id is a header value: keep a label to a safe alphabet and a short length.
LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# The annotations, as the MCP spec defines them. read_shard records the read in this
# task's read set: bookkeeping that only makes later commits of this task stricter, it
# changes no shard, so reads count as read-only. A conditional write (create_shard,
# commit_shard, commit_shards) is idempotent: repeating it is refused (the key exists, the
# version moved on), so a repeat has no further effect. Commits replace content
# (destructive, though history keeps the old version); creates and appends only add.
READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
CREATE = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
REPLACE = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
)
APPEND = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
)
ROLLBACK = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
)
NEW_TASK = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
)

Key = Annotated[str, Field(description="the shard's key, e.g. 'notes/alice'")]
Version = Annotated[int, Field(ge=0, description="a version of the shard")]


class ShardOut(TypedDict):
    key: str
    version: int
    content: str
    updated_at: str


class KeysOut(TypedDict):
    keys: list[str]
    next_after: str | None


class EntryOut(TypedDict):
    version: int
    agent_id: str
    committed_at: str
    content: str
    deleted: bool
    rationale: str | None


class HistoryOut(TypedDict):
    key: str
    entries: list[EntryOut]


class CommittedOut(TypedDict):
    key: str
    version: int
    commit_id: str


class WriteIn(TypedDict):
    key: str
    content: str
    expected_version: int


class MultiOut(TypedDict):
    results: list[CommittedOut]


class AppendedOut(TypedDict):
    key: str
    version: int
    attempts: int


class TaskOut(TypedDict):
    session_id: str


def build_server(
    bus: AsyncBus, *, agent_id: str | None = None, session_id: str | None = None
) -> MCPServer:
    """An MCP server whose tools act on ``bus`` as ``agent_id`` (the bus's own agent
    when None; in token mode the token's subject when neither names one), starting in
    session ``session_id`` (a fresh random one when None)."""
    agent = agent_id if agent_id is not None else bus.agent_id
    if agent is None and not bus.has_token:
        raise ValueError(
            "build_server needs an agent: pass agent_id, give the AsyncBus an agent_id, "
            "or a token (its subject is the agent)"
        )
    # Identity is configuration: a bad one is the host's error now, not a tool error
    # on every call later (which the model could do nothing about).
    for name, value in (("agent_id", agent), ("session_id", session_id)):
        problem = None if value is None else identifier_problem(value)
        if problem:
            raise ValueError(f"{name} {value!r} {problem}")
    tools = _Tools(bus, agent, session_id or _session_id("mcp"))
    # WARNING: mcp configures logging; at its default INFO every bus request and every
    # refused tool call would be logged on stderr, which hosts show as server noise.
    server = MCPServer("sbus", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")
    server.add_tool(tools.read_shard, annotations=READ_ONLY)
    server.add_tool(tools.list_shards, annotations=READ_ONLY)
    server.add_tool(tools.shard_history, annotations=READ_ONLY)
    server.add_tool(tools.create_shard, annotations=CREATE)
    server.add_tool(tools.commit_shard, annotations=REPLACE)
    server.add_tool(tools.commit_shards, annotations=REPLACE)
    server.add_tool(tools.append_to_shard, annotations=APPEND)
    server.add_tool(tools.rollback_shard, annotations=ROLLBACK)
    server.add_tool(tools.begin_task, annotations=NEW_TASK)
    return server


def _session_id(label: str) -> str:
    safe = LABEL_UNSAFE.sub("-", label).strip("-.")[:64] or "task"
    return f"{safe}-{uuid.uuid4().hex[:16]}"


def _shard(s: Shard) -> ShardOut:
    return {"key": s.key, "version": s.version, "content": s.content, "updated_at": s.updated_at}


def _entry(e: HistoryEntry) -> EntryOut:
    return {
        "version": e.version,
        "agent_id": e.agent_id,
        "committed_at": e.committed_at,
        "content": e.content,
        "deleted": e.deleted,
        "rationale": e.rationale,
    }


class _Tools:
    """The tools, bound to one bus, one agent and the current task's session. Their
    docstrings are the descriptions the model reads."""

    def __init__(self, bus: AsyncBus, agent: str | None, session_id: str) -> None:
        self._bus = bus
        self._agent = agent
        self._session = bus.session(agent, session_id, keep=True)

    async def _call(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except SBusError as err:
            raise translate(err, self._bus.base_url) from err

    async def read_shard(self, key: Key) -> ShardOut:
        """Read a shard's current content and version. The read is recorded in this
        task: a later commit of this task is refused if the shard has changed since."""
        return _shard(await self._call(self._session.read(key)))

    async def list_shards(
        self,
        prefix: Annotated[str, Field(description="only keys starting with this")] = "",
        limit: Annotated[int, Field(ge=1, le=1000, description="at most this many keys")] = 100,
        after: Annotated[
            str | None, Field(description="the next_after of the previous page, to go on")
        ] = None,
    ) -> KeysOut:
        """List existing shard keys in ascending order (no contents; records nothing).
        next_after is null on the last page; pass it as after to get the next one."""
        keys: list[str] = []
        cursor = after
        while len(keys) < limit:
            page = await self._call(
                self._session.list_page(prefix, after=cursor, limit=limit - len(keys))
            )
            keys.extend(page.keys)
            cursor = page.next_after
            if cursor is None:
                break
        return {"keys": keys, "next_after": cursor}

    async def shard_history(
        self,
        key: Key,
        limit: Annotated[int, Field(ge=1, le=1000, description="at most this many")] = 10,
        before: Annotated[
            int | None, Field(ge=0, description="only versions older than this one")
        ] = None,
    ) -> HistoryOut:
        """A shard's retained versions, newest first: who committed what, when, and why
        (records nothing)."""
        entries = await self._call(self._session.history(key, limit=limit, before=before))
        return {"key": key, "entries": [_entry(e) for e in entries]}

    async def create_shard(
        self,
        key: Key,
        content: Annotated[str, Field(description="the initial content")],
        goal_tag: Annotated[str, Field(description="an optional tag saying what it is for")] = "",
    ) -> ShardOut:
        """Create a new shard at version 0. Refused (ShardAlreadyExists) if the key
        exists: then read it and commit instead."""
        return _shard(await self._call(self._session.create(key, content, goal_tag=goal_tag)))

    async def commit_shard(
        self,
        key: Key,
        content: Annotated[str, Field(description="the new content, replacing the old")],
        expected_version: Annotated[
            int, Field(ge=0, description="the version you read (read_shard)")
        ],
        rationale: Annotated[str | None, Field(description="why, kept in history")] = None,
    ) -> CommittedOut:
        """Replace a shard's content, only if it is still at expected_version and nothing
        else this task read has changed. If refused, nothing is written: re-read, merge,
        retry."""
        done = await self._call(
            self._session.commit(key, content, expected=expected_version, rationale=rationale)
        )
        return {"key": done.key, "version": done.version, "commit_id": done.commit_id}

    async def commit_shards(
        self,
        writes: Annotated[
            list[WriteIn],
            Field(min_length=1, description="each {key, content, expected_version}"),
        ],
        rationale: Annotated[str | None, Field(description="why, kept in history")] = None,
    ) -> MultiOut:
        """Replace several shards at once, all or nothing: every key must still be at
        its expected_version (and nothing else this task read may have changed), or
        nothing is written."""
        done = await self._call(
            self._session.commit_many(
                [(w["key"], w["content"], w["expected_version"]) for w in writes],
                rationale=rationale,
            )
        )
        return {
            "results": [
                {"key": c.key, "version": c.version, "commit_id": c.commit_id}
                for c in done.values()
            ]
        }

    async def append_to_shard(
        self,
        key: Key,
        text: Annotated[str, Field(description="the text to add at the end")],
        separator: Annotated[
            str, Field(description="put between the old content and text, if any")
        ] = "\n",
    ) -> AppendedOut:
        """Append text to a shard (creating it if missing). Safe against concurrent
        writers: when another agent appended first it re-reads and appends again itself,
        so no one's text is lost (attempts says how many tries it took). Like any commit
        of this task, it is refused if another shard this task read has changed since."""
        return await self._call(self._append(key, text, separator))

    async def _append(self, key: str, text: str, separator: str) -> AppendedOut:
        attempts = 0

        def merge(shard: Shard) -> str:
            nonlocal attempts
            attempts += 1
            return f"{shard.content}{separator}{text}" if shard.content else text

        deadline = time.monotonic() + APPEND_BUDGET_S
        while True:
            try:
                done = await self._session.update(
                    key, merge, max_elapsed=max(deadline - time.monotonic(), 0.0)
                )
            except (ShardNotFound, ShardDeleted):
                attempts += 1
                try:
                    created = await self._session.create(key, text)
                except ShardAlreadyExists:
                    continue  # another writer created it first: append to theirs
                return {"key": key, "version": created.version, "attempts": attempts}
            except CrossShardStale as err:
                # The key itself moved between this attempt's read and commit (a
                # concurrent call of this same task re-read it): another round. Any
                # other stale key is the model's to re-read.
                stale = {e.get("key") for e in (err.stale_keys or []) if isinstance(e, dict)}
                if stale - {key} or time.monotonic() > deadline:
                    raise
                continue
            if done is None:  # nothing to add (empty text and separator)
                current = await self._session.read(key, record=False)
                return {"key": key, "version": current.version, "attempts": attempts}
            return {"key": key, "version": done.version, "attempts": attempts}

    async def rollback_shard(
        self,
        key: Key,
        target_version: Annotated[
            int, Field(ge=0, description="the retained version to restore (shard_history)")
        ],
        expected_version: Annotated[
            int | None, Field(ge=0, description="refuse unless the shard is at this version")
        ] = None,
    ) -> ShardOut:
        """Restore an older version's content as a new version (history keeps all)."""
        return _shard(
            await self._call(self._session.rollback(key, target_version, expected=expected_version))
        )

    async def begin_task(
        self,
        label: Annotated[
            str | None, Field(max_length=200, description="a short name for the task")
        ] = None,
    ) -> TaskOut:
        """Start a new task: forget this task's reads, so they no longer constrain your
        commits. Call it when you turn to unrelated work; read again what you need."""
        old = self._session
        self._session = self._bus.session(self._agent, _session_id(label or "task"), keep=True)
        await self._call(old.reset())  # the old task's read set costs the bus nothing now
        return {"session_id": self._session.session_id}
