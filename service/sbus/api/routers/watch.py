"""The change stream: ``GET /watch`` (protocol.md section 3.11)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response

from sbus.api.deps import BusDep, SettingsDep, token_caller
from sbus.api.ignored import WireRoute
from sbus.api.openapi import errs
from sbus.api.sse import MEDIA_TYPE, EventStream
from sbus.api.wire import KeyPrefix
from sbus.core import commands as c

router = APIRouter(tags=["watch"], route_class=WireRoute)

STREAM_DOC = (
    "Server-Sent Events. First a comment `: subscribed <cursor>`; then per committed "
    "version of a matching key an event with `id: <cursor>` and `data: {key, version, op, "
    "agent_id, commit_id, committed_at}` (`op`: create, commit, rollback or delete); with "
    '`include=conflicts`, `event: conflict` with `data: {key, op: "conflict", agent_id, '
    "error, stale_keys}`; `: heartbeat` comments; `event: reset` with data "
    '`{"reason": "cursor_expired"}` when Last-Event-ID is too old to resume.'
)


@router.get(
    "/watch",
    response_class=Response,
    responses={
        200: {"content": {MEDIA_TYPE: {"schema": {"type": "string"}}}, "description": STREAM_DOC},
        **errs(400, 403, 422),
    },
    summary="Stream the committed versions of keys under a prefix (Server-Sent Events)",
)
async def watch(
    request: Request,
    bus: BusDep,
    settings: SettingsDep,
    # Absent or empty: every key (the dashboard's default view).
    prefix: Annotated[
        KeyPrefix, Query(description="Watch the keys starting with this (absent: every key)")
    ] = "",
    include: Annotated[
        Literal["conflicts"] | None,
        Query(description="conflicts: also refused commits (admin right)"),
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="Resume after this event's cursor"),
    ] = None,
) -> Response:
    command = c.Watch(prefix, last_event_id, conflicts=include == "conflicts")
    # The token's agent, so the audit log and the request log can name the watcher.
    feed = await bus.execute(token_caller(request), command)
    return EventStream(
        feed,
        poll_s=settings.watch_poll_ms / 1000,
        heartbeat_s=settings.watch_heartbeat,
        send_timeout_s=settings.watch_send_timeout,
    )
