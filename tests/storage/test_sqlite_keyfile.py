"""The SQLite deployment's open-mode signing secret in ``<database>.key``: made once,
whole, private, and shared by every process that opens the database."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from sbus.core.errors import StoreMisconfigured
from sbus.storage.sql.keyfile import key_path, shared_secret

RACERS = 8


def test_racing_processes_make_it_once_and_all_read_the_winner(tmp_path: Path) -> None:
    path = key_path(str(tmp_path / "sbus.db"))
    assert path == tmp_path / "sbus.db.key"
    start = threading.Barrier(RACERS)
    got: list[bytes] = [b""] * RACERS

    def race(i: int) -> None:
        start.wait()
        got[i] = shared_secret(path, bytes([i]) * 32)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1
    assert got[0] in {bytes([i]) * 32 for i in range(RACERS)}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["sbus.db.key"]  # no scratch file left behind
    assert shared_secret(path, b"z" * 32) == got[0]


def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k.key"
        shared_secret(path, b"x" * 32)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("content", [b"", b"not hex\n", b"\xff\xfe"])
def test_a_file_without_a_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "sbus.db.key"
    path.write_bytes(content)
    with pytest.raises(StoreMisconfigured) as info:
        shared_secret(path, b"x" * 32)
    assert str(path) in info.value.detail
    assert path.read_bytes() == content  # left for the operator
