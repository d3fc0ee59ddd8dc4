"""`pip install ./clients/python` into a fresh virtual environment works on its own: the
client imports without the server package, an optional part without its extra says which
extra to install, and with every integration extra the parts import and `sbus-mcp` runs.

This is the install a user does (from the package index pip is configured with), not the
editable development install the rest of the suite runs on."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"

CHECK_ALONE = """
import importlib.util, sys
import sbus_client
from sbus_client import Bus, AsyncBus, Session, ConflictError, VersionMismatch
assert importlib.util.find_spec("sbus") is None, "the server package came along"
assert issubclass(VersionMismatch, ConflictError)
try:
    import sbus_client.testing
except ModuleNotFoundError as err:
    print(err)
else:
    raise SystemExit("sbus_client.testing imported without its extra")
from sbus_client import _trace
assert _trace.propagate is None, "OpenTelemetry came along without the otel extra"
print("version", sbus_client.__version__)
"""

CHECK_EXTRAS = """
import importlib.util
from sbus_client.mcp import build_server
from sbus_client.langgraph import SBusStore
from sbus_client.openai_agents import SBusSession
from sbus_client import _trace
assert _trace.propagate is not None, "the otel extra did not bring opentelemetry-api"
assert importlib.util.find_spec("sbus") is None, "an extra pulled in the server package"
print("ok")
"""


def run(args: list[str]) -> str:
    # Nothing of the suite's own environment may leak in (PYTHONPATH would put the
    # checkout's packages on the fresh venv's path).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(where)
    return where / "bin"


@pytest.fixture(scope="module")
def client_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # pip builds a local directory in place (build/, *.egg-info): build a copy, so the
    # checkout stays as it was.
    copy = tmp_path_factory.mktemp("src") / "python"
    shutil.copytree(CLIENT, copy, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    return copy


def test_the_client_installs_and_imports_alone(fresh_venv: Path, client_copy: Path) -> None:
    run([str(fresh_venv / "python"), "-m", "pip", "install", "--quiet", str(client_copy)])
    out = run([str(fresh_venv / "python"), "-c", CHECK_ALONE])
    assert "pip install 'sbus-client[testing]'" in out
    assert out.endswith("version 0.1.0\n")


def test_the_integration_extras_install_and_import(fresh_venv: Path, client_copy: Path) -> None:
    wanted = f"{client_copy}[mcp,langgraph,openai-agents,otel]"
    run([str(fresh_venv / "python"), "-m", "pip", "install", "--quiet", wanted])
    assert run([str(fresh_venv / "python"), "-c", CHECK_EXTRAS]) == "ok\n"
    assert "--transport" in run([str(fresh_venv / "sbus-mcp"), "--help"])
