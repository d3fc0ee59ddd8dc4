"""How a store URL is shown: one rule for the factory, every backend and the CLI (a
module of its own so that a backend need not import the factory, and with it the other
backends)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

# Query parameters the drivers accept a password in (asyncpg and redis-py read
# ``password``; libpq-style URLs may say ``passwd``).
_SECRET_PARAMS = frozenset({"password", "passwd", "pass"})
MASK = "***"


def redact_url(url: str) -> str:
    """``url`` fit to print: the password in the userinfo and in any ``password=``
    query parameter replaced by ``***``, everything else as given. The one place that
    decides how a store URL is shown (the serve banner, ``sbus migrate``, errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable store URL>"
    redacted = url
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        redacted = redacted.replace(f"//{parts.netloc}", f"//{user}:{MASK}@{host}", 1)
    if any(k.lower() in _SECRET_PARAMS for k, _ in parse_qsl(parts.query)):
        head, _, rest = redacted.partition("?")
        query, hash_, fragment = rest.partition("#")
        fields = [
            f"{field.split('=', 1)[0]}={MASK}"
            if field.split("=", 1)[0].lower() in _SECRET_PARAMS
            else field
            for field in query.split("&")
        ]
        redacted = f"{head}?{'&'.join(fields)}{hash_}{fragment}"
    return redacted


CLUSTER_SCHEME = "redis+cluster://"


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str, str]:
    """The startup nodes of a ``redis+cluster://[user:pass@]host:port,host:port[/0][?opts]``
    URL, its userinfo (with the ``@``, or empty) and its query (with the ``?``, or
    empty): a node's own URL is ``redis://{userinfo}{host}:{port}/0{query}``. Raises
    ValueError, naming what is wrong: no node, a node without a port, a database other
    than 0 (Redis Cluster has only database 0)."""
    if not url.startswith(CLUSTER_SCHEME):
        raise ValueError(f"not a {CLUSTER_SCHEME} URL")
    rest = url[len(CLUSTER_SCHEME) :]
    rest, mark, query = rest.partition("?")
    query = mark + query
    netloc, slash, path = rest.partition("/")
    if slash and path not in ("", "0"):
        raise ValueError(
            f"Redis Cluster has only database 0, not /{path}: write {CLUSTER_SCHEME}"
            "HOST:PORT,HOST:PORT (or .../0)"
        )
    userinfo, at, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"Redis Cluster node {item.strip()!r} is not HOST:PORT: write "
                f"{CLUSTER_SCHEME}HOST:PORT,HOST:PORT,..."
            )
        nodes.append((host, int(port)))
    return nodes, userinfo + at, query
