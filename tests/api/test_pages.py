"""The browser pages over HTTP (``sbus.api.routers.pages``): ``/docs`` is Swagger UI 5
served from the package, ``/ui`` the dashboard; every file a page names is served by the
bus itself, nothing names another host, the pages answer before the store is ready and
without a token, the dashboard is told the mode, and assets revalidate by ETag.
tests/browser renders them in a real browser."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import httpx
import pytest

from sbus.api import assets
from sbus.bootstrap import create_app
from sbus.config import Settings
from tests.api.auth_helpers import token_app
from tests.api.helpers import problem
from tests.conftest import AppFactory

PAGES = ["/docs", "/ui"]
# src= and href= of a page, the url: of its Swagger UI start-up script, and what a
# dashboard module imports.
LINK = re.compile(r"""(?:src|href)="([^"]*)"|\burl:\s*"([^"]*)"|\bfrom "([^"]*)\"""")


def linked(text: str) -> list[str]:
    return ["".join(groups) for groups in LINK.findall(text)]


def meta(page: str, name: str) -> str:
    found = re.search(rf'<meta name="sbus-{name}" content="([^"]*)">', page)
    assert found is not None, name
    return found.group(1)


@pytest.fixture
async def unready() -> AsyncIterator[httpx.AsyncClient]:
    """An app whose store never starts (no lifespan): every route but the ungated ones
    answers 503."""
    app = create_app(Settings(store="memory://"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


def test_the_vendored_swagger_ui_is_release_5_with_its_licence() -> None:
    """Swagger UI renders OpenAPI 3.1 from release 5 on; its Apache licence and notice
    ship beside it."""
    folder = resources.files("sbus.api") / "static" / "swagger-ui"
    package = json.loads((folder / "package.json").read_text())
    assert package["name"] == "swagger-ui-dist"
    assert package["license"] == "Apache-2.0"
    assert int(package["version"].split(".")[0]) >= 5
    assert "Apache License" in (folder / "LICENSE").read_text()
    assert "SmartBear" in (folder / "NOTICE").read_text()


@pytest.mark.parametrize("page", PAGES)
async def test_a_page_and_everything_it_names_is_served_here(
    unready: httpx.AsyncClient, page: str
) -> None:
    """Before the store is ready too. The page's own files name no other host: a link
    is relative, a script is the bus's, and no URL has a scheme or starts with //."""
    r = await unready.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "://" not in r.text
    named = linked(r.text)
    assets = [name for name in named if not name.startswith("data:")]
    assert len(assets) >= 2, named
    scripts: list[str] = []
    for name in assets:
        assert not name.startswith(("/", "http")), name
        served = await unready.get(f"/{name}")
        assert served.status_code == 200, (name, served.text)
        assert "://" not in served.text or name.endswith(("bundle.js", ".css")), name
        if name.endswith(".js") and "bundle" not in name:
            scripts.append(served.text)
    assert scripts, "a page starts itself from a script file of its own"
    assert (await unready.get("/stats")).status_code == 503


async def test_every_dashboard_module_is_served_and_imports_only_its_siblings(
    unready: httpx.AsyncClient,
) -> None:
    """The modules import one another by relative name; each one, and each file of
    static/ui, is served (an unlisted file would be a 404 and a broken page)."""
    folder = resources.files("sbus.api") / "static" / "ui"
    files = sorted(f.name for f in folder.iterdir() if f.name != "index.html")
    assert files == sorted(assets.UI_ASSETS)
    for name in files:
        served = await unready.get(f"/ui/{name}")
        assert served.status_code == 200, name
        media = "text/css" if name.endswith(".css") else "text/javascript"
        assert served.headers["content-type"] == f"{media}; charset=utf-8"
        assert "://" not in served.text, name
        for imported in linked(served.text):
            assert imported.startswith("./") and imported[2:] in files, (name, imported)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {"auth": "open", "admin": "off"}),
        ({"admin_enabled": True}, {"auth": "open", "admin": "on"}),
        ({"auth": "token", "secret": "x" * 32}, {"auth": "token", "admin": "token"}),
    ],
    ids=["open", "open-admin", "token"],
)
async def test_the_dashboard_is_told_the_mode(
    settings: dict[str, Any], expected: dict[str, str]
) -> None:
    """What the page cannot ask without a refused request: in open mode whether admin
    is on; in token mode the token's scopes decide."""
    app = create_app(Settings(store="memory://", **settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        page = (await c.get("/ui")).text
    assert {name: meta(page, name) for name in expected} == expected
    assert "%" not in page


async def test_swagger_ui_starts_on_the_bus_document_with_no_validator(
    unready: httpx.AsyncClient,
) -> None:
    script = (await unready.get("/docs/swagger-init.js")).text
    assert linked(script) == ["openapi.json"]
    assert "validatorUrl: null" in script


async def test_an_unknown_asset_is_404_before_the_store_is_ready(
    unready: httpx.AsyncClient,
) -> None:
    for path in ("/docs/nope.js", "/docs/LICENSE", "/docs/oauth2-redirect", "/ui/index.html"):
        problem(await unready.get(path), 404, "NotFound")


@pytest.mark.parametrize("store_kind", ["memory"], indirect=True)
async def test_no_other_documentation_page_is_served(make_client: AppFactory) -> None:
    """FastAPI's ReDoc page is off, and nothing outside the listed assets is reachable."""
    _, c = await make_client()
    for path in ("/redoc", "/docs/", "/ui/", "/docs/..%2Fapp.py", "/ui/static/ui.js"):
        problem(await c.get(path), 404, "NotFound")


async def test_assets_revalidate_by_etag(unready: httpx.AsyncClient) -> None:
    first = await unready.get("/docs/swagger-ui.css")
    assert first.status_code == 200
    assert first.headers["cache-control"] == "no-cache"
    assert first.headers["content-type"] == "text/css; charset=utf-8"
    etag = first.headers["etag"]
    again = await unready.get("/docs/swagger-ui.css", headers={"If-None-Match": etag})
    assert (again.status_code, again.content) == (304, b"")
    assert again.headers["etag"] == etag
    other = await unready.get("/docs/swagger-ui.css", headers={"If-None-Match": '"other"'})
    assert other.status_code == 200


@pytest.mark.parametrize("store_kind", ["memory"], indirect=True)
async def test_token_mode_serves_the_pages_without_a_token(make_client: AppFactory) -> None:
    _, c = await token_app(make_client)
    for path in ("/docs", "/docs/swagger-ui-bundle.js", "/ui", "/ui/dashboard.js"):
        assert (await c.get(path)).status_code == 200, path
    # An unknown name under a page is still answered without a token: 404, not 401.
    problem(await c.get("/docs/nope.js"), 404, "NotFound")
    problem(await c.get("/ui/nope.js"), 404, "NotFound")
    problem(await c.get("/stats"), 401, "Unauthorized")
