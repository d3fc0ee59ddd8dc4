"""Tracing in token mode (every step of protocol.md section 4 a commit can run: the token
check with its revocation lookup, the rate limit, idempotency, limits, capabilities, the
mandate, the atomic step), the rule that a traced engine refuses exactly as an untraced
one, and tracing being off: no tracer, no wrapped store, no spans."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sbus.api.runtime import runtime_of
from sbus.bootstrap import startup_problem
from sbus.config import Settings
from sbus.core.rights import ALL_RIGHTS, Scope
from sbus.security.tokens import Issuer
from sbus.telemetry import tracing as otel
from tests.telemetry.helpers import build, serve
from tests.telemetry.test_tracing import _server, _trace

SECRET = "s" * 32


def _token(app: FastAPI, agent: str, pattern: str, *rights: str) -> dict[str, str]:
    issuer = Issuer.from_settings(runtime_of(app).settings)
    value, _ = issuer.issue(agent, [Scope.of(pattern, *rights)], 600)
    return {"Authorization": f"Bearer {value}"}


async def test_every_step_of_a_commit_in_token_mode() -> None:
    exporter = InMemorySpanExporter()
    tracing = otel.Tracing.with_processors([SimpleSpanProcessor(exporter)])
    app = build("lean", tracing=tracing, auth="token", secret=SECRET, rate_limit="100/s")
    async with serve(app) as c:
        root = {"Authorization": _token(app, "root", "**", *ALL_RIGHTS)["Authorization"]}
        body = {"key": "pay/1", "content": "0", "policy": {"require_mandate": True}}
        assert (await c.post("/shard", json=body, headers=root)).status_code == 201
        grantor = _token(app, "G", "pay/*", "mandate")
        agent = _token(app, "A", "**", "read", "write")
        order = {"holder": "A", "keys": ["pay/*"], "context": {"order": 7}, "ttl_s": 60}
        granted = await c.post("/mandates", json=order, headers=grantor)
        assert granted.status_code == 201, granted.text
        exporter.clear()
        commit = {
            "key": "pay/1",
            "expected_version": 0,
            "delta": "paid",
            "mandate": granted.json()["mandate"],
            "context": {"order": 7},
        }
        r = await c.post("/commit", json=commit, headers=agent | {"Idempotency-Key": "p-1"})
        assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    server = _server(spans, "POST /commit")
    assert _trace(spans, server) == {
        "POST /commit": [
            ("sbus.auth", [("store.revocation", [])]),
            ("sbus.rate_limit", [("store.take_token", [])]),
            ("sbus.idempotency", [("store.idempotent", [])]),
            ("sbus.limits", []),
            ("sbus.capabilities", []),
            ("sbus.mandate", [("store.now_ms", [])]),
            ("sbus.atomic", [("store.apply", [])]),
            ("sbus.render", []),
        ]
    }
    assert (server.attributes or {})["sbus.agent"] == "A"
    assert (server.attributes or {})["sbus.outcome"] == "committed"


async def _script(c: httpx.AsyncClient) -> list[tuple[int, Any]]:
    """Requests refused at each step the traced engine wraps, and accepted ones."""
    answers: list[tuple[int, Any]] = []

    async def send(method: str, url: str, **kwargs: Any) -> None:
        r = await c.request(method, url, **kwargs)
        body = r.json() if r.content else None
        if isinstance(body, dict):
            body.pop("commit_id", None)
            body.pop("created_at", None)
            body.pop("updated_at", None)
        answers.append((r.status_code, body))

    def commit(version: int, **extra: Any) -> dict[str, Any]:
        return {"key": "k", "expected_version": version, "delta": "x", "agent_id": "A"} | extra

    await send("POST", "/shard", json={"key": "k", "content": "0"}, headers={"X-Agent-Id": "A"})
    await send("POST", "/shard", json={"key": "r", "content": "0"}, headers={"X-Agent-Id": "A"})
    await send("POST", "/commit", json=commit(0, delta="x" * 65))  # limits: 413
    await send("POST", "/commit", json=commit(0, read_set=[{"key": "r", "version_at_read": 0}] * 2))
    await send("POST", "/commit", json=commit(0, mandate="not-a-mandate"))  # mandate: 404
    await send("POST", "/commit", json=commit(0), headers={"Idempotency-Key": "i"})
    await send("POST", "/commit", json=commit(0), headers={"Idempotency-Key": "i"})  # replay
    await send("POST", "/commit", json=commit(1, delta="y"), headers={"Idempotency-Key": "i"})
    await send("POST", "/commit", json=commit(0))  # version mismatch
    await send("GET", "/shard/r?agent_id=A")
    await send("POST", "/commit", json=commit(0, key="r", agent_id="B"))
    await send("POST", "/commit", json=commit(1))  # stale read of r
    await send("POST", "/commit", json=commit(1, agent_id=""))  # no agent
    return answers


async def test_a_traced_engine_answers_as_an_untraced_one() -> None:
    tracing = otel.Tracing.with_processors([SimpleSpanProcessor(InMemorySpanExporter())])
    answers = []
    for traced in (None, tracing):
        app = build("lean", tracing=traced, max_delta=64)
        async with serve(app) as c:
            answers.append(await _script(c))
    untraced, traced_answers = answers
    assert traced_answers == untraced
    statuses = [status for status, _ in untraced]
    assert statuses == [201, 201, 413, 422, 404, 200, 200, 422, 409, 200, 200, 409, 422]


async def test_off_by_default_there_is_no_tracer_and_no_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(otel.ENABLE, raising=False)
    assert otel.Tracing.from_environment() is None
    monkeypatch.setenv(otel.ENABLE, "none")
    assert otel.Tracing.from_environment() is None
    app = build("lean")
    runtime = runtime_of(app)
    assert (runtime.tracing, runtime.bus.tracer) == (None, None)
    assert not isinstance(runtime.bus.store, otel.TracedStore)
    # FastAPI's own telemetry is off too, whatever global provider there may be
    assert app._native_telemetry.enabled() is False


def test_the_sdk_reads_the_exporter_and_service_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(otel.ENABLE, "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "bus-7")
    tracing = otel.Tracing.from_environment()
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == "bus-7"
        app = build("lean", tracing=None)
        assert isinstance(runtime_of(app).bus.store, otel.TracedStore)
        assert runtime_of(app).tracing is not None
    finally:
        tracing.shutdown()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv(otel.ENABLE, "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert [e.__module__ for e in otel.exporters()] == [
        "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    ]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert [e.__module__ for e in otel.exporters()] == [
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    ]
    assert otel._resource().attributes["service.name"] == "sbus"


def test_an_unknown_exporter_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(otel.ENABLE, "carrier-pigeon")
    problem = startup_problem(Settings(store="memory://"))
    assert problem is not None and problem.startswith("OTEL_TRACES_EXPORTER: "), problem
    assert "carrier-pigeon" in problem


def test_off_the_sdk_is_not_even_imported() -> None:
    """A worker without OTEL_TRACES_EXPORTER never loads the OpenTelemetry SDK (its
    imports cost each worker about a tenth of a second at start)."""
    code = (
        "import sys\n"
        "from sbus.bootstrap import create_app, startup_problem\n"
        "from sbus.config import Settings\n"
        "settings = Settings(store='memory://')\n"
        "assert startup_problem(settings) is None\n"
        "create_app(settings)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
