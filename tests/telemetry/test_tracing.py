"""Tracing (``sbus.telemetry.tracing``, docs/observability.md) on every store and on both
request paths: a commit's server span is the child of the caller's ``traceparent`` and
has a child span per step of the commit protocol (protocol.md section 4, in order) and
per store call, with the agent, session, keys written, read-set size and outcome; a
refused commit names the stale keys. The spans are read from the SDK's in-memory
exporter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sbus.telemetry.tracing import Tracing
from tests.conftest import store_url
from tests.telemetry.helpers import PATHS, build, serve

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
DB_SYSTEM = {"memory": "memory", "sqlite": "sqlite", "postgres": "postgresql", "redis": "redis"}

Traced = Callable[..., Any]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(params=PATHS)
async def traced(
    request: pytest.FixtureRequest,
    store_kind: str,
    tmp_path: Path,
    exporter: InMemorySpanExporter,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a traced app over every store, by each request path."""
    tracing = Tracing.with_processors([SimpleSpanProcessor(exporter)])
    app = build(request.param, tracing=tracing, store=store_url(store_kind, tmp_path))
    async with serve(app) as client:
        yield client


def _id(value: int, width: int = 16) -> str:
    return format(value, f"0{width}x")


def _trace(spans: tuple[ReadableSpan, ...], server: ReadableSpan) -> dict[str, Any]:
    """The tree under ``server``: {name: (attributes, {child name: ...})}, children in
    the order they started."""

    def children(span: ReadableSpan) -> list[ReadableSpan]:
        found = [
            s for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id
        ]
        return sorted(found, key=lambda s: s.start_time or 0)

    def node(span: ReadableSpan) -> Any:
        return [(child.name, node(child)) for child in children(span)]

    return {server.name: node(server)}


def _server(spans: tuple[ReadableSpan, ...], route: str) -> ReadableSpan:
    found = [s for s in spans if s.kind == SpanKind.SERVER and s.name == route]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


async def test_a_commit_is_one_span_tree_under_the_callers_span(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter, store_kind: str
) -> None:
    c = traced
    for key in ("plan", "spec"):
        r = await c.post("/shard", json={"key": key, "content": "0"}, headers={"X-Agent-Id": "A"})
        assert r.status_code == 201
    exporter.clear()
    commit = {
        "key": "plan",
        "expected_version": 0,
        "delta": "1",
        "agent_id": "A",
        "session_id": "task",
        "read_set": [{"key": "spec", "version_at_read": 0}],
    }
    headers = {"traceparent": TRACEPARENT, "Idempotency-Key": "c-1", "X-Request-Id": "t-1"}
    r = await c.post("/commit/v2", json=commit, headers=headers)
    assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    server = _server(spans, "POST /commit/v2")
    assert server.parent is not None
    assert (_id(server.context.trace_id, 32), _id(server.parent.span_id)) == (TRACE_ID, PARENT_ID)
    assert {_id(s.context.trace_id, 32) for s in spans} == {TRACE_ID}
    assert _trace(spans, server) == {
        "POST /commit/v2": [
            ("sbus.auth", []),
            ("sbus.idempotency", [("store.idempotent", [])]),
            ("sbus.limits", []),
            ("sbus.capabilities", []),
            ("sbus.atomic", [("store.apply", [])]),
            ("sbus.render", []),
        ]
    }
    attributes = dict(server.attributes or {})
    assert attributes == {
        "http.request.method": "POST",
        "url.path": "/commit/v2",
        "url.scheme": "http",
        "http.route": "/commit/v2",
        "http.response.status_code": 200,
        "sbus.request_id": "t-1",
        "sbus.agent": "A",
        "sbus.session": "task",
        "sbus.op": "commit",
        "sbus.keys_written": ("plan",),
        "sbus.read_set.size": 1,
        "sbus.outcome": "committed",
    }
    assert server.status.status_code == StatusCode.UNSET
    apply = next(s for s in spans if s.name == "store.apply")
    assert apply.kind == SpanKind.CLIENT
    assert dict(apply.attributes or {}) == {
        "db.system.name": DB_SYSTEM[store_kind],
        "db.operation.name": "apply",
    }
    # the replay of the same request: the idempotency step answers, the store is not asked
    exporter.clear()
    r = await c.post("/commit/v2", json=commit, headers={"Idempotency-Key": "c-1"})
    assert r.headers["idempotent-replayed"] == "true"
    spans = exporter.get_finished_spans()
    server = _server(spans, "POST /commit/v2")
    assert server.parent is None  # no traceparent: a trace of its own
    assert _trace(spans, server) == {
        "POST /commit/v2": [
            ("sbus.auth", []),
            ("sbus.idempotency", [("store.idempotent", [])]),
            ("sbus.render", []),
        ]
    }
    assert (server.attributes or {})["sbus.outcome"] == "replayed"


