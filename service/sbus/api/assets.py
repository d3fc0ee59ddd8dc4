"""The files the bus serves to browsers, shipped inside the package under ``static/``:
the API page ``/docs`` (Swagger UI, vendored from the ``swagger-ui-dist`` release named in
``static/swagger-ui/package.json``, with its licence) and the dashboard ``/ui`` (plain
HTML, CSS and JavaScript modules: no build step).

Nothing is fetched from another host, at build time or at run time, so both pages work
on a machine without a network. Every page and asset is public in token mode, like
``/openapi.json``: they hold no data, and the dashboard asks for a token itself.

A file is read from the package once per process and kept (they are immutable package
data); it is served with a content ``ETag`` and ``Cache-Control: no-cache``, so a browser
revalidates it (304) instead of keeping an old copy after an upgrade.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

JS = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
HTML = "text/html; charset=utf-8"

DOCS = "/docs"
UI = "/ui"

# URL name under its page -> file under static/. A name not listed is 404.
DOCS_ASSETS = {
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", JS),
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", CSS),
    "swagger-init.js": ("docs/swagger-init.js", JS),
}
UI_ASSETS = {
    name: (f"ui/{name}", CSS if name.endswith(".css") else JS)
    for name in (
        "dashboard.css",
        "dashboard.js",
        "api.js",
        "stream.js",
        "activity.js",
        "readsets.js",
        "history.js",
        "diff.js",
        "view.js",
    )
}
PAGES = {DOCS: "docs/index.html", UI: "ui/index.html"}

# One path segment under a page: what the asset routes can match. The authenticator
# lets these through without a token; the route answers 404 for a name not listed.
_ASSET_PATH = re.compile(r"/(?:docs|ui)/[A-Za-z0-9][A-Za-z0-9._-]*")

# The pages load only their own files and call only their own origin. Swagger UI sets
# style attributes and draws icons from data: URLs.
CSP = {
    DOCS: "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    UI: "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


def is_public(path: str) -> bool:
    """A page or one of its assets."""
    return path in PAGES or _ASSET_PATH.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media: str
    etag: str


@functools.cache
def load(name: str, media: str) -> Asset:
    """The file ``static/<name>`` (read once per process)."""
    body = (resources.files("sbus.api") / "static" / name).read_bytes()
    return Asset(body, media, etag_of(body))


def etag_of(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:32]}"'
