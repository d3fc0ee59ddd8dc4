"""The three ways the demo's agents share state, behind one small interface.

- :class:`FileMode`: a JSON file, load-modify-save (saved atomically by rename, as
  careful code does; the update is lost all the same).
- :class:`CasMode`: the bus used as a per-key compare-and-set store. Reads are
  unrecorded (``record=False``), so a session's read set is empty and a commit checks
  only the version of the key it writes: what ORI off amounts to. A hand-written loop
  re-reads and retries on VersionMismatch.
- :class:`BusMode`: the bus as the SDK means it: recorded reads, ``Session.update``
  for a pure merge, ``bus.transactional`` for read-decide-write.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from examples.contention.lockstep import ReadsDone
from sbus_client import Bus, ConflictError, Session, Shard, VersionMismatch
from sbus_client.testing import LocalBus

BOARD = "demo/board"
DOCTORS = ("alice", "bob")
ON, OFF = "on", "off"


def rota_key(doctor: str) -> str:
    return f"demo/oncall/{doctor}"


def appended(board: str, item: str) -> str:
    """The board (a JSON list) with ``item`` added at the end."""
    items: list[str] = json.loads(board)
    return json.dumps([*items, item])


@dataclass(frozen=True)
class Attempt:
    """What one agent's operation came to: whether its write was accepted, and how many
    times it re-read and tried again first."""

    committed: bool
    retries: int = 0


class Mode(Protocol):
    title: str

    def conflicts(self) -> Counter[str]:
        """409 answers so far, by problem code."""
        ...

    def start_board(self) -> None: ...

    def append(self, agent: int, item: str, reads_done: ReadsDone) -> Attempt: ...

    def board(self) -> list[str]: ...

    def start_rota(self) -> None:
        """Every doctor on call."""
        ...

    def go_off_call(self, doctor: str, other: str, reads_done: ReadsDone) -> Attempt:
        """``doctor`` goes off call if ``other`` is on."""
        ...

    def rota(self) -> dict[str, str]: ...


class FileMode:
    title = "(a) a shared JSON file, load-modify-save"

    def __init__(self, directory: Path) -> None:
        self._board = directory / "board.json"
        self._rota = directory / "rota.json"

    @staticmethod
    def _load(path: Path) -> object:
        return json.loads(path.read_text())

    @staticmethod
    def _save(path: Path, value: object) -> None:
        scratch = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        scratch.write_text(json.dumps(value))
        os.replace(scratch, path)  # atomic: a reader sees one whole version or the other

    def conflicts(self) -> Counter[str]:
        return Counter()  # a file has no notion of a conflict

    def start_board(self) -> None:
        self._save(self._board, [])

    def append(self, agent: int, item: str, reads_done: ReadsDone) -> Attempt:
        board = self.board()
        reads_done()
        self._save(self._board, [*board, item])
        return Attempt(committed=True)

    def board(self) -> list[str]:
        items = self._load(self._board)
        assert isinstance(items, list)
        return [str(item) for item in items]

    def start_rota(self) -> None:
        self._save(self._rota, dict.fromkeys(DOCTORS, ON))

    def go_off_call(self, doctor: str, other: str, reads_done: ReadsDone) -> Attempt:
        rota = self.rota()
        reads_done()
        if rota[other] != ON:
            return Attempt(committed=False)
        self._save(self._rota, {**rota, doctor: OFF})
        return Attempt(committed=True)

    def rota(self) -> dict[str, str]:
        rota = self._load(self._rota)
        assert isinstance(rota, dict)
        return {str(k): str(v) for k, v in rota.items()}


class _OnTheBus:
    """What both bus modes share: one Bus per agent over the in-process bus, a count of
    409 answers taken from the wire, and the set-up writes."""

    def __init__(self, local: LocalBus) -> None:
        self._local = local
        self._buses: dict[str, Bus] = {}
        self._lock = threading.Lock()
        self._conflicts: Counter[str] = Counter()
        self._rota_exists = False
        http = local.http
        http.event_hooks = {**http.event_hooks, "response": [self._count]}

    def _count(self, response: httpx.Response) -> None:
        if response.status_code == 409:
            code = str(json.loads(response.read())["error"])
            with self._lock:
                self._conflicts[code] += 1

    def conflicts(self) -> Counter[str]:
        with self._lock:
            return self._conflicts.copy()

    def bus(self, agent: str) -> Bus:
        with self._lock:
            if agent not in self._buses:
                self._buses[agent] = Bus(
                    self._local.url, agent_id=agent, http_client=self._local.http
                )
            return self._buses[agent]

    def start_board(self) -> None:
        with self.bus("setup").session() as s:
            s.create(BOARD, "[]")

    def board(self) -> list[str]:
        with self.bus("setup").session() as s:
            items: list[str] = json.loads(s.read(BOARD, record=False).content)
            return items

    def start_rota(self) -> None:
        keys = [rota_key(d) for d in DOCTORS]
        with self.bus("setup").session() as s:
            if self._rota_exists:
                s.commit_many([(key, ON, s.read(key, record=False)) for key in keys])
            else:
                for key in keys:
                    s.create(key, ON)
                self._rota_exists = True

    def rota(self) -> dict[str, str]:
        with self.bus("setup").session() as s:
            return {d: s.read(rota_key(d), record=False).content for d in DOCTORS}


class CasMode(_OnTheBus):
    title = "(b) per-key compare-and-set only (the bus with unrecorded reads: ORI off)"

    def append(self, agent: int, item: str, reads_done: ReadsDone) -> Attempt:
        with self.bus(f"agent-{agent}").session() as s:
            retries = 0
            while True:
                board = s.read(BOARD, record=False)
                reads_done()
                try:
                    s.commit(BOARD, appended(board.content, item), expected=board)
                    return Attempt(committed=True, retries=retries)
                except VersionMismatch:
                    retries += 1

    def go_off_call(self, doctor: str, other: str, reads_done: ReadsDone) -> Attempt:
        with self.bus(doctor).session() as s:
            retries = 0
            while True:
                mine = s.read(rota_key(doctor), record=False)
                theirs = s.read(rota_key(other), record=False)
                reads_done()
                if theirs.content != ON:
                    return Attempt(committed=False, retries=retries)
                try:
                    s.commit(rota_key(doctor), OFF, expected=mine)
                    return Attempt(committed=True, retries=retries)
                except VersionMismatch:
                    retries += 1


class BusMode(_OnTheBus):
    title = "(c) the bus (recorded reads, Session.update, bus.transactional)"

    def append(self, agent: int, item: str, reads_done: ReadsDone) -> Attempt:
        merges = 0

        def merge(board: Shard) -> str:
            nonlocal merges
            merges += 1
            reads_done()  # the demo's lockstep, not part of the merge
            return appended(board.content, item)

        with self.bus(f"agent-{agent}").session() as s:
            s.update(BOARD, merge)
        return Attempt(committed=True, retries=merges - 1)

    def go_off_call(self, doctor: str, other: str, reads_done: ReadsDone) -> Attempt:
        retries = 0

        def count(attempt: int, error: ConflictError, wait: float) -> None:
            nonlocal retries
            retries += 1

        @self.bus(doctor).transactional(on_retry=count)
        def go_off(s: Session) -> bool:
            mine = s.read(rota_key(doctor))
            theirs = s.read(rota_key(other))
            reads_done()
            if theirs.content != ON:
                return False
            s.commit(rota_key(doctor), OFF, expected=mine)
            return True

        return Attempt(committed=go_off(), retries=retries)
