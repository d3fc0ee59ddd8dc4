"""The ``sbus`` command without a server: one-line errors for bad settings and store
URLs, ``--version``, the help texts, ``token inspect`` and the argument side of
``token revoke`` (the store side is in tests/api/test_cli_revoke.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from sbus import __version__
from sbus.cli import app
from sbus.config import Settings
from sbus.core.rights import Right, parse_allow
from sbus.security.inspection import revocation_target
from sbus.security.keys import KeySet, write_keypair
from sbus.security.tokens import Issuer

SECRET = "s" * 32


@pytest.fixture(autouse=True)
def clean_env() -> Iterator[None]:
    """No SBUS_* variable of the caller's shell leaks into these commands, and none that
    ``serve`` exports for its workers leaks out of them."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("SBUS_"):
            del os.environ[name]
    yield
    os.environ.clear()
    os.environ.update(saved)


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def one_line_error(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sbus: "), lines
    return lines[0]


def test_version_option_and_command() -> None:
    for args in (["--version"], ["version"]):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == __version__


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("SBUS_PORT", "abc", "SBUS_PORT: Input should be a valid integer"),
        ("SBUS_WORKERS", "0", "SBUS_WORKERS: Input should be greater than or equal to 1"),
        ("SBUS_AUTH", "bogus", "SBUS_AUTH: Input should be 'open' or 'token'"),
        ("SBUS_LOG_LEVEL", "loud", "SBUS_LOG_LEVEL: Input should be 'critical'"),
        ("SBUS_LOG_FORMAT", "xml", "SBUS_LOG_FORMAT: Input should be 'json' or 'text'"),
        ("SBUS_RATE_LIMIT", "fast", "fast"),
        (
            "SBUS_REDIS_WAIT_REPLICAS",
            "-1",
            "SBUS_REDIS_WAIT_REPLICAS: Input should be greater than or equal to 0",
        ),
        (
            "SBUS_REDIS_WAIT_TIMEOUT_MS",
            "0",
            "SBUS_REDIS_WAIT_TIMEOUT_MS: Input should be greater than or equal to 1",
        ),
        ("SBUS_DRAIN_TIMEOUT", "-1", "SBUS_DRAIN_TIMEOUT: Input should be greater than or equal"),
        ("SBUS_SHUTDOWN_DELAY", "soon", "SBUS_SHUTDOWN_DELAY: Input should be a valid number"),
    ],
)
def test_bad_settings_end_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(variable, value)
    for args in (["serve"], ["migrate"], ["token", "issue", "--agent", "A", "--allow", "read:x"]):
        if variable == "SBUS_RATE_LIMIT" and args != ["serve"]:
            continue  # only serving checks the rate limit syntax
        line = one_line_error(run(*args))
        assert needle in line, line


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("foo://x", "unsupported SBUS_STORE 'foo://x'"),
        ("redis://h:abc/0", "SBUS_STORE redis://h:abc/0 cannot be used"),
        (
            "postgresql://u:pw@h:abc/db",
            "SBUS_STORE postgresql://u:***@h:abc/db: host 'h:abc': the port must be a number",
        ),
        (
            "postgresql://u:pw@h1,h2/db?target_session_attrs=standby",
            "SBUS_STORE postgresql://u:***@h1,h2/db?target_session_attrs=standby: "
            "target_session_attrs=standby cannot be used: the bus writes",
        ),
        ("sqlite:////proc/no/such.db", "cannot open SQLite store"),
        (
            "redis+cluster://u:pw@h:7000,h:7001/3",
            "SBUS_STORE redis+cluster://u:***@h:7000,h:7001/3: Redis Cluster has only "
            "database 0, not /3",
        ),
    ],
)
def test_unusable_store_urls_end_in_one_line(url: str, needle: str) -> None:
    line = one_line_error(run("serve", "--store", url))
    assert needle in line, line
    assert ":pw@" not in line


def test_migrate_of_an_unreachable_store_is_one_line() -> None:
    line = one_line_error(run("migrate", "--store", "redis://127.0.0.1:1/0"), code=1)
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in line


@pytest.mark.parametrize(
    "ttl", ["\u00b2h", "\u00b2\u00b3", "0\u00b9", "\u0663s", "1_0s", "+5m", "9" * 5000, "0s", "1w"]
)
def test_bad_token_ttl_is_one_line(monkeypatch: pytest.MonkeyPatch, ttl: str) -> None:
    """Unicode digits passed str.isdigit() and then made int() raise (a traceback), or
    were read as ASCII ones; any --ttl that is not ASCII digits plus a unit is refused."""
    monkeypatch.setenv("SBUS_SECRET", SECRET)
    result = run("token", "issue", "--agent", "A", "--allow", "read:x", "--ttl", ttl)
    line = one_line_error(result)
    assert "expected a positive duration like 30s, 15m, 1h, 1d" in line, line
    assert result.stdout == ""


def test_serve_help_points_to_the_configuration_page() -> None:
    result = run("serve", "--help")
    assert result.exit_code == 0
    assert "docs/configuration.md" in result.stdout
    for option in ("--log-level", "--access-log", "--store", "--workers"):
        assert option in result.stdout


