"""Stream cursors (sbus.core.watch): what the engine accepts before asking a store."""

from __future__ import annotations

import pytest

from sbus.core import errors as e
from sbus.core.watch import split_cursor, valid_cursor_text
from sbus.storage.sql import pg_changes


def test_a_cursor_of_a_busy_database_is_accepted() -> None:
    """A PostgreSQL cursor lists, twice, the transactions in progress when it was taken:
    with a hundred open (max_connections' default) it is still a cursor."""
    xids = ",".join(str(4_000_000_000 + i) for i in range(1, 100))
    snapshot = f"4000000000:4000000100:{xids}"
    cursor = pg_changes.cursor_of(snapshot, snapshot, 7)
    assert len(cursor) > 2000
    assert valid_cursor_text(cursor)
    assert split_cursor(cursor) == (cursor, None)
    assert pg_changes.parse(cursor) == (snapshot, snapshot, 7)


@pytest.mark.parametrize("bad", ["~", "a~", "a~b~c", "~b"])
def test_malformed_stream_cursors(bad: str) -> None:
    with pytest.raises(e.InvalidCursor):
        split_cursor(bad)


def test_cursor_text() -> None:
    assert not valid_cursor_text("")
    assert not valid_cursor_text("a b")
    assert not valid_cursor_text("é")
    assert split_cursor("s5~s2") == ("s5", "s2")
