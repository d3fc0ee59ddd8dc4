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
send the bus to a standby is refused: every commit there would fail.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# asyncpg's target_session_attrs values; only the first three can reach a primary.
WRITABLE_ATTRS = ("read-write", "primary", "any")
STANDBY_ATTRS = ("standby", "prefer-standby", "read-only")


def asyncpg_dsn(url: str) -> str:
    """The DSN asyncpg connects with for the store URL ``url``; ValueError for a URL the
    bus cannot use (a bad port, hosts named twice, a standby-only target)."""
    parts = urlsplit(url)
    scheme = "postgresql"  # postgresql+asyncpg:// and postgres:// alike
    _, _, netloc_hosts = parts.netloc.rpartition("@")
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
    rebuilt = None
    if len(query_hosts) > 1:
        # One host= with the list, where asyncpg would keep only the last of several.
        merged = ",".join(h for v in query_hosts for h in v.split(",") if h)
        rebuilt = [(n, v) for n, v in query if n != "host"] + [("host", merged)]
    if len(hosts) > 1 and not attrs:
        rebuilt = (rebuilt or list(query)) + [("target_session_attrs", "read-write")]
    text = parts.query if rebuilt is None else urlencode(rebuilt, safe=":,/[]")
    return urlunsplit((scheme, parts.netloc, parts.path, text, parts.fragment))


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
