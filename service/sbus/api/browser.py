"""What a web page in a browser may make the bus do (docs/security.md).

Open mode has no credentials, so every page a developer opens could otherwise drive a
bus it can reach: ``<img>`` and ``<script>`` GETs need no Content-Type (a GET records a
DeliveryLog entry), forms post, ``fetch`` sends anything CORS allows. The gate
(:mod:`sbus.api.middleware`) asks an :class:`OriginPolicy` before any body is read:

- **Host**: the request must name the bus as the operator expects (the loopback names,
  ``SBUS_HOST``, ``SBUS_ALLOWED_HOSTS``). A DNS-rebinding page reaches the bus under its
  own name and is refused (403 ``HostNotAllowed``).
- **Origin**: a request the browser marks as sent from another site (``Sec-Fetch-Site:
  cross-site`` or ``same-site``; ``same-site`` covers a page on another port of
  localhost), or whose ``Origin`` is neither a loopback origin nor the bus's own, is
  refused (403 ``CrossSiteRequest``), unless its ``Origin`` is listed in
  ``SBUS_CORS_ORIGINS``: the operator has allowed that page.

:class:`Cors` is Starlette's CORS middleware answering a refused preflight with a
problem document instead of plain text. It runs outside the gate, so a preflight never
meets the bearer-token check and every gate rejection carries the CORS headers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from sbus.api.problems import problem_response
from sbus.config import Settings
from sbus.core import errors as e

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
# http(s) on a loopback name, any port: a page served from this machine.
_LOOPBACK_ORIGIN = re.compile(r"https?://(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?")
_FOREIGN_SITES = frozenset({"cross-site", "same-site"})
_ALLOW_WITH = "list the page's origin in SBUS_CORS_ORIGINS to allow it"


def host_name(raw: str) -> str:
    """The host of a Host header value (or a configured name): lower case, the port
    dropped, an IPv6 literal in brackets."""
    raw = raw.strip().lower()
    if raw.startswith("["):
        end = raw.find("]")
        return raw[: end + 1] if end > 0 else raw
    if raw.count(":") > 1:  # a bare IPv6 address, as SBUS_HOST spells it
        try:
            return f"[{ipaddress.IPv6Address(raw)}]"
        except ValueError:
            return raw
    return raw.rsplit(":", 1)[0] if ":" in raw else raw


def listed(value: str) -> list[str]:
    """The entries of a comma-separated setting."""
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """Open mode's Host and Origin rules. ``hosts`` are :func:`host_name` forms;
    ``cors_origins`` are exact origins (``*``: every origin)."""

    hosts: frozenset[str] = LOOPBACK_HOSTS
    cors_origins: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> OriginPolicy:
        names = [settings.host, *listed(settings.allowed_hosts)]
        return cls(
            hosts=LOOPBACK_HOSTS | {host_name(name) for name in names},
            cors_origins=frozenset(listed(settings.cors_origins)),
        )

    def problem(self, headers: Sequence[tuple[bytes, bytes]]) -> e.SBusError | None:
        """Why a browser-borne request must be refused, or None."""
        host = ""
        origins: list[str] = []
        sites: list[str] = []
        for name, value in headers:
            if name == b"host" and not host:
                host = value.decode("latin-1").strip().lower()
            elif name == b"origin":
                origins.append(value.decode("latin-1").strip())
            elif name == b"sec-fetch-site":
                sites.append(value.decode("latin-1").strip().lower())
        if host_name(host) not in self.hosts:
            allowed = ", ".join(sorted(self.hosts))
            return e.HostNotAllowed(
                f"Host {host_name(host)!r} is not allowed in open mode "
                f"(allowed: {allowed}; see SBUS_ALLOWED_HOSTS)"
            )
        if origins and self._listed(origins):
            return None
        for site in sites:
            if site in _FOREIGN_SITES:
                return e.CrossSiteRequest(
                    f"a {site} request from a web page is refused in open mode; {_ALLOW_WITH}"
                )
        for origin in origins:
            if not (_LOOPBACK_ORIGIN.fullmatch(origin.lower()) or self._own(origin, host)):
                return e.CrossSiteRequest(
                    f"requests from origin {origin!r} are refused in open mode; {_ALLOW_WITH}"
                )
        return None

    def _listed(self, origins: Iterable[str]) -> bool:
        return all(o in self.cors_origins for o in origins) or "*" in self.cors_origins

    @staticmethod
    def _own(origin: str, host: str) -> bool:
        """A page served by the bus itself under an allowed name (its /docs page)."""
        scheme, sep, authority = origin.lower().partition("://")
        return bool(sep) and scheme in ("http", "https") and authority == host


class Cors(CORSMiddleware):
    """Starlette's CORS middleware; a refused preflight (origin, method or headers not
    allowed) is 403 ``CrossSiteRequest`` instead of a plain-text 400."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = bytes(response.body).decode("latin-1")
        problem = problem_response(e.CrossSiteRequest(f"CORS preflight refused: {refused}"))
        for name, value in response.headers.items():
            if name.startswith("access-control-") or name == "vary":
                problem.headers[name] = value
        return problem
