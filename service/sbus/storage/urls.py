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
