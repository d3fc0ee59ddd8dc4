"""``OTEL_TRACES_EXPORTER=console sbus serve`` prints a commit's span tree (the console
exporter writes each span as a JSON object on stdout), configured only by the standard
``OTEL_*`` variables: the service name, the batch delay, the W3C ``traceparent`` of the
caller (docs/observability.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.concurrency.conftest import ServerStarter, sqlite_url

pytestmark = pytest.mark.concurrency

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def printed_spans(log: str) -> list[dict[str, Any]]:
    """The span objects in a server's output (one indented JSON object each, among the
    one-line JSON log records)."""
    decoder = json.JSONDecoder()
    spans = []
    for match in re.finditer(r"^\{\n", log, flags=re.MULTILINE):
        span, _ = decoder.raw_decode(log, match.start())
        spans.append(span)
    return spans


def test_console_tracing_prints_a_commits_span_tree(
    start_sbus: ServerStarter, tmp_path: Path
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "bus-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    server = start_sbus(sqlite_url(tmp_path), env)
    with httpx.Client(base_url=server.base_url, trust_env=False) as client:
        created = client.post("/shard", json={"key": "plan", "content": "0"})
        assert created.status_code == 201
        commit = {
            "key": "plan",
            "expected_version": 0,
            "delta": "1",
            "agent_id": "A",
            "session_id": "task",
        }
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        r = client.post("/commit/v2", json=commit, headers=headers)
        assert r.status_code == 200, r.text
    assert server.stop() == 0
    spans = [
        s for s in printed_spans(server.log_text()) if s["context"]["trace_id"] == f"0x{TRACE_ID}"
    ]
    by_id = {s["context"]["span_id"]: s for s in spans}
    [root] = [s for s in spans if s["name"] == "POST /commit/v2"]
    assert root["parent_id"] == f"0x{PARENT_ID}"
    assert root["kind"] == "SpanKind.SERVER"
    assert root["resource"]["attributes"]["service.name"] == "bus-under-test"
    attributes = root["attributes"]
    assert {k: attributes[k] for k in ("sbus.agent", "sbus.session", "sbus.outcome")} == {
        "sbus.agent": "A",
        "sbus.session": "task",
        "sbus.outcome": "committed",
    }
    assert attributes["sbus.keys_written"] == ["plan"]
    assert attributes["http.response.status_code"] == 200

    def children(span_id: str) -> list[str]:
        found = [s for s in spans if s["parent_id"] == span_id]
        return [s["name"] for s in sorted(found, key=lambda s: s["start_time"])]

    root_id = root["context"]["span_id"]
    assert children(root_id) == [
        "sbus.auth",
        "sbus.limits",
        "sbus.capabilities",
        "sbus.atomic",
        "sbus.render",
    ]
    [atomic] = [s for s in spans if s["name"] == "sbus.atomic"]
    assert children(atomic["context"]["span_id"]) == ["store.apply"]
    assert by_id[atomic["context"]["span_id"]]["parent_id"] == root_id
    [apply] = [s for s in spans if s["name"] == "store.apply"]
    assert apply["attributes"]["db.system.name"] == "sqlite"
