"""Admin endpoints: gated by the admin right in every mode (open mode:
SBUS_ADMIN_ENABLED=1), except health, which is never gated, and GET /admin/config,
which any authenticated caller may read. POST /admin/tokens issues capability tokens."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from sbus.api.deps import (
    AdminDep,
    BusDep,
    RuntimeDep,
    SettingsDep,
    agent_of,
    checked_bus,
    session_of,
)
from sbus.api.ignored import WireRoute
from sbus.api.openapi import errs
from sbus.api.render import json_response
from sbus.api.schemas import (
    AlreadyExistsOut,
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
from sbus.core import errors as e
from sbus.core import revocation
from sbus.core.clock import offset_cap_ms, rfc3339
from sbus.core.engine import new_commit_id
from sbus.core.rights import Right, Scope
from sbus.core.rules import shard_body
from sbus.core.types import CreateOp
from sbus.security import SigningUnavailable

router = APIRouter(prefix="/admin", tags=["admin"], route_class=WireRoute)


@router.post(
    "/reset",
    response_model=ResetOut,
    responses=errs(403),
    dependencies=[AdminDep],
    summary="Delete all state except ori_enabled",
)
async def reset(bus: BusDep, _body: OptionalNoFields = NO_FIELDS) -> Response:
    return json_response({"cleared": await bus.store.reset_all()})


async def _config_body(bus: BusDep) -> dict[str, object]:
    stats = await bus.store.stats()
    return {
        "ok": True,
        "ori_enabled": stats.ori_enabled,
        "view_checked_commits": stats.counters.view_checked_commits,
        "view_divergent_commits": stats.counters.view_divergent_commits,
    }


@router.get("/config", response_model=ConfigOut, summary="The ORI flag and view counters")
async def get_config(bus: BusDep) -> Response:
    return json_response(await _config_body(bus))


@router.post(
    "/config",
    response_model=ConfigOut,
    responses=errs(403, 422),
    dependencies=[AdminDep],
    summary="Turn ORI on or off (kept in the store)",
)
async def set_config(body: ConfigBody, bus: BusDep) -> Response:
    await bus.store.set_ori(body.ori_enabled)
    return json_response(await _config_body(bus))


@router.get(
    "/delivery-log",
    response_model=DeliveryLogOut,
    responses=errs(403, 422),
    dependencies=[AdminDep],
    summary="Live DeliveryLog entries, paged by agent",
)
async def delivery_log(
    bus: BusDep,
    limit: Annotated[QueryInt, Query(ge=1, le=10_000)] = 1000,
    after: Annotated[Text | None, Query(max_length=256)] = None,
) -> Response:
    sessions, next_after = await bus.store.dump_delivery_log(after, limit)
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


@router.post(
    "/inject-stale",
    response_model=InjectOut,
    responses=errs(403, 404, 422),
    dependencies=[AdminDep],
    summary="Overwrite a DeliveryLog entry with an older version (experiments)",
)
async def inject_stale(body: InjectStaleBody, request: Request, bus: BusDep) -> Response:
    session = session_of(request, body.session_id)
    await bus.store.inject_stale(body.agent_id, session, body.key, body.stale_version)
    return json_response({"injected": True})


@router.post(
    "/shard",
    status_code=201,
    response_model=ShardOut,
    responses={
        200: {"model": AlreadyExistsOut, "description": "Already exists"},
        **errs(401, 403, 413, 422),
    },
    dependencies=[AdminDep],
    summary="Create a shard unless it exists (experiment harness)",
)
async def admin_shard(body: CreateShardBody, request: Request, bus: BusDep) -> Response:
    op = CreateOp(
        key=body.key,
        content=body.content,
        goal_tag=body.goal_tag,
        require_mandate=body.policy.require_mandate,
        agent_id=agent_of(request, body.agent_id) or "",
        commit_id=new_commit_id(),
    )
    shard = await checked_bus(request, bus, [(body.key, Right.CREATE)]).admin_create(op)
    if shard is None:
        return json_response({"status": "already_exists"})
    return json_response(shard_body(shard), status=201, etag=shard.version)


@router.post(
    "/test/advance-clock",
    response_model=ClockOut,
    responses=errs(403, 404, 422),
    dependencies=[AdminDep],
    summary="Move the store clock forward (only with SBUS_TEST_HOOKS=1)",
)
async def advance_clock(body: AdvanceClockBody, bus: BusDep, settings: SettingsDep) -> Response:
    if not settings.test_hooks:
        raise e.RouteNotFound("test hooks are disabled; set SBUS_TEST_HOOKS=1")
    token_ttl = settings.token_max_ttl if settings.auth_mode == "token" else None
    offset = await bus.store.advance_clock(body.ms, offset_cap_ms(token_ttl))
    return json_response({"offset_ms": offset, "now_ms": await bus.store.now_ms()})


@router.post(
    "/tokens",
    status_code=201,
    response_model=TokenOut,
    responses=errs(401, 403, 422, 503),
    dependencies=[AdminDep],
    summary="Issue a capability token (503 SigningUnavailable on a verify-only replica)",
)
async def issue_token(body: TokenBody, runtime: RuntimeDep) -> Response:
    issuer = runtime.issuer
    if issuer is None:
        raise SigningUnavailable(f"this deployment has no token keys: {runtime.no_issuer_reason}")
    scopes = [
        Scope.from_json(scope.model_dump(), loc=["body", "scopes", i])
        for i, scope in enumerate(body.scopes)
    ]
    token, claims = issuer.issue(body.agent, scopes, body.ttl_s)
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
    response_model=RevokeOut,
    responses=errs(401, 403, 422, 503),
    dependencies=[AdminDep],
    summary="Revoke a token by jti on every replica (kept until its expiry)",
)
async def revoke_token(body: RevokeBody, bus: BusDep, settings: SettingsDep) -> Response:
    until_ms = await revocation.revoke_token(
        bus.store,
        body.jti,
        body.exp,
        leeway_s=settings.clock_leeway,
        max_ttl_s=settings.token_max_ttl,
    )
    return json_response({"revoked": True, "jti": body.jti, "until": rfc3339(until_ms)})
