"""Admin endpoints. The engine's rights table gates them by the admin right in every mode
(open mode: SBUS_ADMIN_ENABLED=1), except GET /admin/config, which any authenticated
caller may read (health, never gated, is in the stats router). Each route has the engine
refuse a caller without the right before its body is validated (``admitted``). POST /admin/tokens
issues capability tokens."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from sbus.api.deps import (
    BusDep,
    SettingsDep,
    admitted,
    agent_of,
    caller_of,
    session_of,
    token_caller,
)
from sbus.api.ignored import WireRoute
from sbus.api.openapi import errs
from sbus.api.render import json_response
from sbus.api.schemas import (
    AlreadyExistsOut,
    AuditOut,
    ClockOut,
    ConfigOut,
    DeliveryLogOut,
    InjectOut,
    ResetOut,
    RevokeOut,
    ShardOut,
    TokenOut,
)
from sbus.api.wire import (
    NO_FIELDS,
    AdvanceClockBody,
    ConfigBody,
    CreateShardBody,
    InjectStaleBody,
    OptionalNoFields,
    QueryInt,
    RevokeBody,
    Text,
    TokenBody,
)
from sbus.core import commands as c
from sbus.core.audit import MAX_PAGE, page_json
from sbus.core.clock import offset_cap_ms, rfc3339
from sbus.core.rights import Scope
from sbus.core.rules import shard_body
from sbus.core.types import StoreStats

router = APIRouter(prefix="/admin", tags=["admin"], route_class=WireRoute)


@router.post(
    "/reset",
    dependencies=[admitted(c.ResetAll)],
    response_model=ResetOut,
    responses=errs(403),
    summary="Delete all state except ori_enabled",
)
async def reset(request: Request, bus: BusDep, _body: OptionalNoFields = NO_FIELDS) -> Response:
    return json_response({"cleared": await bus.execute(token_caller(request), c.ResetAll())})


def _config_body(stats: StoreStats) -> dict[str, object]:
    return {
        "ok": True,
        "ori_enabled": stats.ori_enabled,
        "view_checked_commits": stats.counters.view_checked_commits,
        "view_divergent_commits": stats.counters.view_divergent_commits,
    }


@router.get("/config", response_model=ConfigOut, summary="The ORI flag and view counters")
async def get_config(request: Request, bus: BusDep) -> Response:
    return json_response(_config_body(await bus.execute(token_caller(request), c.GetConfig())))


@router.post(
    "/config",
    dependencies=[admitted(c.SetConfig)],
    response_model=ConfigOut,
    responses=errs(403, 422),
    summary="Turn ORI on or off (kept in the store)",
)
async def set_config(body: ConfigBody, request: Request, bus: BusDep) -> Response:
    stats = await bus.execute(token_caller(request), c.SetConfig(body.ori_enabled))
    return json_response(_config_body(stats))


@router.get(
    "/delivery-log",
    dependencies=[admitted(c.DumpDeliveryLog)],
    response_model=DeliveryLogOut,
    responses=errs(403, 422),
    summary="Live DeliveryLog entries, paged by agent",
)
async def delivery_log(
    request: Request,
    bus: BusDep,
    limit: Annotated[QueryInt, Query(ge=1, le=10_000)] = 1000,
    after: Annotated[Text | None, Query(max_length=256)] = None,
) -> Response:
    command = c.DumpDeliveryLog(after, limit)
    sessions, next_after = await bus.execute(token_caller(request), command)
    agents = {agent: by_session[""] for agent, by_session in sessions.items() if "" in by_session}
    total = sum(len(entries) for by_session in sessions.values() for entries in by_session.values())
    return json_response(
        {
            "agents": agents,
            "sessions": sessions,
            "total_agents": len(sessions),
            "total_deliveries": total,
            "next_after": next_after,
        }
    )


@router.get(
    "/audit",
    dependencies=[admitted(c.ReadAudit)],
    response_model=AuditOut,
    responses=errs(403, 422),
    summary="The audit log, oldest first, paged by entry id",
)
async def audit_log(
    request: Request,
    bus: BusDep,
    limit: Annotated[QueryInt, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[QueryInt | None, Query(ge=0, le=2**53 - 1)] = None,
) -> Response:
    # One more than asked shows whether a next page exists.
    entries = await bus.execute(token_caller(request), c.ReadAudit(after, limit + 1))
    return json_response(page_json(entries, limit))


@router.post(
    "/inject-stale",
    dependencies=[admitted(c.InjectStale)],
    response_model=InjectOut,
    responses=errs(403, 404, 422),
    summary="Overwrite a DeliveryLog entry with an older version (experiments)",
)
async def inject_stale(body: InjectStaleBody, request: Request, bus: BusDep) -> Response:
    caller = caller_of(request, None, session_of(request, body.session_id))
    await bus.execute(caller, c.InjectStale(body.agent_id, body.key, body.stale_version))
    return json_response({"injected": True})


@router.post(
    "/shard",
    dependencies=[admitted(c.AdminCreate)],
    status_code=201,
    response_model=ShardOut,
    responses={
        200: {"model": AlreadyExistsOut, "description": "Already exists"},
        **errs(401, 403, 413, 422),
    },
    summary="Create a shard unless it exists (experiment harness)",
)
async def admin_shard(body: CreateShardBody, request: Request, bus: BusDep) -> Response:
    command = c.AdminCreate(
        key=body.key,
        content=body.content,
        goal_tag=body.goal_tag,
        require_mandate=body.policy.require_mandate,
    )
    shard = await bus.execute(caller_of(request, agent_of(request, body.agent_id)), command)
    if shard is None:
        return json_response({"status": "already_exists"})
    return json_response(shard_body(shard), status=201, etag=shard.version)


@router.post(
    "/test/advance-clock",
    dependencies=[admitted(c.AdvanceClock)],
    response_model=ClockOut,
    responses=errs(403, 404, 422),
    summary="Move the store clock forward (only with SBUS_TEST_HOOKS=1)",
)
async def advance_clock(
    body: AdvanceClockBody, request: Request, bus: BusDep, settings: SettingsDep
) -> Response:
    token_ttl = settings.token_max_ttl if settings.auth_mode == "token" else None
    command = c.AdvanceClock(body.ms, offset_cap_ms(token_ttl), enabled=settings.test_hooks)
    offset, now = await bus.execute(token_caller(request), command)
    return json_response({"offset_ms": offset, "now_ms": now})


@router.post(
    "/tokens",
    dependencies=[admitted(c.IssueToken)],
    status_code=201,
    response_model=TokenOut,
    responses=errs(401, 403, 422, 503),
    summary="Issue a capability token (503 SigningUnavailable on a verify-only replica)",
)
async def issue_token(body: TokenBody, request: Request, bus: BusDep) -> Response:
    scopes = tuple(
        Scope.from_json(scope.model_dump(), loc=["body", "scopes", i])
        for i, scope in enumerate(body.scopes)
    )
    command = c.IssueToken(body.agent, scopes, body.ttl_s)
    token, claims = await bus.execute(token_caller(request), command)
    return json_response(
        {
            "token": token,
            "jti": claims.jti,
            "expires_at": rfc3339(claims.expires_at * 1000),
            "claims": claims.to_json(),
        },
        status=201,
    )


@router.post(
    "/tokens/revoke",
    dependencies=[admitted(c.RevokeToken)],
    response_model=RevokeOut,
    responses=errs(401, 403, 422, 503),
    summary="Revoke a token by jti on every replica (kept until its expiry)",
)
async def revoke_token(
    body: RevokeBody, request: Request, bus: BusDep, settings: SettingsDep
) -> Response:
    command = c.RevokeToken(
        body.jti, body.exp, leeway_s=settings.clock_leeway, max_ttl_s=settings.token_max_ttl
    )
    until_ms = await bus.execute(token_caller(request), command)
    return json_response({"revoked": True, "jti": body.jti, "until": rfc3339(until_ms)})
