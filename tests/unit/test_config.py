from __future__ import annotations

from pathlib import Path

import pytest

from sbus.bootstrap import startup_problem
from sbus.config import Settings, is_loopback


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_loopback_detection(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_defaults_match_the_spec() -> None:
    s = Settings()
    assert (s.host, s.port, s.store) == ("127.0.0.1", 7000, "sqlite:///./sbus.db")
    assert s.auth_mode == "open"
    assert s.session_ttl == 3600
    assert s.max_delta == 262_144
    assert s.max_body == 1_048_576
    assert s.max_read_set == 1024
    assert s.max_dl_entries == 16384
    assert s.max_txn_keys == 128
    assert s.list_max == 10_000
    assert s.history_depth == 1000
    assert s.idempotency_ttl == 86_400
    assert (s.shutdown_delay, s.drain_timeout) == (0, 10)
    assert startup_problem(s) is None
    assert s.worker_count() == 1


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBUS_PORT", "7100")
    monkeypatch.setenv("SBUS_ADMIN_ENABLED", "1")
    monkeypatch.setenv("SBUS_SESSION_TTL", "0")
    monkeypatch.setenv("SBUS_MAX_DELTA", "0")
    s = Settings()
    assert (s.port, s.admin_enabled, s.session_ttl, s.max_delta) == (7100, True, 0, 0)


def test_open_mode_refuses_a_public_bind_without_allow_insecure() -> None:
    s = Settings(host="0.0.0.0", auth="open")
    problem = startup_problem(s)
    assert problem is not None and "SBUS_ALLOW_INSECURE" in problem
    assert startup_problem(Settings(host="0.0.0.0", auth="open", allow_insecure=True)) is None


def test_token_mode_is_the_default_off_loopback_and_refuses_to_start() -> None:
    s = Settings(host="0.0.0.0")
    assert s.auth_mode == "token"
    assert startup_problem(s) is not None


def test_settings_read_no_key_file(tmp_path: Path) -> None:
    """The settings only name key files; the start-up check reads them (the key ring is
    built above the settings, which import nothing of sbus.security)."""
    missing = tmp_path / "signing.pem"
    s = Settings(host="0.0.0.0", signing_key=str(missing))
    assert s.own_problem() is None
    problem = startup_problem(s)
    assert problem is not None
    assert problem.startswith(f"SBUS_SIGNING_KEY: cannot read {str(missing)!r}")


def test_every_setting_has_one_row_in_the_configuration_page() -> None:
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    rows = re.findall(r"^\| `(SBUS_[A-Z0-9_]+)` \|", page.read_text(), re.MULTILINE)
    assert len(rows) == len(set(rows)), "a variable has two rows"
    assert set(rows) == {f"SBUS_{name.upper()}" for name in Settings.model_fields}
