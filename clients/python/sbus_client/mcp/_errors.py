"""What the model reads when a tool fails, and what is the host's problem instead.

Two kinds of failure leave a tool, and MCP keeps them apart:

- a **tool error** (``ToolError``: ``isError`` with our text in the result) for anything
  the model can act on: a conflict (re-read, merge, retry), a missing key (create it), a
  bad argument. mcp shows the model only "Error executing tool NAME" for any other
  exception, so every bus answer the model could act on is re-raised as a ToolError whose
  text names the error code, the keys involved, and the next call to make;
- a **protocol error** (``MCPError``) for what no prompt can fix: the bus is unreachable,
  refuses this server's credentials, or is failing. That is the host's configuration.
"""

from __future__ import annotations

from typing import Any

from mcp import MCPError
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import INTERNAL_ERROR

from sbus_client._codes import (
    AgentMismatch,
    CrossShardStale,
    HostNotAllowed,
    SessionExpired,
    StoreUnavailable,
    TokenRevoked,
    Unauthorized,
    VersionMismatch,
)
from sbus_client._errors import (
    BusUnreachable,
    ConflictError,
    RetriesExhausted,
    SBusError,
    UnknownServerError,
)

RETRY = "re-read, merge, retry"

# Codes whose next step, phrased in this server's tool names (the SDK's own hints name
# SDK methods the model cannot call).
NEXT_STEP: dict[str, str] = {
    "ShardNotFound": "{key!r} does not exist: create it with create_shard",
    "ShardDeleted": "{key!r} was deleted (tombstone version {version}): create_shard creates it "
    "again",
    "ShardAlreadyExists": "{key!r} exists already: read_shard it and commit_shard on the "
    "version you read",
    "VersionNotFound": "version {target_version} of {key!r} is not retained: shard_history "
    "lists the versions that are",
    "CapabilityDenied": "this server's token lacks the {right!r} right on {key!r}; "
    "retrying cannot help: work on keys it may use, or tell the user",
    "MandateRequired": "{key!r} can only be changed with a mandate, which this server "
    "cannot supply: tell the user",
    "RateLimited": "slow down: wait {retry_after} s before the next write",
}

# Configuration problems of the host (credentials, agent, Host header): a protocol error.
HOST_PROBLEMS = (Unauthorized, TokenRevoked, AgentMismatch, HostNotAllowed)


def translate(err: SBusError, bus_url: str) -> Exception:
    """The exception a tool raises for ``err``: a ToolError the model reads, or an
    MCPError for the host."""
    if isinstance(err, BusUnreachable):
        # The SDK turns every transport failure into BusUnreachable after its resends.
        return MCPError(
            INTERNAL_ERROR,
            f"the S-Bus at {bus_url} is unreachable ({err.reason}); "
            "check that it is running and that SBUS_URL points at it",
        )
    if isinstance(err, HOST_PROBLEMS):
        return MCPError(
            INTERNAL_ERROR,
            f"the S-Bus at {bus_url} refused this server's identity ({err.code}: "
            f"{err.detail}); fix SBUS_TOKEN / SBUS_AGENT_ID in the server's configuration",
        )
    if isinstance(err, StoreUnavailable | UnknownServerError):
        return MCPError(
            INTERNAL_ERROR, f"the S-Bus at {bus_url} is failing ({err.code}: {err.detail})"
        )
    return ToolError(tool_text(err))


def tool_text(err: SBusError) -> str:
    """The model-visible text of a failure it can act on."""
    if isinstance(err, VersionMismatch) and _is_ahead(err):
        # Not a race: the model asked for a version the shard has not reached.
        return (
            f"VersionMismatch: {err.key!r} is at version {err.found}, not "
            f"{err.expected}: it has no version {err.expected} yet, so that version was "
            f"not read from it, and nothing was written. Next: read_shard({err.key!r}) "
            "and commit with the version it returns."
        )
    if isinstance(err, VersionMismatch):
        return (
            f"VersionMismatch: {err.key!r} is at version {err.found}, not "
            f"{err.expected}: another agent committed first, and nothing was written. "
            f"Stale keys: {err.key!r} (current version {err.found}). Next: {RETRY}: "
            f"read_shard({err.key!r}) again, apply your change to its current content "
            "(keep what the other agent wrote), and commit with the version you just read."
        )
    if isinstance(err, CrossShardStale):
        stale = _stale_keys(err)
        return (
            f"CrossShardStale: keys this task read have changed since it read them, so "
            f"nothing was written. Stale keys: {stale}. Next: {RETRY}: read_shard each "
            "stale key again, check that your change still holds with their new content, "
            "and commit again; or call begin_task first if those earlier reads no longer "
            "matter to this change."
        )
    if isinstance(err, SessionExpired):
        return (
            f"SessionExpired: this task's reads expired ({err.reason}), so nothing was "
            f"written. Next: {RETRY}: call begin_task, read_shard the keys you need again, "
            "merge your change into their current content, and commit again."
        )
    if isinstance(err, RetriesExhausted):
        return (
            f"RetriesExhausted: the key is heavily contended ({err.attempts} attempts "
            "lost to other agents' commits); nothing was written. Next: try again later."
        )
    detail = err.detail.rstrip(". ")
    if isinstance(err, ConflictError):
        return f"{err.code}: {detail}. Nothing was written. Next: {RETRY}."
    return f"{err.code}: {detail}. Next: {_next_step(err)}."


def _is_ahead(err: VersionMismatch) -> bool:
    expected, found = getattr(err, "expected", None), getattr(err, "found", None)
    return isinstance(expected, int) and isinstance(found, int) and expected > found


def _stale_keys(err: CrossShardStale) -> str:
    entries: Any = err.stale_keys
    if not isinstance(entries, list) or not entries:
        entries = [
            {
                "key": err.key,
                "version_at_read": err.version_at_read,
                "current_version": err.current_version,
            }
        ]
    return ", ".join(
        f"{e.get('key')!r} (read at version {e.get('version_at_read')}, now "
        f"{e.get('current_version')})"
        for e in entries
        if isinstance(e, dict)
    )


def _next_step(err: SBusError) -> str:
    hint = NEXT_STEP.get(err.code)
    if hint is not None:
        try:
            return hint.format_map({**err.problem, **vars(err)})
        except (KeyError, IndexError, ValueError):
            pass
    return err.next_step()
