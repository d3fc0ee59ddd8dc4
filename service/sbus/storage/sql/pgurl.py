"""A PostgreSQL store URL as asyncpg connects with it, one or several hosts.

An operator names a primary and its standbys in one URL, libpq's way
(``postgresql+asyncpg://USER@HOST1:PORT1,HOST2:PORT2/DB``) or SQLAlchemy's way
(``postgresql+asyncpg://USER@/DB?host=HOST1:PORT1&host=HOST2:PORT2``). asyncpg reads the
first form but keeps only the last of several ``host=`` parameters, and SQLAlchemy's URL
parser refuses the first: so every connection of the store, the pool's and the
migrations' alike, is opened by asyncpg from the one DSN made here.

With several hosts the bus must land on the one that accepts writes: unless the URL says
otherwise, ``target_session_attrs=read-write`` is added, so asyncpg tries the hosts in
order and keeps the first that is neither in recovery nor read-only. A value that would
send the bus to a standby is refused: every commit there would fail (``any`` too, with
several hosts: it keeps the first that answers).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# asyncpg's target_session_attrs values that can reach a primary (the others are
# standby, prefer-standby and read-only).
WRITABLE_ATTRS = ("read-write", "primary", "any")


def asyncpg_dsn(url: str) -> str:
    """The DSN asyncpg connects with for the store URL ``url``; ValueError for a URL the
    bus cannot use (a bad port, hosts named twice, a standby-only target)."""
    return asyncpg_dsns(url)[0]


def asyncpg_dsns(url: str) -> list[str]:
    """:func:`asyncpg_dsn`, then the same DSN with its hosts rotated one place further
    each (one DSN per host, or just the one when the URL names a single host or gives
    the ports as a separate ``port=`` list): the orders a connector may try them in, so
    that a host that hangs is not the first tried by every later connection."""
    parts = urlsplit(url)
    userinfo, at, netloc_hosts = parts.netloc.rpartition("@")
    query = parse_qsl(parts.query, keep_blank_values=True)
    query_hosts = [value for name, value in query if name == "host"]
    if netloc_hosts and query_hosts:
        raise ValueError("name the hosts either before the database or in host= parameters")
    hosts = [h for spec in [netloc_hosts, *query_hosts] for h in spec.split(",") if h]
    for host in hosts:
        _check_port(host)
    attrs = [value for name, value in query if name == "target_session_attrs"]
    for attr in attrs:
        if attr not in WRITABLE_ATTRS:
            raise ValueError(
                f"target_session_attrs={attr} cannot be used: the bus writes, so it needs "
                f"one of {', '.join(WRITABLE_ATTRS)}"
            )
        if attr == "any" and len(hosts) > 1:
            # asyncpg keeps the first host that answers, a standby too: the bus would
            # stay there, refused every write, with the primary named further on.
            raise ValueError(
                "target_session_attrs=any cannot be used with several hosts: the first "
                "that answers may be a standby; use read-write (the default) or primary"
            )
    rest = [(n, v) for n, v in query if n != "host"]
    if len(hosts) > 1 and not attrs:
        rest.append(("target_session_attrs", "read-write"))
    ports_apart = any(n == "port" and "," in v for n, v in query)
    orders = (
        [hosts]
        if len(hosts) < 2 or ports_apart
        else [hosts[i:] + hosts[:i] for i in range(len(hosts))]
    )
    dsns = []
    for order in orders:
        netloc, pairs = parts.netloc, query
        if query_hosts:
            # One host= with the list, where asyncpg would keep only the last of several.
            pairs = [*rest, ("host", ",".join(order))]
        elif len(hosts) > 1:
            netloc = f"{userinfo}{at}{','.join(order)}"
            pairs = rest
        text = parts.query if pairs == query else urlencode(pairs, safe=":,/[]")
        # postgresql+asyncpg:// and postgres:// alike
        dsns.append(urlunsplit(("postgresql", netloc, parts.path, text, parts.fragment)))
    return dsns


def _check_port(host: str) -> None:
    """A host's ``:PORT`` must be a port number (a socket directory has none)."""
    if host.startswith("/"):
        return
    if host.startswith("["):  # [IPv6]:PORT
        close = host.find("]")
        if close < 0:
            raise ValueError(f"unclosed [ in host {host!r}")
        port = host[close + 2 :] if host[close + 1 : close + 2] == ":" else ""
    else:
        _, colon, port = host.rpartition(":")
        if not colon:
            return
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"host {host!r}: the port must be a number from 1 to 65535")
