"""``/docs`` in a real browser: the vendored Swagger UI renders the bus's OpenAPI 3.1
document with every operation, loads nothing from another host, and its "Try it out"
reaches the bus (open mode's cross-site checks let the bus's own page through)."""

from __future__ import annotations

import httpx

from tests.browser.conftest import Buses, Tab
from tests.concurrency.conftest import Server

METHODS = {"get", "post", "put", "patch", "delete"}


def operations(server: Server) -> int:
    document = httpx.get(f"{server.base_url}/openapi.json", trust_env=False).json()
    assert document["openapi"].startswith("3.1")
    return sum(1 for item in document["paths"].values() for method in item if method in METHODS)


def test_docs_renders_every_operation_offline_and_calls_the_bus(tab: Tab, buses: Buses) -> None:
    expected = operations(buses.open)
    assert expected >= 25
    page = tab.page
    page.goto(f"{buses.open.base_url}/docs")
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() == expected
    assert page.locator(".version-stamp").inner_text() == "OAS 3.1"
    assert page.locator(".info .title").first.inner_text().startswith("S-Bus")
    version = page.locator('.opblock-get:has(.opblock-summary-path[data-path="/version"])')
    version.locator(".opblock-summary").click()
    version.locator(".try-out__btn").click()
    version.locator(".execute").click()
    status = version.locator(".live-responses-table tbody .response-col_status")
    status.wait_for()
    assert status.inner_text().strip() == "200"
    body = version.locator(".live-responses-table tbody .microlight").first.inner_text()
    assert '"name": "sbus"' in body
    tab.clean()
