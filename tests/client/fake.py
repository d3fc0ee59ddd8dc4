"""A scripted driver for the I/O-free core: it answers each Call from a list, records
every step, and never sleeps, so the core's decisions are tested without a network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import httpx

from sbus_client._core import Core
from sbus_client._retry import TransportRetry
from sbus_client._wire import Call, Op, Reply, Sleep, Step

T = TypeVar("T")
PROBLEM = "application/problem+json"
Answer = (
    httpx.Response | httpx.TransportError | Callable[[Call], httpx.Response | httpx.TransportError]
)


def core(
    *,
    agent_id: str | None = "a",
    token: str | Callable[[], str] | None = None,
    retry: TransportRetry | None = None,
    clock: Callable[[], float] | None = None,
) -> Core:
    """A Core whose backoff always draws the maximum (rand() = 1.0): waits are exact."""
    return Core(
        "http://bus.test",
        agent_id=agent_id,
        token=token,
        retry=retry or TransportRetry(),
        clock=clock or (lambda: 0.0),
        rand=lambda: 1.0,
    )


def drive(op: Op[T], answers: Sequence[Answer]) -> tuple[T, list[Step]]:
    """Run ``op`` to its end; ``answers`` reply to the Calls in order. Returns the
    result and every step the op took. Fails if an answer is left over or missing."""
    steps: list[Step] = []
    pending = list(answers)
    reply: Reply = None
    while True:
        try:
            step = op.send(reply)
        except StopIteration as done:
            assert not pending, f"unused answers: {pending}"
            return cast(T, done.value), steps
        steps.append(step)
        if isinstance(step, Sleep):
            reply = None
            continue
        assert pending, f"no answer left for {step}"
        answer = pending.pop(0)
        reply = answer(step) if callable(answer) else answer


def calls(steps: Sequence[Step]) -> list[Call]:
    return [s for s in steps if isinstance(s, Call)]


def sleeps(steps: Sequence[Step]) -> list[float]:
    return [s.seconds for s in steps if isinstance(s, Sleep)]


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def problem(
    status: int, code: str, headers: dict[str, str] | None = None, **fields: Any
) -> httpx.Response:
    body = {
        "type": f"https://sbus.dev/problems/{code}",
        "title": code,
        "status": status,
        "detail": fields.pop("detail", f"{code} happened"),
        "error": code,
        **fields,
    }
    return httpx.Response(status, json=body, headers={"content-type": PROBLEM, **(headers or {})})


def shard_body(key: str, version: int, content: str) -> dict[str, Any]:
    return {
        "key": key,
        "id": "0" * 64,
        "version": version,
        "content": content,
        "owner": None,
        "goal_tag": "",
        "attempt_count": 0,
        "conflict_count": 0,
        "delta_log_depth": version,
        "created_at": "2026-01-01T00:00:00.000Z",
        "updated_at": "2026-01-01T00:00:00.000Z",
        "policy": {"require_mandate": False},
    }


def shard_response(key: str, version: int, content: str) -> httpx.Response:
    return json_response(200, shard_body(key, version, content), {"ETag": f'"{version}"'})


def committed_response(version: int, *, replayed: bool = False) -> httpx.Response:
    headers = {"ETag": f'"{version}"'}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    body = {"new_version": version, "shard_id": "0" * 64, "commit_id": "c" * 32}
    return json_response(200, body, headers)


def connect_error() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")