async def test_a_stale_read_names_its_keys_and_the_refusing_step(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    c = traced
    for key in ("a", "plan", "spec"):
        r = await c.post("/shard", json={"key": key, "content": "0"}, headers={"X-Agent-Id": "A"})
        assert r.status_code == 201
    # A reads a and spec (recorded), B moves both on, A's commit of plan is stale
    for key in ("a", "spec"):
        assert (await c.get(f"/shard/{key}?agent_id=A")).status_code == 200
        moved = {"key": key, "expected_version": 0, "delta": "B", "agent_id": "B"}
        assert (await c.post("/commit", json=moved)).status_code == 200
    exporter.clear()
    commit = {"key": "plan", "expected_version": 0, "delta": "1", "agent_id": "A"}
    r = await c.post("/commit", json=commit, headers={"traceparent": TRACEPARENT})
    assert (r.status_code, r.json()["error"]) == (409, "CrossShardStale")
    spans = exporter.get_finished_spans()
    server = _server(spans, "POST /commit")
    assert _trace(spans, server) == {
        "POST /commit": [
            ("sbus.auth", []),
            ("sbus.limits", []),
            ("sbus.capabilities", []),
            # the refusal, then its entry in the conflict ring (GET /watch?include=conflicts)
            ("sbus.atomic", [("store.apply", []), ("store.record_conflict", [])]),
            ("sbus.render", []),
        ]
    }
    attributes = dict(server.attributes or {})
    assert attributes["sbus.outcome"] == "CrossShardStale"
    assert attributes["sbus.stale_keys"] == ("a", "spec")
    assert attributes["http.response.status_code"] == 409
    assert (attributes["sbus.agent"], attributes["sbus.session"]) == ("A", "")
    assert attributes["sbus.read_set.size"] == 0  # none sent: the DeliveryLog's entries
    # A refusal is an answer, not a failure: the step that refused says which code.
    assert server.status.status_code == StatusCode.UNSET
    for name in ("sbus.atomic", "store.apply"):
        span = next(s for s in spans if s.name == name)
        assert (span.attributes or {})["error.type"] == "CrossShardStale"
        assert span.status.status_code == StatusCode.UNSET
    # a version mismatch names its key
    exporter.clear()
    stale = {"key": "a", "expected_version": 0, "delta": "x", "agent_id": "C"}
    assert (await c.post("/commit", json=stale)).status_code == 409
    server = _server(exporter.get_finished_spans(), "POST /commit")
    assert (server.attributes or {})["sbus.outcome"] == "VersionMismatch"
    assert (server.attributes or {})["sbus.conflict_key"] == "a"


async def test_reads_and_refusals_before_the_engine_are_traced_too(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    c = traced
    await c.post("/shard", json={"key": "k", "content": "0"}, headers={"X-Agent-Id": "A"})
    exporter.clear()
    assert (await c.get("/shard/k?agent_id=A&session_id=S")).status_code == 200
    spans = exporter.get_finished_spans()
    server = _server(spans, "GET /shard/{key:path}")
    assert _trace(spans, server) == {
        "GET /shard/{key:path}": [
            ("sbus.auth", []),
            ("store.read", []),
            ("sbus.render", []),
        ]
    }
    assert (server.attributes or {})["sbus.session"] == "S"
    exporter.clear()
    assert (await c.post("/commit", json={"key": "k"})).status_code == 422
    server = _server(exporter.get_finished_spans(), "POST /commit")
    assert (server.attributes or {})["sbus.outcome"] == "ValidationError"
    assert _trace(exporter.get_finished_spans(), server) == {"POST /commit": [("sbus.auth", [])]}
    exporter.clear()
    assert (await c.get("/nowhere")).status_code == 404
    [server] = exporter.get_finished_spans()[-1:]
    assert (server.name, (server.attributes or {})["sbus.outcome"]) == ("GET", "NotFound")
