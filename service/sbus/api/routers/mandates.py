"""Mandates (protocol.md §5): consume-once authorizations for side-effecting commits,
issued by an agent holding the mandate right to a holder, for key patterns and a
context. The commit that carries one consumes it in the store's atomic step."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from sbus.api.deps import BusDep, agent_of, caller_of
from sbus.api.ignored import WireRoute
from sbus.api.openapi import errs
from sbus.api.render import json_response
from sbus.api.schemas import MandateOut
from sbus.api.wire import MandateBody
from sbus.core import commands as c
from sbus.core import errors as e
from sbus.core.clock import rfc3339

router = APIRouter(tags=["mandates"], route_class=WireRoute)


@router.post(
    "/mandates",
    status_code=201,
    response_model=MandateOut,
    responses=errs(401, 403, 422, 503),
    summary="Issue a consume-once mandate (needs the mandate right)",
)
async def issue_mandate(body: MandateBody, request: Request, bus: BusDep) -> Response:
    # The grantor: the token's agent (403 AgentMismatch if the body names another), or
    # in open mode the agent the request names.
    agent = agent_of(request, body.agent_id)
    if agent is None:
        raise e.ValidationFailed(
            "agent_id is required to issue a mandate", loc=["body", "agent_id"]
        )
    command = c.IssueMandate(body.holder, tuple(body.keys), body.context, body.ttl_s)
    token, claims = await bus.execute(caller_of(request, agent), command)
    return json_response(
        {
            "mandate": token,
            "jti": claims.jti,
            "expires_at": rfc3339(claims.expires_at * 1000),
            "context_hash": claims.context_hash,
        },
        status=201,
    )
