"""The browser pages over HTTP (``sbus.api.routers.pages``): ``/docs`` is Swagger UI 5
served from the package, every file a page names is served by the bus itself, nothing
names another host, the pages answer before the store is ready and without a token, and
assets revalidate by ETag. tests/browser renders them in a real browser."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from importlib import resources

import httpx
import pytest

from sbus.bootstrap import create_app
from sbus.config import Settings
from tests.api.auth_helpers import token_app
from tests.api.helpers import problem
from tests.conftest import AppFactory

PAGES = ["/docs"]
# src= and href= of a page, and the url: of its Swagger UI start-up script.
LINK = re.compile(r"""(?:src|href)="([^"]*)"|\burl:\s*"([^"]*)\"""")


def linked(text: str) -> list[str]:
    return [a or b for a, b in LINK.findall(text)]


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


async def test_swagger_ui_starts_on_the_bus_document_with_no_validator(
    unready: httpx.AsyncClient,
) -> None:
    script = (await unready.get("/docs/swagger-init.js")).text
    assert linked(script) == ["openapi.json"]
    assert "validatorUrl: null" in script


async def test_an_unknown_asset_is_404_before_the_store_is_ready(
    unready: httpx.AsyncClient,
) -> None:
    for path in ("/docs/nope.js", "/docs/LICENSE", "/docs/oauth2-redirect"):
        problem(await unready.get(path), 404, "NotFound")


@pytest.mark.parametrize("store_kind", ["memory"], indirect=True)
async def test_no_other_documentation_page_is_served(make_client: AppFactory) -> None:
    """FastAPI's ReDoc page is off, and nothing outside the listed assets is reachable."""
    _, c = await make_client()
    for path in ("/redoc", "/docs/", "/docs/..%2Fapp.py", "/docs/static/LICENSE"):
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
    for path in ("/docs", "/docs/swagger-ui-bundle.js", "/docs/swagger-init.js"):
        assert (await c.get(path)).status_code == 200, path
    # An unknown name under a page is still answered without a token: 404, not 401.
    problem(await c.get("/docs/nope.js"), 404, "NotFound")
    problem(await c.get("/stats"), 401, "Unauthorized")
