"""Shards: create, read one or many (recording the DeliveryLog), list, delete, history."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from sbus.api.deps import (
    BusDep,
    SettingsDep,
    agent_of,
    caller_of,
    expected_from,
    header_context,
    idempotency,
    if_match,
    require_agent,
    session_of,
    token_caller,
)
from sbus.api.ignored import WireRoute
from sbus.api.lean import hot
from sbus.api.openapi import errs
from sbus.api.render import json_response, outcome_response
from sbus.api.schemas import HistoryOut, ListOut, ReadOut, ShardOut
from sbus.api.wire import (
    NO_FIELDS,
    AgentId,
    CreateShardBody,
    Key,
    OptionalNoFields,
    QueryInt,
    ReadBody,
    SessionId,
    Text,
)
from sbus.core import commands as c
from sbus.core import errors as e
from sbus.core.clock import rfc3339
from sbus.core.rules import shard_body
from sbus.core.types import WriteOp

router = APIRouter(tags=["shards"], route_class=WireRoute)

KeyPath = Annotated[Key, Path(description="Shard key; may contain '/'.")]


@router.post(
    "/shard",
    status_code=201,
    response_model=ShardOut,
    responses=errs(403, 409, 413, 422),
    summary="Create a shard at version 0 (or tombstone + 1)",
)
async def create_shard(body: CreateShardBody, request: Request, bus: BusDep) -> Response:
    agent = agent_of(request, body.agent_id) or ""
    command = c.CreateShard(
        key=body.key,
        content=body.content,
        goal_tag=body.goal_tag,
        require_mandate=body.policy.require_mandate,
        idem=idempotency(request, agent, "", body.model_dump),
    )
    return outcome_response(await bus.execute(caller_of(request, agent), command), request.scope)


@router.get(
    "/shard/{key:path}",
    response_model=ShardOut,
    responses=errs(400, 403, 404, 422),
    summary="Read a shard; records the served version in the caller's DeliveryLog",
)
@hot
async def read_shard(
    key: KeyPath,
    request: Request,
    bus: BusDep,
    settings: SettingsDep,
    agent_id: Annotated[AgentId | None, Query()] = None,
    session_id: Annotated[SessionId | None, Query()] = None,
    record: Annotated[bool, Query(description="false: serve without recording")] = True,
) -> Response:
    agent = agent_of(request, agent_id)
    session = session_of(request, session_id)
    if agent is None and settings.require_agent_id:
        raise e.AgentRequired("agent_id is required (SBUS_REQUIRE_AGENT_ID=1)")
    shard = await bus.execute(caller_of(request, agent, session), c.ReadShard(key, record))
    return json_response(shard_body(shard), etag=shard.version)


@router.post(
    "/read",
    response_model=ReadOut,
    responses=errs(400, 403, 422),
    summary="Read many shards in one request; records each served version as GET /shard does",
)
@hot
async def read_many(
    body: ReadBody, request: Request, bus: BusDep, settings: SettingsDep
) -> Response:
    # The checks and their order are GET /shard/{key}'s (protocol.md section 2.4), so
    # every refusal comes before the store and records nothing.
    if len(body.keys) > settings.max_read_keys:
        raise e.ValidationFailed(
            f"keys lists {len(body.keys)} keys, more than SBUS_MAX_READ_KEYS "
            f"({settings.max_read_keys})",
            loc=["body", "keys"],
            max=settings.max_read_keys,
        )
    agent = agent_of(request, body.agent_id)
    session = session_of(request, body.session_id)
    if agent is None and settings.require_agent_id:
        raise e.AgentRequired("agent_id is required (SBUS_REQUIRE_AGENT_ID=1)")
    command = c.ReadShards(tuple(body.keys), body.record)
    found = await bus.execute(caller_of(request, agent, session), command)
    shards: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for key in body.keys:
        shard = found.get(key)
        if shard is None:
            missing.append({"key": key, "error": e.ShardNotFound.code})
        elif shard.deleted:
            missing.append({"key": key, "error": e.ShardDeleted.code, "version": shard.version})
        else:
            shards.append(shard_body(shard))
    return json_response({"shards": shards, "missing": missing})


@router.get(
    "/shards",
    response_model=ListOut,
    responses=errs(422),
    summary="List live shard keys the caller may read, in ascending order",
)
async def list_shards(
    request: Request,
    bus: BusDep,
    settings: SettingsDep,
    prefix: Annotated[Text, Query(max_length=256)] = "",
    after: Annotated[Text | None, Query(max_length=256)] = None,
    limit: Annotated[QueryInt | None, Query(ge=1, le=2**53 - 1)] = None,
    include: Annotated[
        Literal["content"] | None,
        Query(
            description="content: also answer items, the shards themselves (unrecorded), "
            "parallel to shards; a page then holds at most SBUS_MAX_READ_KEYS keys"
        ),
    ] = None,
) -> Response:
    cap = min(limit or settings.list_max, settings.list_max)
    if include is not None:
        # Every shard of the page travels in one answer: bound it as a bulk read is.
        cap = min(cap, settings.max_read_keys)
    command = c.ListShards(prefix, after, cap, content=include is not None)
    page = await bus.execute(caller_of(request, None), command)
    if page.shards is None:
        return json_response(
            {"shards": page.keys, "count": len(page.keys), "next_after": page.next_after}
        )
    return json_response(
        {
            "shards": page.keys,
            "count": len(page.keys),
            "next_after": page.next_after,
            "items": [shard_body(shard) for shard in page.shards],
        }
    )


@router.delete(
    "/shard/{key:path}",
    status_code=204,
    responses=errs(400, 403, 404, 409, 410, 422, 428),
    summary="Delete a shard, leaving a tombstone at version + 1",
)
async def delete_shard(
    key: KeyPath,
    request: Request,
    bus: BusDep,
    expected_version: Annotated[QueryInt | None, Query(ge=0, le=2**53 - 1)] = None,
    agent_id: Annotated[AgentId | None, Query()] = None,
    session_id: Annotated[SessionId | None, Query()] = None,
    _body: OptionalNoFields = NO_FIELDS,
) -> Response:
    expected = expected_from(expected_version, if_match(request))
    if expected is None:
        raise e.PreconditionRequired("DELETE needs expected_version (query) or If-Match", key=key)
    agent = require_agent(request, agent_id)
    session = session_of(request, session_id)
    mandate = request.headers.get("x-sbus-mandate")
    context = header_context(request)  # validated (422) before anything is decided
    # Mandate and context belong to the request as they do in a commit's body: a retry
    # presenting another mandate or context is another request, not a replay.
    fingerprint_body = {
        "key": key,
        "expected_version": expected,
        "mandate": mandate,
        "context": context,
    }
    command = c.Submit(
        op="delete",
        writes=(WriteOp(key, expected, "delete"),),
        read_set=(),
        rationale="delete",
        idem=idempotency(request, agent, session, lambda: fingerprint_body),
        mandate=mandate,
        context=context,
    )
    return outcome_response(
        await bus.execute(caller_of(request, agent, session), command), request.scope
    )


@router.get(
    "/history/{key:path}",
    response_model=HistoryOut,
    responses=errs(403, 404, 422),
    summary="Retained history, newest first, with its hash chain",
)
async def history(
    key: KeyPath,
    request: Request,
    bus: BusDep,
    before: Annotated[QueryInt | None, Query(ge=0, le=2**53 - 1)] = None,
    limit: Annotated[QueryInt, Query(ge=1, le=1000)] = 100,
) -> Response:
    # History reveals every retained version's content, so it needs the read right; it
    # records nothing in the DeliveryLog (protocol.md §3).
    caller = token_caller(request)
    entries = await bus.execute(caller, c.History(key, before, limit))
    return json_response(
        {
            "key": key,
            "entries": [
                {
                    "version": h.version,
                    "agent_id": h.agent_id,
                    "committed_at": rfc3339(h.committed_ms),
                    "content": h.content,
                    "deleted": h.deleted,
                    "rationale": h.rationale,
                    "commit_id": h.commit_id,
                    "prev_hash": h.prev_hash,
                    "hash": h.hash,
                }
                for h in entries
            ],
        }
    )
