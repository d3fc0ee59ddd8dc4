"""Readiness of every worker of one ``sbus serve``, not just the one that answers.

uvicorn's workers share one listening socket, so a load balancer cannot choose which
worker gets its next request: ``/admin/health`` may only say ready once EVERY worker
has connected to its store, or a client told "ready" can still meet a worker that
answers 503 ``not_ready``. ``sbus serve --workers N`` (N > 1) hands its workers a fresh
directory (``SBUS_READY_DIR``); each worker drops a ``ready-<pid>`` marker there once
its store answers and removes it on shutdown. A marker whose process is gone (a
SIGKILLed worker that uvicorn replaced) does not count, and is cleared when seen.

A worker that begins to shut down removes its marker at once (it will not serve much
longer) and answers 503 ``shutting down`` itself. On SIGTERM ``sbus serve``'s supervisor
first leaves a ``stopping`` file, then signals every worker: a worker that has not
handled its signal yet already answers ``shutting down`` too. (A worker replaced alone,
by SIGHUP, leaves no such file: the server as a whole stays ready.)
A worker whose drain bound cut requests in flight leaves a ``cut-<pid>`` file holding
how many, which ``sbus serve`` adds up for its exit status once every worker is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("sbus")

PREFIX = "ready-"
CUT_PREFIX = "cut-"
STOPPING = "stopping"
# /admin/health's reason once the server (or this worker) has begun to shut down.
SHUTTING_DOWN = "shutting down"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class WorkerReadiness:
    """Markers in ``directory`` for ``workers`` processes; with no directory (one
    worker, or an app built in-process) this worker's own state is the whole answer."""

    def __init__(self, directory: str | None, workers: int) -> None:
        self.directory = Path(directory) if directory else None
        self.workers = workers
        self.marker: Path | None = None

    def is_first(self) -> bool:
        """Whether this worker is the first of its server to ask (claims a slot file);
        True without a directory."""
        if self.directory is None:
            return True
        try:
            (self.directory / "first").open("x").close()
        except FileExistsError:
            return False
        return True

    def mark_ready(self) -> None:
        """Leave this worker's marker. A failure (the directory removed under us) only
        keeps /admin/health at not_ready, which says what is wrong; it never stops the
        worker from serving."""
        if self.directory is None:
            return
        marker = self.directory / f"{PREFIX}{os.getpid()}"
        try:
            marker.touch()
        except OSError as exc:
            log.warning("cannot mark this worker ready in %s: %s", self.directory, exc)
            return
        self.marker = marker

    def clear(self) -> None:
        if self.marker is not None:
            with contextlib.suppress(FileNotFoundError):
                self.marker.unlink()
            self.marker = None

    def waiting_for(self) -> str | None:
        """None when every worker is ready, else why not (for /admin/health)."""
        if self.directory is None:
            return None
        if (self.directory / STOPPING).exists():
            return SHUTTING_DOWN
        ready = 0
        for path in self.directory.glob(f"{PREFIX}*"):
            suffix = path.name[len(PREFIX) :]
            if not suffix.isdigit():
                continue
            if _alive(int(suffix)):
                ready += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if ready >= self.workers:
            return None
        return f"{ready} of {self.workers} workers connected to the store"

    def record_cut(self, count: int) -> None:
        """Leave the number of requests this worker's drain bound cut (see above)."""
        if self.directory is None:
            return
        try:
            (self.directory / f"{CUT_PREFIX}{os.getpid()}").write_text(str(count))
        except OSError as exc:
            log.warning("cannot record the cut requests in %s: %s", self.directory, exc)


def mark_stopping(directory: str) -> None:
    """The whole server is stopping (its supervisor says so, before signalling the workers)."""
    try:
        (Path(directory) / STOPPING).touch()
    except OSError as exc:
        log.warning("cannot mark the server stopping in %s: %s", directory, exc)


def requests_cut(directory: str) -> int:
    """How many requests the workers sharing ``directory`` cut at their drain bound."""
    total = 0
    for path in Path(directory).glob(f"{CUT_PREFIX}*"):
        with contextlib.suppress(OSError, ValueError):
            total += int(path.read_text())
    return total
