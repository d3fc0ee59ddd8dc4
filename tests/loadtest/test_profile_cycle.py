"""loadtest/profile_cycle.py's in-process part runs and accounts for every layer of the
request path. No figure or timing is checked: the shares move with the machine's load
(docs/performance.md holds a run's figures)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.loadtest.test_peers import LOADTEST

sys.path.insert(0, str(LOADTEST))

import profile_cycle

LAYERS = (
    "middleware+routing (starlette/fastapi)",
    "DI+params (fastapi dependencies)",
    "validation (pydantic)",
    "S-Bus api/",
    "S-Bus core (engine)",
    "S-Bus other (security, telemetry, bootstrap)",
    "store",
    "JSON encoding",
    "asyncio/anyio",
)


def test_the_in_process_profile_names_every_layer() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBUS_")}
    cmd = [sys.executable, str(LOADTEST / "profile_cycle.py"), "--parts", "inproc"]
    cmd += ["--stores", "memory", "--cycles", "200", "--warmup", "20", "--top", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "## in process, memory store: 200 cycles" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    for layer in LAYERS:
        assert any(row.startswith(f"| {layer} | ") for row in rows), (layer, out)
    # The layers every cycle runs through were charged some of its time (a share, not a
    # speed: a file no longer recognised as its layer would leave its row at 0.0%).
    shares = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows}
    for layer in (*LAYERS[:5], "store"):
        assert shares[layer] != "0.0%", (layer, out)
    assert "ASGI test client (httpx) share of the profiled time" in out
    assert "top by cumulative time" in out and "top by own time" in out
    # The engine and S-Bus's routers both ran under the profiler: their functions appear.
    assert "sbus/core/" in out and "sbus/api/" in out, out


def test_functions_are_charged_to_their_layer() -> None:
    assert set(LAYERS) <= set(profile_cycle.SERVER_LAYERS)
    assert profile_cycle.classify("/x/site-packages/sbus/core/engine.py", "execute") == (
        "S-Bus core (engine)"
    )
    assert profile_cycle.classify("/x/site-packages/fastapi/dependencies/utils.py", "f") == (
        "DI+params (fastapi dependencies)"
    )
