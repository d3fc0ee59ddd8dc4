"""The browser pages: ``/docs`` (Swagger UI over ``/openapi.json``) and ``/ui`` (the
dashboard), and their assets, all served from the package (``sbus.api.assets``). None of
them is in the OpenAPI document, and none needs a token (the dashboard asks for one).

ReDoc and Swagger UI's OAuth2 redirect page, which FastAPI adds by default, are not
served: the bus has no OAuth2 flow (a bearer token is pasted into the Authorize dialog),
and one API page is enough.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from sbus.api import assets
from sbus.api.runtime import runtime_of
from sbus.core import errors as e

router = APIRouter(include_in_schema=False)


def _served(request: Request, asset: assets.Asset, csp: str | None = None) -> Response:
    headers = {
        "ETag": asset.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if csp is not None:
        headers["Content-Security-Policy"] = csp
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media, headers=headers)


def _asset(table: dict[str, tuple[str, str]], page: str, name: str) -> assets.Asset:
    if name not in table:
        raise e.RouteNotFound(f"{page} has no asset {name!r}")
    return assets.load(*table[name])


@router.api_route(assets.DOCS, methods=["GET", "HEAD"])
async def docs_page(request: Request) -> Response:
    page = assets.load(assets.PAGES[assets.DOCS], assets.HTML)
    return _served(request, page, assets.CSP[assets.DOCS])


@router.api_route(assets.DOCS + "/{name}", methods=["GET", "HEAD"])
async def docs_asset(request: Request, name: str) -> Response:
    return _served(request, _asset(assets.DOCS_ASSETS, assets.DOCS, name))


@router.api_route(assets.UI, methods=["GET", "HEAD"])
async def ui_page(request: Request) -> Response:
    """The dashboard, told in its ``<meta>`` tags what it cannot learn without a refused
    request (each of which a browser logs as an error): the mode and whether admin is
    on."""
    settings = runtime_of(request.app).settings
    token_mode = settings.auth_mode == "token"
    # Open mode: SBUS_ADMIN_ENABLED decides; token mode: the token's scopes do.
    admin = b"token" if token_mode else b"on" if settings.admin_enabled else b"off"
    template = assets.load(assets.PAGES[assets.UI], assets.HTML)
    body = template.body.replace(b"%AUTH%", b"token" if token_mode else b"open").replace(
        b"%ADMIN%", admin
    )
    page = assets.Asset(body, template.media, assets.etag_of(body))
    return _served(request, page, assets.CSP[assets.UI])


@router.api_route(assets.UI + "/{name}", methods=["GET", "HEAD"])
async def ui_asset(request: Request, name: str) -> Response:
    return _served(request, _asset(assets.UI_ASSETS, assets.UI, name))
