"""Commits: single (compat ``/commit`` and ``/commit/v2``), multi-key, and rollback."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from sbus.api.deps import (
    BusDep,
    checked_bus,
    commit_needs,
    expected_from,
    idempotency,
    if_match,
    mandate_check,
    require_agent,
    session_of,
)
from sbus.api.ignored import WireRoute
from sbus.api.openapi import errs
from sbus.api.render import outcome_response
from sbus.api.schemas import CommitOut, MultiOut, RollbackOut
from sbus.api.wire import CommitBody, MultiCommitBody, ReadSetItem, RollbackBody
from sbus.core import errors as e
from sbus.core.engine import commit_txn
from sbus.core.types import ReadItem, WriteOp

router = APIRouter(tags=["commits"], route_class=WireRoute)

COMMIT_ERRORS = errs(400, 403, 404, 409, 410, 413, 422)


def _read_items(items: list[ReadSetItem] | None) -> list[ReadItem]:
    return [ReadItem(i.key, i.version_at_read) for i in items or ()]


async def _commit(body: CommitBody, request: Request, bus: BusDep) -> Response:
    expected = expected_from(body.expected_version, if_match(request))
    if expected is None:
        raise e.ValidationFailed(
            "expected_version (alias expected_ver) or If-Match is required",
            errors=[
                {"loc": ["body", "expected_version"], "msg": "Field required", "type": "missing"}
            ],
        )
    agent = require_agent(request, body.agent_id)
    session = session_of(request, body.session_id)
    txn = commit_txn(
        op="commit",
        agent_id=agent,
        session_id=session,
        writes=[WriteOp(body.key, expected, "commit", body.delta)],
        read_set=_read_items(body.read_set),
        rationale=body.rationale,
        idem=idempotency(
            request, agent, session, body.model_dump() | {"expected_version": expected}
        ),
        has_mandate=body.mandate is not None,
    )
    check = mandate_check(
        request, bus, body.mandate, agent=agent, written=[body.key], context=body.context
    )
    bus = checked_bus(request, bus, commit_needs([body.key], [i.key for i in body.read_set or ()]))
    return outcome_response(await bus.submit(txn, check))


@router.post(
    "/commit/v2",
    response_model=CommitOut,
    responses=COMMIT_ERRORS,
    summary="Commit a new version of one shard (ORI-checked)",
)
async def commit_v2(body: CommitBody, request: Request, bus: BusDep) -> Response:
    return await _commit(body, request, bus)


@router.post(
    "/commit",
    response_model=CommitOut,
    responses=COMMIT_ERRORS,
    summary="Identical to /commit/v2 (compat)",
)
async def commit(body: CommitBody, request: Request, bus: BusDep) -> Response:
    return await _commit(body, request, bus)


@router.post(
    "/commit/multi",
    response_model=MultiOut,
    responses=COMMIT_ERRORS,
    summary="Commit several shards atomically (all or nothing)",
)
async def commit_multi(body: MultiCommitBody, request: Request, bus: BusDep) -> Response:
    if request.headers.get("if-match") is not None:
        raise e.InvalidPrecondition("If-Match is not accepted on /commit/multi")
    agent = require_agent(request, body.agent_id)
    session = session_of(request, body.session_id)
    txn = commit_txn(
        op="multi",
        agent_id=agent,
        session_id=session,
        writes=[WriteOp(w.key, w.expected_version, "commit", w.delta) for w in body.writes],
        read_set=_read_items(body.read_set),
        rationale=body.rationale,
        idem=idempotency(request, agent, session, body.model_dump()),
        has_mandate=body.mandate is not None,
    )
    check = mandate_check(
        request,
        bus,
        body.mandate,
        agent=agent,
        written=[w.key for w in body.writes],
        context=body.context,
    )
    needs = commit_needs([w.key for w in body.writes], [i.key for i in body.read_set or ()])
    bus = checked_bus(request, bus, needs)
    return outcome_response(await bus.submit(txn, check))


@router.post(
    "/rollback",
    response_model=RollbackOut,
    responses=COMMIT_ERRORS,
    summary="Commit the content of a retained version as a new version",
)
async def rollback(body: RollbackBody, request: Request, bus: BusDep) -> Response:
    expected = expected_from(body.expected_version, if_match(request))
    agent = require_agent(request, body.agent_id)
    session = session_of(request, body.session_id)
    txn = commit_txn(
        op="rollback",
        agent_id=agent,
        session_id=session,
        writes=[WriteOp(body.key, expected, "rollback", target_version=body.target_version)],
        read_set=_read_items(body.read_set),
        rationale=None,
        idem=idempotency(
            request, agent, session, body.model_dump() | {"expected_version": expected}
        ),
        has_mandate=body.mandate is not None,
    )
    check = mandate_check(
        request, bus, body.mandate, agent=agent, written=[body.key], context=body.context
    )
    bus = checked_bus(request, bus, commit_needs([body.key], [i.key for i in body.read_set or ()]))
    return outcome_response(await bus.submit(txn, check))
