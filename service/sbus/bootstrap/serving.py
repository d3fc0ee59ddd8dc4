"""How ``sbus serve`` runs uvicorn: one worker in this process, or several under
uvicorn's supervisor, each stopping gracefully (:mod:`sbus.bootstrap.shutdown`).

With several workers the supervisor binds the listening socket and every worker serves
it through a copy. The kernel refuses new connections only once every copy is closed,
and uvicorn's supervisor keeps its own until the last worker has exited: a client (a
load balancer) would connect during the drain and wait, unanswered, until the process
ends and resets it. :class:`Supervisor` closes its copy as soon as it is told to stop,
so the port is refused from the moment the workers close theirs (after
``SBUS_SHUTDOWN_DELAY``), as it is with one worker. It also marks the server stopping
before it signals the workers (:mod:`sbus.api.readiness`), so that whichever worker
answers ``/admin/health`` says ``shutting down`` from then on.
"""

from __future__ import annotations

from socket import socket
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess

from sbus.api.readiness import mark_stopping, requests_cut
from sbus.bootstrap import shutdown
from sbus.config import Settings
from sbus.telemetry.logs import log_config

# uvicorn's own drain bound, a backstop behind the bus's (sbus.api.connections), which
# resets the connections left and cancels their requests first.
DRAIN_BACKSTOP_S = 5


class Supervisor(Multiprocess):
    def __init__(self, config: uvicorn.Config, sockets: list[socket], ready_dir: str) -> None:
        super().__init__(config, sockets)
        self.ready_dir = ready_dir
        # A signal since the last look (`sbus serve` checks before serving) is handled
        # as if it came now.
        self.signal_queue.extend(shutdown.take_early())

    def terminate_all(self) -> None:
        # Called once, when the whole server stops (SIGTERM, SIGINT).
        mark_stopping(self.ready_dir)
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


def run(settings: Settings, workers: int, ready_dir: str | None) -> int:
    """Serve until SIGTERM or SIGINT (within ``shutdown.noting_signals()``); returns how
    many requests in flight the drain bound cut (0 when every one finished)."""
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "workers": workers,
        "log_config": log_config(settings.log_level, settings.log_format, settings.access_log),
        "log_level": None,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": int(settings.drain_timeout) + DRAIN_BACKSTOP_S,
        # Header deadline, connection cap and the drain bound (the body's deadline is
        # the app's own gate).
        "http": "sbus.api.connections:GuardedHttpToolsProtocol",
        "timeout_keep_alive": settings.keepalive_timeout,
    }
    if workers == 1:
        # The worker runs in this process, and uvicorn raises the signal that stopped it
        # again once it has stopped: the handler `sbus serve` installed from its start
        # (shutdown.noting_signals) notes it, so the process lives on to say how the
        # drain went.
        uvicorn.run("sbus.cli:_factory", **options)
        return shutdown.requests_cut()
    assert ready_dir is not None  # made by `sbus serve` for several workers
    config = uvicorn.Config("sbus.cli:_factory", **options)
    Supervisor(config, [config.bind_socket()], ready_dir).run()
    # The workers were processes of their own: they left what they cut in files.
    return requests_cut(ready_dir)