def test_token_issue_help_lists_rights_and_pattern_syntax() -> None:
    result = run("token", "issue", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Rights: read, write, create, delete, mandate, admin." in text
    assert "* matches any run of characters except /" in text
    assert "** matches any run including /" in text
    assert "plan/* matches plan/a but not plan/a/b" in text
    assert [r.value for r in Right] == ["read", "write", "create", "delete", "mandate", "admin"]


def issue(settings: Settings, *, ttl: int = 600, now: float | None = None) -> str:
    base = Issuer.from_settings(settings)
    if now is not None:
        fixed = now
        base = Issuer(base.keys, namespace=base.namespace, max_ttl=base.max_ttl, now=lambda: fixed)
    token, _ = base.issue("A", [parse_allow("read:plan/*")], ttl)
    return token


def inspect(token: str) -> tuple[Result, dict[str, object]]:
    result = run("token", "inspect", token)
    return result, json.loads(result.stdout) if result.stdout.strip() else {}


def test_inspect_verifies_with_the_configured_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBUS_SECRET", SECRET)
    token = issue(Settings())
    result, report = inspect(token)
    assert result.exit_code == 0, result.output
    claims = report["claims"]
    assert isinstance(claims, dict)
    assert claims["sub"] == "A"
    assert claims["scopes"] == [{"pattern": "plan/*", "rights": ["read"]}]
    assert (report["verified"], report["expired"]) == (True, False)
    assert result.stderr.startswith("sbus: valid: signature verified")


def test_inspect_says_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBUS_SECRET", SECRET)
    token = issue(Settings(), ttl=60, now=time.time() - 3600)
    result, report = inspect(token)
    assert result.exit_code == 1
    assert (report["verified"], report["expired"]) == (True, True)
    assert result.stderr.startswith("sbus: EXPIRED: signature valid")


def test_inspect_without_keys_says_unverified() -> None:
    token = issue(Settings(secret=SECRET))
    result, report = inspect(token)
    assert result.exit_code == 1
    assert (report["verified"], report["expired"]) == (False, False)
    claims = report["claims"]
    assert isinstance(claims, dict) and claims["sub"] == "A"
    assert result.stderr.startswith("sbus: UNVERIFIED: no key is configured")


def test_inspect_with_another_key_says_invalid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = issue(Settings(secret=SECRET))
    write_keypair(tmp_path / "k.pem")
    monkeypatch.setenv("SBUS_SIGNING_KEY", str(tmp_path / "k.pem"))
    result, report = inspect(token)
    assert result.exit_code == 1
    assert report["verified"] is False
    assert result.stderr.startswith("sbus: INVALID: algorithm 'HS256' not accepted")


def test_inspect_of_garbage_is_one_line() -> None:
    line = one_line_error(run("token", "inspect", "not-a-token"))
    assert line.startswith("sbus: not a JWT")


def test_inspect_with_unreadable_key_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    token = issue(Settings(secret=SECRET))
    monkeypatch.setenv("SBUS_SIGNING_KEY", "/no/such/key.pem")
    line = one_line_error(run("token", "inspect", token))
    assert "SBUS_SIGNING_KEY" in line


def test_revocation_target_reads_jti_and_exp_from_a_token() -> None:
    keys = KeySet.from_secret(SECRET)
    token, claims = Issuer(keys, namespace="sbus", max_ttl=3600).issue(
        "A", [parse_allow("read:x")], 600
    )
    assert revocation_target(token) == (claims.jti, claims.expires_at)
    assert revocation_target("some-jti") == ("some-jti", None)
    for bad in ("", "x" * 257, "a\x00b", "a.b.c"):
        with pytest.raises(ValueError):
            revocation_target(bad)


def test_revoke_refuses_bad_input_in_one_line() -> None:
    line = one_line_error(run("token", "revoke", "a.b.c", "--store", "sqlite:///x.db"))
    assert "not a JWT" in line
    line = one_line_error(run("token", "revoke", "j1", "--store", "memory://"))
    assert "POST /admin/tokens/revoke" in line


def test_an_unknown_trace_exporter_stops_serve_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "carrier-pigeon")
    monkeypatch.setenv("SBUS_STORE", f"sqlite:///{tmp_path / 'x.db'}")
    line = one_line_error(run("serve"))
    assert line.startswith("sbus: OTEL_TRACES_EXPORTER: "), line
    assert "carrier-pigeon" in line


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("postgresql://u:pw@127.0.0.1:1,127.0.0.1:2/db?sslmode=bogus", "`sslmode` parameter"),
        (
            "postgresql+asyncpg://u:pw@/db?host=127.0.0.1,127.0.0.2&port=1,2,3",
            "could not match 3 port numbers to 2 hosts",
        ),
    ],
)
def test_a_url_asyncpg_cannot_use_stops_serve_and_migrate_in_one_line(
    url: str, needle: str
) -> None:
    """A PostgreSQL URL that asyncpg refuses before connecting is a configuration
    error: no amount of retrying fixes it. ``serve`` must not start and wait for ever,
    not ready, as for a store that does not answer yet; both commands exit 2."""
    sbus = str(Path(sys.executable).parent / "sbus")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}
    for command in ("migrate", "serve"):
        try:
            done = subprocess.run(
                [sbus, command, "--store", url, "--port", "0"][: 4 if command == "migrate" else 6],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"sbus {command} did not stop on {url}")
        assert done.returncode == 2, (command, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sbus: "), (command, done.stderr)
        assert needle in lines[0], lines
        assert ":pw@" not in lines[0]
