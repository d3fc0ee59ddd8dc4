"""Commit ids stay unique across a fork: the child draws a prefix of its own."""

from __future__ import annotations

import os

from sbus.core.engine import new_commit_id


def _child_id() -> str:
    """A commit id made by a child forked from this process right now."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write one id and leave without running any cleanup
        try:
            os.close(read_end)
            os.write(write_end, new_commit_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return child


def test_a_forked_child_makes_ids_the_parent_never_makes() -> None:
    before = new_commit_id()
    child = _child_id()
    after = new_commit_id()
    assert len(child) == len(before) == 32
    # Without a fresh prefix the child's first id would equal the parent's next one.
    assert child != after
    assert child[:16] != before[:16]
    assert after[:16] == before[:16]
    assert int(after[16:], 16) == int(before[16:], 16) + 1
