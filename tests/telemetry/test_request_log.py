"""Request ids and the request log (``sbus.telemetry.requests``, docs/observability.md):
every response carries ``X-Request-Id`` (the caller's when acceptable, else a new one),
problem responses included, on the lean hot path and on FastAPI's handlers alike; each
request writes one ``sbus.request`` line with its id, agent, session, route template,
status, outcome and duration, built only when INFO is enabled."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import httpx
import pytest

from sbus.api.runtime import runtime_of
from sbus.telemetry import logs
from sbus.telemetry.exchange import MAX_REQUEST_ID, request_id
from tests.telemetry.helpers import PATHS, build, serve

GENERATED = re.compile(r"[0-9a-f]{32}")


def _commit(version: int, **extra: Any) -> dict[str, Any]:
    return {"key": "k", "expected_version": version, "delta": "x", "agent_id": "A"} | extra


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        dict(getattr(r, logs.FIELDS))
        for r in caplog.records
        if r.name == logs.REQUEST_LOGGER and r.levelno == logging.INFO
    ]


@pytest.mark.parametrize("path", PATHS)
async def test_request_id_is_echoed_on_success_and_on_every_kind_of_refusal(path: str) -> None:
    async with serve(build(path)) as c:
        assert (await c.post("/shard", json={"key": "k", "content": "0"})).status_code == 201
        answers = {
            "commit": await c.post("/commit", json=_commit(0), headers={"X-Request-Id": "r-1"}),
            "conflict": await c.post("/commit", json=_commit(0), headers={"X-Request-Id": "r 2 ~"}),
            # refused by FastAPI's validation / the lean path's copy of it
            "invalid": await c.post("/commit", json={"key": "k"}, headers={"X-Request-Id": "r-3"}),
            # refused by the gate, before any route
            "media": await c.post(
                "/commit",
                content=b"{}",
                headers={"Content-Type": "text/plain", "X-Request-Id": "r-4"},
            ),
            "unknown": await c.get("/nowhere", headers={"X-Request-Id": "r-5"}),
            "read": await c.get("/shard/k?agent_id=A", headers={"X-Request-Id": "r-6"}),
        }
    got = {name: (r.status_code, r.headers.get("x-request-id")) for name, r in answers.items()}
    assert got == {
        "commit": (200, "r-1"),
        "conflict": (409, "r 2 ~"),
        "invalid": (422, "r-3"),
        "media": (415, "r-4"),
        "unknown": (404, "r-5"),
        "read": (200, "r-6"),
    }


@pytest.mark.parametrize("path", PATHS)
async def test_unacceptable_or_missing_ids_are_replaced_by_new_ones(path: str) -> None:
    longest = "x" * MAX_REQUEST_ID
    async with serve(build(path)) as c:
        kept = await c.get("/livez", headers={"X-Request-Id": longest})
        sent: dict[str, bytes | None] = {
            "too long": b"x" * (MAX_REQUEST_ID + 1),
            "control character": b"a\tb",
            "not ASCII": "caf\u00e9".encode(),
            "absent": None,
        }
        replaced = {}
        for name, value in sent.items():
            headers = {} if value is None else {"X-Request-Id": value}
            r = await c.get("/livez", headers=headers)  # type: ignore[arg-type]
            replaced[name] = r.headers["x-request-id"]
    assert kept.headers["x-request-id"] == longest
    assert all(GENERATED.fullmatch(v) for v in replaced.values()), replaced
    assert len(set(replaced.values())) == len(replaced)  # a new one each time


def test_request_id_rule() -> None:
    assert request_id([(b"x-request-id", b"abc")]) == "abc"
    # the first of several counts; a refused one is not passed over for a later one
    assert request_id([(b"x-request-id", b"one"), (b"x-request-id", b"two")]) == "one"
    assert GENERATED.fullmatch(request_id([(b"x-request-id", b""), (b"x-request-id", b"b")]))
    assert GENERATED.fullmatch(request_id([(b"x-request-id", b"\x7f")]))


@pytest.mark.parametrize("path", PATHS)
async def test_one_line_per_request_names_agent_route_status_and_outcome(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=logs.REQUEST_LOGGER)
    async with serve(build(path)) as c:
        await c.post("/shard", json={"key": "k", "content": "0"}, headers={"X-Agent-Id": "A"})
        caplog.clear()
        idem = {"Idempotency-Key": "once", "X-Request-Id": "q-1"}
        assert (await c.post("/commit/v2", json=_commit(0), headers=idem)).status_code == 200
        replay = await c.post("/commit/v2", json=_commit(0), headers=idem | {"X-Request-Id": "q-2"})
        assert replay.headers["idempotent-replayed"] == "true"
        stale = await c.post("/commit/v2", json=_commit(0, session_id="S"))
        assert stale.status_code == 409
        assert (await c.get("/shard/k?agent_id=B&session_id=T")).status_code == 200
        assert (await c.post("/commit/v2", json={"key": "k"})).status_code == 422
    lines = _lines(caplog)
    assert len(lines) == 5, lines
    for line in lines:
        assert isinstance(line.pop("duration_ms"), float)
        line.pop("request_id")
    assert lines == [
        {
            "method": "POST",
            "route": "/commit/v2",
            "status": 200,
            "outcome": "committed",
            "agent": "A",
            "session": "",
        },
        {
            "method": "POST",
            "route": "/commit/v2",
            "status": 200,
            "outcome": "replayed",
            "agent": "A",
            "session": "",
        },
        {
            "method": "POST",
            "route": "/commit/v2",
            "status": 409,
            "outcome": "VersionMismatch",
            "agent": "A",
            "session": "S",
        },
        {
            "method": "GET",
            "route": "/shard/{key:path}",
            "status": 200,
            "outcome": "ok",
            "agent": "B",
            "session": "T",
        },
        {
            "method": "POST",
            "route": "/commit/v2",
            "status": 422,
            "outcome": "ValidationError",
            "agent": None,
            "session": None,
        },
    ]


@pytest.mark.parametrize("path", PATHS)
async def test_request_ids_in_the_log_are_the_answered_ones(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=logs.REQUEST_LOGGER)
    async with serve(build(path)) as c:
        sent = await c.get("/livez", headers={"X-Request-Id": "mine"})
        made = await c.get("/livez")
    ids = [line["request_id"] for line in _lines(caplog)]
    assert ids == ["mine", made.headers["x-request-id"]]
    assert sent.headers["x-request-id"] == "mine"


@pytest.mark.parametrize("path", PATHS)
async def test_refusals_by_the_gate_are_logged_with_their_code(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=logs.REQUEST_LOGGER)
    async with serve(build(path)) as c:
        await c.post("/commit", content=b"{}", headers={"Content-Type": "text/plain"})
        await c.get("/shard/k", headers={"Host": "evil.example"})
        await c.get("/nowhere")
    got = [(line["route"], line["status"], line["outcome"]) for line in _lines(caplog)]
    assert got == [
        ("unmatched", 415, "UnsupportedMediaType"),
        ("unmatched", 403, "HostNotAllowed"),
        ("unmatched", 404, "NotFound"),
    ]


@pytest.mark.parametrize("path", PATHS)
async def test_token_refusals_are_logged_with_their_code(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=logs.REQUEST_LOGGER)
    app = build(path, auth="token", secret="s" * 32, host="127.0.0.1")
    async with serve(app) as c:
        r = await c.get("/shard/k", headers={"X-Request-Id": "t-1"})
    assert (r.status_code, r.headers["x-request-id"]) == (401, "t-1")
    assert [(line["status"], line["outcome"]) for line in _lines(caplog)] == [(401, "Unauthorized")]


@pytest.mark.parametrize("path", PATHS)
async def test_nothing_is_built_below_info(path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=logs.REQUEST_LOGGER)
    async with serve(build(path)) as c:
        assert (await c.get("/livez")).status_code == 200
    assert [r for r in caplog.records if r.name == logs.REQUEST_LOGGER] == []


def _record(**fields: Any) -> logging.LogRecord:
    record = logging.LogRecord(logs.REQUEST_LOGGER, logging.INFO, __file__, 1, "request", (), None)
    setattr(record, logs.FIELDS, fields)
    return record


FIELDS = {
    "request_id": "r-1",
    "method": "POST",
    "route": "/commit",
    "status": 409,
    "outcome": "CrossShardStale",
    "agent": "A",
    "session": "",
    "duration_ms": 1.25,
}


def test_json_lines() -> None:
    text = logs.JsonFormatter().format(_record(**FIELDS))
    assert "\n" not in text
    line = json.loads(text)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("ts"))
    assert line == {"level": "info", "logger": "sbus.request", "msg": "request", **FIELDS}
    plain = logging.LogRecord("sbus", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    assert json.loads(logs.JsonFormatter().format(plain))["msg"] == "a b"


def test_text_lines() -> None:
    text = logs.TextFormatter().format(_record(**FIELDS))
    assert text == (
        "INFO:     POST /commit 409 CrossShardStale 1.250 ms agent=A session= request_id=r-1"
    )


def test_log_config_formats() -> None:
    as_json = logs.log_config("info", "json", access_log=False)
    assert {f["()"] for f in as_json["formatters"].values()} == {logs.JsonFormatter}
    as_text = logs.log_config("warning", "text", access_log=True)
    assert as_text["formatters"]["sbus_request"] == {"()": logs.TextFormatter}
    for config in (as_json, as_text):
        handler = config["handlers"]["sbus_request"]
        assert handler["class"] == "sbus.telemetry.logs.RequestLineHandler"
        assert handler["stream"] == "ext://sys.stderr"
        assert config["loggers"][logs.REQUEST_LOGGER]["handlers"] == ["sbus_request"]
        assert config["loggers"][logs.REQUEST_LOGGER]["propagate"] is False
    assert as_text["loggers"][logs.REQUEST_LOGGER]["level"] == "WARNING"
    assert as_text["loggers"]["uvicorn.access"]["level"] == "INFO"
    # uvicorn's own layout stays for its lines in text mode
    assert "uvicorn" in str(as_text["formatters"]["default"]["()"])


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_direct_handler_writes_what_the_formatter_would(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sbus serve``'s request handler skips the log record, not the format: its line
    equals the formatter's line for the same record (the time aside)."""
    stream = io.StringIO()
    monkeypatch.setattr("sbus.telemetry.logs.time.time", lambda: 1_700_000_000.25)
    handler = logs.RequestLineHandler(stream)
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.TextFormatter())
    logger = logging.Logger("sbus.request.test")  # not registered: no global state
    logger.addHandler(handler)
    logger.propagate = False
    assert logs.direct_handler(logger) is handler
    handler.write_fields(dict(FIELDS))
    record = _record(**FIELDS)
    record.created, record.msecs = 1_700_000_000.25, 250.0
    assert handler.formatter is not None
    assert stream.getvalue() == handler.formatter.format(record) + "\n"
    # Anything more than the one handler, and records go the usual way.
    logger.propagate = True
    assert logs.direct_handler(logger) is None
    logger.propagate = False
    logger.addFilter(lambda record: True)
    assert logs.direct_handler(logger) is None


@pytest.mark.parametrize("path", PATHS)
async def test_an_unexpected_exception_is_a_problem_with_the_request_id(
    path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug answers 500 InternalError as problem+json, still with the request's id (the
    answer is sent from outside every middleware), and its log line says so."""
    caplog.set_level(logging.INFO, logger=logs.REQUEST_LOGGER)
    app = build(path)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    async with serve(app):
        monkeypatch.setattr(runtime_of(app).bus.store, "read", broken)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as raw:
            r = await raw.get("/shard/k?agent_id=A", headers={"X-Request-Id": "bug-1"})
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-request-id"] == "bug-1"
    assert r.json()["error"] == "InternalError"
    [line] = [line for line in _lines(caplog) if line["request_id"] == "bug-1"]
    assert (line["status"], line["outcome"]) == (500, "InternalError")
