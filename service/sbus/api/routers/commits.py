"""Commits: single (compat ``/commit`` and ``/commit/v2``), multi-key, and rollback."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from sbus.api.deps import (
    BusDep,
    caller_of,
    expected_from,
    idempotency,
    if_match,
    require_agent,
    session_of,
)
from sbus.api.ignored import WireRoute
from sbus.api.lean import hot
from sbus.api.openapi import errs
from sbus.api.render import outcome_response
from sbus.api.schemas import CommitOut, MultiOut, RollbackOut
from sbus.api.wire import CommitBody, MultiCommitBody, MultiWrite, ReadSetItem, RollbackBody
from sbus.core import commands as c
from sbus.core import errors as e
from sbus.core.types import ReadItem, WriteOp

router = APIRouter(tags=["commits"], route_class=WireRoute)

COMMIT_ERRORS = errs(400, 403, 404, 409, 410, 413, 422)


def _read_items(items: list[ReadSetItem] | None) -> tuple[ReadItem, ...]:
    return tuple(ReadItem(i.key, i.version_at_read) for i in items or ())


def _problem(i: int, field: str, msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": ["body", "writes", i, field], "msg": msg, "type": kind}


def _write_problems(i: int, w: MultiWrite) -> list[dict[str, Any]]:
    """What makes a write not one of the three kinds (protocol.md §3.1). A field the
    kind does not take is refused, not ignored: a delete's stray delta or a create's
    stray expected_version means the caller meant something else."""
    if w.create and w.delete:
        return [_problem(i, "delete", "a write is a create or a delete, not both")]
    found: list[dict[str, Any]] = []
    if w.create:
        if w.expected_version is not None:
            found.append(
                _problem(
                    i,
                    "expected_version",
                    "a create takes no expected_version: it is refused (409 "
                    "ShardAlreadyExists) while the key is live",
                )
            )
        if w.delta is None:
            found.append(_problem(i, "delta", "Field required", "missing"))
        return found
    if w.expected_version is None:
        found.append(_problem(i, "expected_version", "Field required", "missing"))
    if w.delete:
        if w.delta is not None:
            found.append(_problem(i, "delta", "a delete takes no delta"))
    elif w.delta is None:
        found.append(_problem(i, "delta", "Field required", "missing"))
    for name in ("goal_tag", "policy"):
        if getattr(w, name) is not None:
            found.append(_problem(i, name, f"{name} is only for a create"))
    return found


def _multi_writes(writes: list[MultiWrite]) -> tuple[tuple[WriteOp, ...], list[dict[str, Any]]]:
    """The writes of a multi-commit as WriteOps, and as their fingerprint form: each
    kind with exactly its own fields, defaults filled in, so a plain commit write
    fingerprints as it always did and a create sent with or without its default
    goal_tag is one request. Raises ValidationFailed listing every misformed write."""
    problems = [p for i, w in enumerate(writes) for p in _write_problems(i, w)]
    if problems:
        raise e.ValidationFailed(
            f"writes[{problems[0]['loc'][2]}].{problems[0]['loc'][3]}: {problems[0]['msg']}",
            errors=problems,
        )
    ops: list[WriteOp] = []
    prints: list[dict[str, Any]] = []
    for w in writes:
        if w.create:
            assert w.delta is not None
            goal = w.goal_tag or ""
            mandate = w.policy is not None and w.policy.require_mandate
            ops.append(
                WriteOp(w.key, None, "create", w.delta, goal_tag=goal, require_mandate=mandate)
            )
            prints.append(
                {
                    "key": w.key,
                    "create": True,
                    "delta": w.delta,
                    "goal_tag": goal,
                    "policy": {"require_mandate": mandate},
                }
            )
        elif w.delete:
            ops.append(WriteOp(w.key, w.expected_version, "delete"))
            prints.append({"key": w.key, "delete": True, "expected_version": w.expected_version})
        else:
            assert w.delta is not None
            ops.append(WriteOp(w.key, w.expected_version, "commit", w.delta))
            prints.append({"key": w.key, "expected_version": w.expected_version, "delta": w.delta})
    return tuple(ops), prints


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
    command = c.Submit(
        op="commit",
        writes=(WriteOp(body.key, expected, "commit", body.delta),),
        read_set=_read_items(body.read_set),
        rationale=body.rationale,
        idem=idempotency(
            request, agent, session, lambda: body.model_dump() | {"expected_version": expected}
        ),
        mandate=body.mandate,
        context=body.context,
    )
    return outcome_response(
        await bus.execute(caller_of(request, agent, session), command), request.scope
    )


@router.post(
    "/commit/v2",
    response_model=CommitOut,
    responses=COMMIT_ERRORS,
    summary="Commit a new version of one shard (ORI-checked)",
)
@hot
async def commit_v2(body: CommitBody, request: Request, bus: BusDep) -> Response:
    return await _commit(body, request, bus)


@router.post(
    "/commit",
    response_model=CommitOut,
    responses=COMMIT_ERRORS,
    summary="Identical to /commit/v2 (compat)",
)
@hot
async def commit(body: CommitBody, request: Request, bus: BusDep) -> Response:
    return await _commit(body, request, bus)


@router.post(
    "/commit/multi",
    response_model=MultiOut,
    responses=COMMIT_ERRORS,
    summary="Commit, create and delete several shards atomically (all or nothing)",
)
async def commit_multi(body: MultiCommitBody, request: Request, bus: BusDep) -> Response:
    if request.headers.get("if-match") is not None:
        raise e.InvalidPrecondition("If-Match is not accepted on /commit/multi")
    writes, prints = _multi_writes(body.writes)
    agent = require_agent(request, body.agent_id)
    session = session_of(request, body.session_id)
    command = c.Submit(
        op="multi",
        writes=writes,
        read_set=_read_items(body.read_set),
        rationale=body.rationale,
        idem=idempotency(request, agent, session, lambda: body.model_dump() | {"writes": prints}),
        mandate=body.mandate,
        context=body.context,
    )
    return outcome_response(
        await bus.execute(caller_of(request, agent, session), command), request.scope
    )


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
    command = c.Submit(
        op="rollback",
        writes=(WriteOp(body.key, expected, "rollback", target_version=body.target_version),),
        read_set=_read_items(body.read_set),
        rationale=None,
        idem=idempotency(
            request, agent, session, lambda: body.model_dump() | {"expected_version": expected}
        ),
        mandate=body.mandate,
        context=body.context,
    )
    return outcome_response(
        await bus.execute(caller_of(request, agent, session), command), request.scope
    )
