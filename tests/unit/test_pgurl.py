"""The PostgreSQL store URL as asyncpg gets it (sbus.storage.sql.pgurl): one host as
given, several hosts in either spelling as one host list that lands on the primary, and
the URLs no connection could use refused before any connection is tried."""

from __future__ import annotations

import pytest
from asyncpg.connect_utils import SessionAttribute, _parse_connect_arguments

from sbus.config import Settings
from sbus.storage.factory import open_store
from sbus.storage.sql.pgurl import asyncpg_dsn, asyncpg_dsns
from sbus.storage.urls import redact_url


@pytest.mark.parametrize(
    ("url", "dsn"),
    [
        # One host: only the scheme changes, whatever the query says.
        (
            "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
            "postgresql://postgres@127.0.0.1:5432/postgres",
        ),
        (
            "postgres://u:p%40w@db/sbus?sslmode=disable",
            "postgresql://u:p%40w@db/sbus?sslmode=disable",
        ),
        # Several hosts: read-write is added unless the URL chose.
        (
            "postgresql+asyncpg://u@h1:5432,h2:5433/db",
            "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write",
        ),
        (
            "postgresql+asyncpg://u@h1,h2/db?target_session_attrs=primary",
            "postgresql://u@h1,h2/db?target_session_attrs=primary",
        ),
        # SQLAlchemy's spelling: the host= parameters become one list.
        (
            "postgresql+asyncpg://u:pw@/db?host=h1:5432&host=h2:5433&sslmode=disable",
            "postgresql://u:pw@/db?sslmode=disable&target_session_attrs=read-write"
            "&host=h1:5432,h2:5433",
        ),
        ("postgresql://u@/db?host=/run/postgresql", "postgresql://u@/db?host=/run/postgresql"),
        # One host: any is asyncpg's own default, and there is no other host to find.
        ("postgresql://u@[::1]:5433/db?target_session_attrs=any", None),
    ],
)
def test_dsn(url: str, dsn: str | None) -> None:
    assert asyncpg_dsn(url) == (dsn or url)


def connect_arguments(dsn: str) -> tuple[list[tuple[str, int]], SessionAttribute]:
    """What asyncpg itself makes of ``dsn``: the addresses it tries, in order, and the
    attribute it requires of the one it keeps."""
    addrs, params, _ = _parse_connect_arguments(
        dsn=dsn,
        host=None,
        port=None,
        user=None,
        password=None,
        passfile=None,
        database=None,
        command_timeout=None,
        statement_cache_size=100,
        max_cached_statement_lifetime=0,
        max_cacheable_statement_size=0,
        ssl=None,
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
        service=None,
        servicefile=None,
    )
    return list(addrs), params.target_session_attrs


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://u:pw@h1:5432,h2:5433/db",
        "postgresql+asyncpg://u:pw@/db?host=h1:5432&host=h2:5433",
    ],
)
def test_asyncpg_tries_every_host_for_a_writable_one(url: str) -> None:
    # Given SQLAlchemy's spelling as it is, asyncpg would try h2 alone.
    assert connect_arguments(asyncpg_dsn(url)) == (
        [("h1", 5432), ("h2", 5433)],
        SessionAttribute.read_write,
    )


@pytest.mark.parametrize(
    ("url", "orders"),
    [
        ("postgresql+asyncpg://u@h1:1/db", [[("h1", 1)]]),
        (
            "postgresql+asyncpg://u:pw@h1:1,h2:2,h3:3/db",
            [
                [("h1", 1), ("h2", 2), ("h3", 3)],
                [("h2", 2), ("h3", 3), ("h1", 1)],
                [("h3", 3), ("h1", 1), ("h2", 2)],
            ],
        ),
        (
            "postgresql+asyncpg://u@/db?host=h1:1&host=h2:2",
            [[("h1", 1), ("h2", 2)], [("h2", 2), ("h1", 1)]],
        ),
        # Ports given apart from the hosts: one order, as written.
        ("postgresql://u@/db?host=h1,h2&port=1,2", [[("h1", 1), ("h2", 2)]]),
    ],
)
def test_each_host_first_in_turn(url: str, orders: list[list[tuple[str, int]]]) -> None:
    dsns = asyncpg_dsns(url)
    assert [connect_arguments(dsn)[0] for dsn in dsns] == orders
    want = SessionAttribute.read_write if len(orders[0]) > 1 else SessionAttribute.any
    assert {connect_arguments(dsn)[1] for dsn in dsns} == {want}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+asyncpg://u@h1:5432,h2:port/db", "port must be a number"),
        ("postgresql+asyncpg://u@h1:70000/db", "port must be a number"),
        ("postgresql+asyncpg://u@h1/db?host=h2", "either before the database or in host="),
        ("postgresql+asyncpg://u@h1,h2/db?target_session_attrs=standby", "the bus writes"),
        ("postgresql+asyncpg://u@h1/db?target_session_attrs=prefer-standby", "the bus writes"),
        ("postgresql+asyncpg://u@h1/db?target_session_attrs=bogus", "the bus writes"),
        # Several hosts with any: the first that answers is kept, a standby too, and the
        # bus would stay on it, never ready, with the primary named further on.
        ("postgresql+asyncpg://u@h1,h2/db?target_session_attrs=any", "with several hosts"),
        ("postgresql+asyncpg://u@/db?host=h1&host=h2&target_session_attrs=any", "several hosts"),
    ],
)
def test_unusable_url_is_refused_when_the_store_is_made(url: str, message: str) -> None:
    # A ValueError here is `sbus serve`/`sbus migrate` exiting 2 with the message.
    with pytest.raises(ValueError, match=message):
        open_store(url, Settings().store_limits())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+asyncpg://bus:pw@h1:5432,h2:5433/db?target_session_attrs=read-write",
            "postgresql+asyncpg://bus:***@h1:5432,h2:5433/db?target_session_attrs=read-write",
        ),
        (
            "postgresql+asyncpg://bus:pw@/db?host=h1:5432&host=h2:5433",
            "postgresql+asyncpg://bus:***@/db?host=h1:5432&host=h2:5433",
        ),
        (
            "postgresql+asyncpg://bus@[::1]:5432,h2/db?password=pw",
            "postgresql+asyncpg://bus@[::1]:5432,h2/db?password=***",
        ),
    ],
)
def test_redact_multi_host(url: str, shown: str) -> None:
    assert redact_url(url) == shown
