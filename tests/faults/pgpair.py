"""A PostgreSQL primary with a synchronous streaming standby, on loopback, as the
``postgres`` user: what the failover tests crash and promote.

The primary runs ``synchronous_standby_names='*'`` with ``synchronous_commit=on``: a
COMMIT returns only once the standby has flushed its WAL, so a promoted standby holds
every commit the primary acknowledged. ``fsync=off`` on both keeps the tests fast; it
costs nothing here, since a crash kills server processes, not the machine.

The standby is a ``pg_basebackup -R`` of the primary (it writes ``standby.signal`` and
``primary_conninfo``). It starts without ``synchronous_standby_names``: once promoted it
has no standby of its own, and a primary that waits for one would hang every commit (a
failover manager such as Patroni clears the setting the same way).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tests.concurrency.conftest import LOOPBACK, free_port
from tests.faults.conftest import SERVICE_TIMEOUT_S, Postgres

PRIMARY_SETTINGS = "-c fsync=off -c synchronous_commit=on -c synchronous_standby_names='*'"
STANDBY_SETTINGS = "-c fsync=off -c synchronous_commit=on -c hot_standby=on"


class Standby(Postgres):
    """A cluster made by ``pg_basebackup -R`` from a running primary, not by initdb."""

    def __post_init__(self) -> None:
        self.datadir = self.root / "pg"
        self.logfile = self.root / "pg.log"

    def clone(self, primary: Postgres) -> None:
        self._pg(
            [
                "pg_basebackup",
                *("-D", str(self.datadir), "-h", LOOPBACK, "-p", str(primary.port)),
                *("-U", "postgres", "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"),
            ]
        )


def promote(standby: Postgres) -> None:
    """``pg_ctl promote``, returning once the server accepts writes; then, as a failover
    manager does, no synchronous standby is waited for until one has joined (a setting
    the standby may have copied from its primary's postgresql.auto.conf)."""
    standby._pg(["pg_ctl", "-D", str(standby.datadir), "-w", "-t", "30", "promote"])
    asyncio.run(aexecute(standby, "ALTER SYSTEM RESET synchronous_standby_names"))
    asyncio.run(aexecute(standby, "SELECT pg_reload_conf()"))


def rejoin(old: Postgres, primary: Postgres) -> Standby:
    """Rebuild the crashed ``old`` primary as ``primary``'s synchronous standby (same
    port, a fresh base backup: its WAL diverged at the crash), and make the primary wait
    for it again; returns once it streams as the synchronous one."""
    shutil.rmtree(old.datadir)
    standby = Standby(old.bindir, old.root, old.port)
    standby.clone(primary)
    standby.start(STANDBY_SETTINGS)
    asyncio.run(aexecute(primary, "ALTER SYSTEM SET synchronous_standby_names = '*'"))
    asyncio.run(aexecute(primary, "SELECT pg_reload_conf()"))
    Pair(primary, standby).wait_synchronous()
    return standby


def direct_url(pg: Postgres) -> str:
    """A single-host DSN for asyncpg, bypassing the bus (to look at one server)."""
    return f"postgresql://postgres@{LOOPBACK}:{pg.port}/postgres"


def multi_host_url(*servers: Postgres, attrs: str | None = "read-write") -> str:
    """The store URL an operator sets: every host, in order, one database."""
    hosts = ",".join(f"{LOOPBACK}:{pg.port}" for pg in servers)
    query = f"?target_session_attrs={attrs}" if attrs else ""
    return f"postgresql+asyncpg://postgres@{hosts}/postgres{query}"


async def afetch(pg: Postgres, sql: str) -> list[asyncpg.Record]:
    """The rows of ``sql`` on that one server."""
    conn = await asyncpg.connect(direct_url(pg))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def aexecute(pg: Postgres, sql: str) -> None:
    conn = await asyncpg.connect(direct_url(pg))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def fetch(pg: Postgres, sql: str) -> list[asyncpg.Record]:
    return asyncio.run(afetch(pg, sql))


@dataclass
class Pair:
    """A started primary and its started, synchronous, streaming standby."""

    primary: Postgres
    standby: Standby

    @property
    def url(self) -> str:
        return multi_host_url(self.primary, self.standby)

    def wait_synchronous(self) -> None:
        """Until the primary sees its standby streaming as its synchronous one."""
        deadline = time.monotonic() + SERVICE_TIMEOUT_S
        rows: list[asyncpg.Record] = []
        while time.monotonic() < deadline:
            rows = fetch(self.primary, "SELECT state, sync_state FROM pg_stat_replication")
            if [(r["state"], r["sync_state"]) for r in rows] == [("streaming", "sync")]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the standby never became synchronous: {rows}")


def postgres_root(root: Path, name: str) -> Path:
    """A directory under ``root`` the postgres user owns."""
    path = root / name
    path.mkdir()
    path.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    return path


def start_pair(root: Path, primary: Postgres) -> Pair:
    """Start ``primary`` (initialised, not started) and a synchronous standby of it in
    ``root``/standby; returns once the standby streams as the synchronous one."""
    primary.start(PRIMARY_SETTINGS)
    standby = Standby(primary.bindir, postgres_root(root, "standby"), free_port())
    standby.clone(primary)
    standby.start(STANDBY_SETTINGS)
    pair = Pair(primary, standby)
    pair.wait_synchronous()
    return pair
