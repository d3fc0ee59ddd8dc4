"""examples/mcp runs as printed: the loser's tool error, its re-read and merge, and six
concurrent appends that all land."""

from __future__ import annotations

import pytest

from examples.mcp.__main__ import main

EXPECTED = """\
planner: create_shard -> {'key': 'plan', 'version': 0, 'content': '1. draft'}
planner: read_shard -> {'key': 'plan', 'version': 0, 'content': '1. draft'}
reviewer: read_shard -> {'key': 'plan', 'version': 0, 'content': '1. draft'}
reviewer: commit_shard -> {'key': 'plan', 'version': 1}
planner: commit_shard -> ERROR
    Error executing tool commit_shard: VersionMismatch: 'plan' is at version 1, not 0: \
another agent committed first, and nothing was written. Stale keys: 'plan' (current \
version 1). Next: re-read, merge, retry: read_shard('plan') again, apply your change to \
its current content (keep what the other agent wrote), and commit with the version you \
just read.
planner: read_shard -> {'key': 'plan', 'version': 1, 'content': '1. draft\\n2. review'}
planner: commit_shard -> {'key': 'plan', 'version': 2}
planner: begin_task -> a new task (its old reads no longer count)
reviewer: begin_task -> a new task (its old reads no longer count)
reviewer: read_shard -> {'key': 'plan', 'version': 2, 'content': '1. draft\\n2. review\\n3. ship'}

plan (version 2):
1. draft
2. review
3. ship
log (version 5):
planner 0
planner 1
planner 2
reviewer 0
reviewer 1
reviewer 2
"""


async def test_the_example_prints_its_transcript(capsys: pytest.CaptureFixture[str]) -> None:
    await main()
    assert capsys.readouterr().out == EXPECTED
