"""``sbus audit`` (run in process) against a real ``sbus serve`` process in token mode:
the same pages as GET /admin/audit, asked over HTTP (``--url``, the token from
``SBUS_TOKEN``) or read from the store the server writes to (``--store``), and one
``sbus:`` line with a non-zero status for every failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from sbus.cli import app as cli
from sbus.config import Settings
from sbus.core.rights import ALL_RIGHTS, Scope
from sbus.security.tokens import Issuer
from tests.concurrency.conftest import Server, sqlite_url, start_server

SECRET = "cli-audit-secret-of-32-bytes-ok!!"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: the failures change nothing it wrote."""
    env = {"SBUS_AUTH": "token", "SBUS_SECRET": SECRET}
    where = tmp_path_factory.mktemp("cli-audit")
    running = start_server(sqlite_url(where), env, log_dir=where / "logs")
    try:
        yield running
    finally:
        running.stop()


def issue(agent: str, scope: Scope) -> tuple[str, str]:
    token, claims = Issuer.from_settings(Settings(auth="token", secret=SECRET)).issue(
        agent, [scope], 600
    )
    return token, claims.jti


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    args: tuple[str, ...]


def sbus(*args: str, token: str | None = None) -> Run:
    """``sbus audit ARGS`` in this process (the server is the real process here)."""
    env = {"SBUS_SECRET": SECRET, "SBUS_TOKEN": token, "SBUS_STORE": None}
    result = CliRunner(env=env).invoke(cli, ["audit", *args])
    return Run(result.exit_code, result.stdout, result.stderr, args)


def page(result: Run) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def test_sbus_audit_pages_what_the_server_wrote(server: Server) -> None:
    admin, admin_jti = issue("root", Scope("**", ALL_RIGHTS))
    reader, _ = issue("R", Scope.of("k", "read"))
    headers = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=server.base_url, trust_env=False) as client:
        for flag in (False, True):
            answer = client.post("/admin/config", json={"ori_enabled": flag}, headers=headers)
            assert answer.status_code == 200, answer.text
        denied = client.get("/shard/other", headers={"Authorization": f"Bearer {reader}"})
        assert denied.status_code == 403

    # Read from the store, as the server wrote it (no server involved).
    store = server.store_url
    first = page(sbus("--store", store, "--limit", "2", "--json"))
    assert [(e["kind"], e["agent"], e["details"]) for e in first["entries"]] == [
        ("config", "root", {"ori_enabled": False, "via_token": admin_jti}),
        ("config", "root", {"ori_enabled": True, "via_token": admin_jti}),
    ]
    assert first["next_after"] == first["entries"][1]["id"]
    rest = page(sbus("--store", store, "--after", str(first["next_after"]), "--json"))
    assert [(e["kind"], e["details"]) for e in rest["entries"]] == [
        ("denied", {"key": "other", "right": "read", "count": 1})
    ]
    assert rest["next_after"] is None

    # Over HTTP: GET /admin/audit's own answer, with the token from SBUS_TOKEN.
    over_http = page(sbus("--url", server.base_url, "--json", token=admin))
    assert over_http["entries"] == first["entries"] + rest["entries"]

    # The text form: one tab-separated line per entry, a hint when more follow.
    text = sbus("--url", server.base_url, "--limit", "1", token=admin)
    assert text.returncode == 0, text.stderr
    fields = text.stdout.rstrip("\n").split("\t")
    assert fields[0] == str(first["entries"][0]["id"])
    assert fields[2:] == [
        "config",
        "root",
        json.dumps(first["entries"][0]["details"], separators=(",", ":")),
    ]
    assert text.stderr.strip() == f"sbus: more entries: --after {first['entries'][0]['id']}"


def test_sbus_audit_failures_are_one_line(server: Server, tmp_path: Path) -> None:
    no_admin, _ = issue("A", Scope.of("**", "read"))
    cases = [
        # the server refuses: no token, then a token without the admin right
        (sbus("--url", server.base_url), 1, f"sbus: {server.base_url} answered 401 Unauthorized"),
        (
            sbus("--url", server.base_url, token=no_admin),
            1,
            f"sbus: {server.base_url} answered 403 CapabilityDenied",
        ),
        (sbus("--url", "http://127.0.0.1:1"), 1, "sbus: cannot reach http://127.0.0.1:1"),
        (sbus("--url", "ftp://x"), 2, "sbus: --url 'ftp://x': expected http://HOST:PORT"),
        (sbus("--store", "memory://"), 2, "sbus: the memory store lives inside one sbus serve"),
        (sbus("--store", "redis://127.0.0.1:1/0"), 1, "sbus: "),
    ]
    for result, status, start in cases:
        assert result.returncode == status, (result.args, result.stderr)
        assert result.stderr.startswith(start), (result.args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    # options out of range: typer's usage error, status 2
    for bad in (["--limit", "0"], ["--limit", "1001"], ["--after", "-1"], ["--after", "x"]):
        result = sbus("--store", sqlite_url(tmp_path, "other.db"), *bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert "Traceback" not in result.stderr
