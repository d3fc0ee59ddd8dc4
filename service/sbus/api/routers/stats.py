"""Observability: /stats (compat), /metrics, /livez, /version and /admin/health."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from sbus import API_VERSION, __version__
from sbus.api.deps import BusDep, RuntimeDep, caller_of, public_caller
from sbus.api.ignored import WireRoute
from sbus.api.readiness import SHUTTING_DOWN
from sbus.api.render import json_response
from sbus.api.runtime import Runtime, public_reason
from sbus.api.schemas import HealthOut, StatsOut, VersionOut
from sbus.core.commands import ReadStats
from sbus.core.errors import StoreUnavailable

router = APIRouter(tags=["observability"], route_class=WireRoute)


def _not_ready(runtime: Runtime, detail: str | None, public: str) -> Response:
    token_mode = runtime.settings.auth_mode == "token"
    reason = public if token_mode else detail
    return json_response(
        {"status": "not_ready", "version": __version__, "reason": reason}, status=503
    )


@router.get("/stats", response_model=StatsOut, summary="Counters (compat fields plus backend)")
async def stats(request: Request, bus: BusDep) -> Response:
    s = await bus.execute(caller_of(request, None), ReadStats())
    c = s.counters
    attempts = c.total_commits + c.total_conflicts
    return json_response(
        {
            "total_shards": s.total_shards,
            "total_commits": c.total_commits,
            "total_conflicts": c.total_conflicts,
            "cross_shard_stale": c.cross_shard_stale,
            "view_divergent_commits": c.view_divergent_commits,
            "view_checked_commits": c.view_checked_commits,
            "view_divergence_rate": (
                c.view_divergent_commits / c.view_checked_commits if c.view_checked_commits else 0.0
            ),
            "ori_enabled": s.ori_enabled,
            "total_attempts": attempts,
            "scr": c.total_conflicts / attempts if attempts else 0.0,
            "wal_enabled": bus.durable,
            "delivery_log": {"agents": s.dl_agents, "deliveries": s.dl_deliveries},
            "backend": bus.backend,
        }
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    if not runtime.ready:
        raise StoreUnavailable("the store is not ready yet")
    stats = await runtime.bus.execute(caller_of(request, None), ReadStats())
    body = runtime.metrics.exposition(stats)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get(
    "/livez",
    summary="Process liveness: answers without a token and before the store is ready",
    description="Open mode still applies the Host and cross-site checks of every route.",
)
async def livez() -> Response:
    return json_response({"status": "alive"})


@router.get(
    "/version",
    response_model=VersionOut,
    summary="The server's release and wire protocol version; answers without a token and "
    "before the store is ready",
    description="Open mode still applies the Host and cross-site checks of every route.",
)
async def version() -> Response:
    return json_response({"name": "sbus", "version": __version__, "api": API_VERSION})


@router.get(
    "/admin/health",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "Store not ready, or shutting down"}},
    summary="Readiness: 200 when the store answers (on every worker), else 503 not_ready; "
    "503 from the moment a worker begins to shut down",
)
async def health(request: Request, runtime: RuntimeDep) -> Response:
    if runtime.stopping:
        return json_response(
            {"status": "not_ready", "version": __version__, "reason": SHUTTING_DOWN}, status=503
        )
    if not runtime.ready:
        return _not_ready(runtime, runtime.not_ready_reason, runtime.not_ready_public)
    waiting = runtime.readiness.waiting_for()
    if waiting is not None:
        return json_response(
            {"status": "not_ready", "version": __version__, "reason": waiting}, status=503
        )
    try:
        s = await runtime.bus.execute(public_caller(request), ReadStats())
    except StoreUnavailable as exc:
        return _not_ready(runtime, exc.detail, public_reason(exc))
    return json_response(
        {
            "status": "ok",
            "version": __version__,
            "total_shards": s.total_shards,
            "total_commits": s.counters.total_commits,
            "total_conflicts": s.counters.total_conflicts,
            "delivery_agents": s.dl_agents,
        }
    )
