"""What ``sbus serve`` itself does as a process: its log (a "ready" line once the store
answers, one line per request, ``--log-level``, ``--access-log``, ``SBUS_LOG_FORMAT``)
and the scratch directories a multi-worker server shares, which must be gone once it
stops, by SIGTERM or by SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.concurrency.conftest import ServerStarter, sqlite_url

pytestmark = pytest.mark.concurrency

SCRATCH = ("sbus-prom-*", "sbus-ready-*")


def scratch(tmp: Path) -> list[str]:
    return sorted(p.name for pattern in SCRATCH for p in tmp.glob(pattern))


def test_ready_line_and_access_log_as_text(start_sbus: ServerStarter, tmp_path: Path) -> None:
    env = {"SBUS_ACCESS_LOG": "1", "SBUS_LOG_FORMAT": "text"}
    server = start_sbus(sqlite_url(tmp_path), env)
    with httpx.Client(base_url=server.base_url, trust_env=False) as client:
        r = client.get("/livez?probe=1", headers={"X-Request-Id": "probe-1"})
        assert r.status_code == 200
    assert server.stop() == 0
    log = server.log_text()
    assert "INFO:     ready: the sqlite store answers (worker " in log, log
    assert '"GET /livez?probe=1 HTTP/1.1" 200' in log, log
    assert "INFO:     GET /livez 200 ok " in log, log
    assert " request_id=probe-1" in log, log


def test_json_log_has_one_line_per_request(start_sbus: ServerStarter, tmp_path: Path) -> None:
    server = start_sbus(sqlite_url(tmp_path))  # json is the default
    with httpx.Client(base_url=server.base_url, trust_env=False) as client:
        made = client.post(
            "/shard",
            json={"key": "k", "content": "0"},
            headers={"X-Agent-Id": "A", "X-Request-Id": "json-1"},
        )
        assert made.status_code == 201
    assert server.stop() == 0
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    ready = [line for line in lines if line["msg"].startswith("ready: the sqlite store")]
    assert len(ready) == 1 and ready[0]["level"] == "info", lines
    # (the harness's health probes have lines of their own)
    requests = [line for line in lines if line.get("request_id") == "json-1"]
    assert len(requests) == 1, lines
    line = requests[0]
    assert isinstance(line.pop("duration_ms"), float)
    assert isinstance(line.pop("ts"), str)
    assert line == {
        "level": "info",
        "logger": "sbus.request",
        "msg": "request",
        "request_id": "json-1",
        "method": "POST",
        "route": "/shard",
        "status": 201,
        "outcome": "committed",
        "agent": "A",
        "session": "",
    }


def test_log_level_warning_is_quiet(start_sbus: ServerStarter, tmp_path: Path) -> None:
    server = start_sbus(sqlite_url(tmp_path), {"SBUS_LOG_LEVEL": "warning"})
    with httpx.Client(base_url=server.base_url, trust_env=False) as client:
        assert client.get("/livez").status_code == 200
    server.stop()
    log = server.log_text()
    assert '"level":"info"' not in log, log
    assert "sbus.request" not in log, log
    assert "GET /livez" not in log, log  # no access log unless asked for
    assert log.startswith("sbus "), log  # the banner still says what is served


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_multi_worker_scratch_dirs_are_removed_on_exit(
    start_sbus: ServerStarter, tmp_path: Path, how: signal.Signals
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = start_sbus(sqlite_url(tmp_path), {"TMPDIR": str(tmp)}, workers=2)
    made = scratch(tmp)
    assert [name.rsplit("-", 1)[0] for name in made] == ["sbus-prom", "sbus-ready"], made
    server.process.send_signal(how)
    try:
        code = server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sbus serve ignored {how.name}; log:\n{server.log_text()}")
    assert code == 0, server.log_text()
    assert scratch(tmp) == []
