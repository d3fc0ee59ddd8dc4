"""The README's Python quickstart runs as printed against a real bus (uvicorn in a thread,
the memory store), on the state the README's curl quickstart leaves behind."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from sbus_client import Bus
from tests.api import test_docs_snippets

README = Path(__file__).resolve().parents[2] / "README.md"
PRINTED_URL = 'Bus("http://127.0.0.1:7000"'

bus_url = test_docs_snippets.bus_url  # the same fixture: uvicorn in a thread


def quickstart() -> str:
    page = README.read_text(encoding="utf-8")
    found = re.search(r"## Quickstart \(Python SDK\)\n.*?```python\n(.*?)```", page, re.S)
    assert found is not None, "README.md lost its Python quickstart"
    code = found.group(1)
    assert PRINTED_URL in code
    return code


def test_the_readme_python_quickstart_runs_as_printed(bus_url: str) -> None:
    # What the curl quickstart leaves: plan and code exist (versions 1 and 2).
    with httpx.Client(base_url=bus_url) as http:
        for key, content in (("plan", "step 1"), ("code", "v1")):
            created = http.post("/shard", json={"key": key, "content": content})
            assert created.status_code == 201, created.text
        moved = http.post(
            "/commit/v2",
            json={"key": "plan", "expected_version": 0, "delta": "new plan", "agent_id": "B"},
        )
        assert moved.status_code == 200, moved.text
    code = quickstart().replace(PRINTED_URL, f'Bus("{bus_url}"')
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_quickstart"})
    with Bus(bus_url, agent_id="check") as bus, bus.session() as s:
        plan, copied = s.read("plan"), s.read("code")
    # The session appended "!" to plan; update appended the review line to code; publish
    # then copied plan over code in one atomic commit.
    assert plan.content == "new plan!"
    assert (plan.version, copied.version) == (2, 2)
    assert copied.content == "new plan!"
