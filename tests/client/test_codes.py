"""The generated error classes stay in step with the server's table, keep the fixed
bases, and ``import sbus_client`` pulls in neither the server nor any extra."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import sbus_client
from sbus.api.problems import STATUS
from sbus_client import ConflictError, SBusError, _codes

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "clients" / "python" / "scripts" / "gen_errors.py"

# The bases every framework's retry policy relies on (docs/sdk.md, "Errors").
BASES: dict[type[BaseException], set[str]] = {
    ConflictError: {"VersionMismatch", "CrossShardStale", "SessionExpired"},
    LookupError: {
        "ShardNotFound",
        "ShardDeleted",
        "VersionNotFound",
        "MandateNotFound",
        "NotFound",
    },
    PermissionError: {
        "Unauthorized",
        "TokenRevoked",
        "AgentMismatch",
        "HostNotAllowed",
        "CrossSiteRequest",
        "AdminDisabled",
        "CapabilityDenied",
        "MandateRequired",
        "MandateHolderMismatch",
        "MandateScopeMismatch",
        "MandateContextMismatch",
    },
    RuntimeError: {
        "ShardAlreadyExists",
        "MandateConsumed",
        "MandateExpired",
        "SigningUnavailable",
        "RateLimited",
        "StoreUnavailable",
        "KeyConfigError",  # a 500: by status class
        "InternalError",  # a 500: by status class
    },
}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_errors", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_codes_match_the_server_table() -> None:
    """Fails when a server code, status or field list changed without regenerating:
    run clients/python/scripts/gen_errors.py."""
    assert generator().render() == (ROOT / "clients/python/sbus_client/_codes.py").read_text()


def test_every_server_code_has_its_class_and_status() -> None:
    server = {cls.code: status for cls, status in STATUS.items()}
    assert set(_codes.BY_CODE) == set(server)
    for code, status in server.items():
        cls = _codes.BY_CODE[code]
        assert (cls.__name__, cls.CODE, cls.STATUS) == (code, code, status)
        assert issubclass(cls, SBusError)
        assert getattr(sbus_client, code) is cls  # exported from the package


@pytest.mark.parametrize("code", sorted({cls.code for cls in STATUS}))
def test_bases_are_fixed(code: str) -> None:
    cls = _codes.BY_CODE[code]
    expected = [base for base, codes in BASES.items() if code in codes]
    if not expected:
        expected = [ValueError]  # every other server code is a 4xx request problem
    (base,) = expected
    assert issubclass(cls, base)
    others = {ConflictError, LookupError, PermissionError, ValueError, RuntimeError} - {base}
    assert not [o for o in others if issubclass(cls, o)], cls.__mro__


def test_import_pulls_in_no_server_and_no_extra() -> None:
    script = (
        "import sys, sbus_client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'sbus', 'starlette', 'fastapi', 'asgi_lifespan', 'sbus_client.testing', 'pydantic'} "
        "or m == 'sbus_client.testing')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
