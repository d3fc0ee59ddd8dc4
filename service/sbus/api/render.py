"""Rendering handler results: orjson bodies, ETags and idempotent-replay headers."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Scope

from sbus.core.types import Outcome
from sbus.telemetry.exchange import COMMITTED, REPLAYED, note_outcome


def json_response(body: Any, status: int = 200, etag: int | None = None) -> Response:
    headers = {"ETag": f'"{etag}"'} if etag is not None else None
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def outcome_response(outcome: Outcome, scope: Scope) -> Response:
    """A state change's answer; ``scope`` (the request's) learns whether it committed
    or replayed (its log line and span, sbus.telemetry.requests)."""
    note_outcome(scope, REPLAYED if outcome.replayed else COMMITTED)
    headers: dict[str, str] = {}
    if outcome.etag is not None:
        headers["ETag"] = f'"{outcome.etag}"'
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    if outcome.body is None:
        return Response(status_code=outcome.status, headers=headers)
    return Response(
        orjson.dumps(outcome.body),
        status_code=outcome.status,
        media_type="application/json",
        headers=headers,
    )
