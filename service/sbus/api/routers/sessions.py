"""Agent sessions: reset, and DeliveryLog registration by LLM proxies."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from sbus.api.deps import (
    BusDep,
    agent_of,
    caller_of,
    require_agent,
    session_of,
    token_agent,
)
from sbus.api.ignored import WireRoute
from sbus.api.openapi import errs
from sbus.api.render import json_response
from sbus.api.schemas import RegisterOut, SessionOut
from sbus.api.wire import RegisterBody, SessionBody
from sbus.core import commands as c
from sbus.core import errors as e

router = APIRouter(tags=["sessions"], route_class=WireRoute)


@router.post(
    "/session",
    response_model=SessionOut,
    responses=errs(403, 422),
    summary="Empty the (agent, session) DeliveryLog",
)
async def reset_session(body: SessionBody, request: Request, bus: BusDep) -> Response:
    bound = token_agent(request)
    if bound is not None and body.agent_id and body.agent_id != bound:
        # Token mode, another agent's session: the caller is the token's agent (the
        # headers still have to name it), and the engine decides whether it may act
        # for body.agent_id (the admin right) before the session named is looked at.
        agent = body.agent_id
        command = c.ResetSession(agent)
        acting = agent_of(request)
        await bus.admit(caller_of(request, acting), command)
        caller = caller_of(request, acting, session_of(request, body.session_id))
    else:
        agent = require_agent(request, body.agent_id)
        command = c.ResetSession(agent)
        caller = caller_of(request, agent, session_of(request, body.session_id))
    await bus.execute(caller, command)
    return json_response({"agent_id": agent, "status": "created"})


@router.post(
    "/delivery_log/register",
    response_model=RegisterOut,
    responses=errs(403, 422),
    summary="Record shards an agent used outside GET (LLM proxy); skip-if-exists",
)
async def register(body: RegisterBody, request: Request, bus: BusDep) -> Response:
    if body.agent_id == "":
        raise e.ValidationFailed(
            "agent_id must not be empty",
            errors=[
                {"loc": ["body", "agent_id"], "msg": "must not be empty", "type": "value_error"}
            ],
        )
    agent = agent_of(request, body.agent_id)
    assert agent is not None
    # The session comes from the header only; the reference proxy always sends a body
    # session_id that the reference server merely logged.
    caller = caller_of(request, agent, session_of(request, None))
    result = await bus.execute(caller, c.Register(tuple(dict.fromkeys(body.shards_used))))
    return json_response(
        {
            "ok": True,
            "registered": result.registered,
            "skipped_existing": result.skipped_existing,
            "skipped_no_shard": result.skipped_no_shard,
        }
    )
