"""The HTTPException fallback keeps one status on the wire and in the problem body."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from sbus.bootstrap import create_app
from sbus.config import Settings


async def test_unmapped_http_status_is_a_consistent_problem() -> None:
    app = create_app(Settings(store="memory://"))
    handler = app.exception_handlers[StarletteHTTPException]
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    response = await handler(request, StarletteHTTPException(418, "teapot"))  # type: ignore[misc]
    body = json.loads(bytes(response.body))
    assert response.status_code == 418
    assert response.media_type == "application/problem+json"
    assert (body["status"], body["error"], body["detail"]) == (418, "BadRequest", "teapot")
    missing = await handler(request, StarletteHTTPException(404))  # type: ignore[misc]
    assert missing.status_code == 404
    assert json.loads(bytes(missing.body))["error"] == "NotFound"
