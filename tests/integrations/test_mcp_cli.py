"""``sbus-mcp``'s configuration: who it acts as, and where it may listen."""

from __future__ import annotations

import os
import socket

import pytest

from sbus_client.mcp import _cli


def test_agent_from_flag_then_environment_then_token_then_host_and_pid() -> None:
    env = {"SBUS_AGENT_ID": "from-env", "SBUS_TOKEN": "tok"}
    assert _cli.agent_of("from-flag", env) == "from-flag"
    assert _cli.agent_of(None, env) == "from-env"
    assert _cli.agent_of(None, {"SBUS_TOKEN": "tok"}) is None  # the bus uses its subject
    default = f"mcp-{socket.gethostname()}-{os.getpid()}"
    assert _cli.agent_of(None, {}) == default
    assert _cli.agent_of(None, {"SBUS_AGENT_ID": "", "SBUS_TOKEN": ""}) == default


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_a_non_loopback_host_is_refused_without_allow_remote(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli.main(["--transport", "streamable-http", "--host", host])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--host {host} is not a loopback address" in err
    assert "add --allow-remote" in err


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True),
     ("[::1]", True), ("0.0.0.0", False), ("10.0.0.1", False), ("localhost.evil", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert _cli.is_loopback(host) is loopback


def test_host_checking_stays_on_for_a_remote_bind() -> None:
    local = _cli.transport_security("127.0.0.1", [])
    assert local.enable_dns_rebinding_protection
    assert local.allowed_hosts == ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    remote = _cli.transport_security("10.0.0.7", ["mcp.example.org"])
    assert remote.enable_dns_rebinding_protection
    assert remote.allowed_hosts == [
        "127.0.0.1:*",
        "localhost:*",
        "[::1]:*",
        "mcp.example.org",
        "10.0.0.7:*",
    ]
    assert "http://10.0.0.7:*" in remote.allowed_origins
    assert "http://mcp.example.org" in remote.allowed_origins


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--agent-id", "agent-\u00fc"], {}), ([], {"SBUS_AGENT_ID": "x" * 257}),
     ([], {"SBUS_AGENT_ID": "two\nlines"})],
)  # fmt: skip
def test_an_agent_id_the_bus_cannot_carry_stops_the_server(
    argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.delenv("SBUS_TOKEN", raising=False)
    monkeypatch.delenv("SBUS_AGENT_ID", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        _cli.main(argv)  # stdio: it would serve, were the agent usable
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "the agent id (--agent-id / SBUS_AGENT_ID)" in err
    assert "printable ASCII" in err or "at most 256 characters" in err


@pytest.mark.parametrize("url", ["localhost:7000", "ftp://127.0.0.1:7000"])
def test_a_bus_url_without_http_is_a_usage_error(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli.main(["--url", url, "--agent-id", "a"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--url / SBUS_URL: the bus URL must start with http:// or https://: {url!r}" in err
