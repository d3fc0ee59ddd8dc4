"""docs/integrations/openai-agents.md's example runs as printed against a real bus
(uvicorn in a thread, the fixture of the other docs snippets) and prints what the page
says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from tests.api import test_docs_snippets

PAGE = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "openai-agents.md"
PRINTED_URL = 'BUS = "http://127.0.0.1:7000"'

bus_url = test_docs_snippets.bus_url  # the same fixture: uvicorn in a thread


def test_the_example_prints_what_the_page_says(bus_url: str) -> None:
    page = PAGE.read_text(encoding="utf-8")
    code = re.search(r"## Use\n.*?```python\n(.*?)```", page, re.S)
    printed = re.search(r"It prints:\n\n```text\n(.*?)```", page, re.S)
    assert code is not None and printed is not None
    assert PRINTED_URL in code.group(1)
    out = io.StringIO()
    namespace: dict[str, object] = {"__name__": "openai_agents_docs"}
    with contextlib.redirect_stdout(out):
        exec(
            compile(code.group(1).replace(PRINTED_URL, f'BUS = "{bus_url}"'), PAGE.name, "exec"),
            namespace,
        )
    assert out.getvalue() == printed.group(1)
