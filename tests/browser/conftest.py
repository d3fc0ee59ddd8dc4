"""A real headless Chromium for the browser tests: Debian's ``chromium`` package (which
``scripts/with-services.sh`` installs when it is missing) driven by Playwright through
``executable_path``, never a browser Playwright downloads. The pinned Playwright's own
Chromium is not newer than Debian's (pyproject.toml).

One browser serves each module; each test gets a fresh context whose requests to any
host but loopback are refused and recorded (:class:`Tab`), so a page that would need the
network fails its test instead of passing on a machine that has one. Console errors and
uncaught exceptions are recorded too.

The pages are served by real ``sbus serve`` processes (``tests.concurrency.conftest``),
shared by every browser test (:class:`Buses`).
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, ViewportSize, sync_playwright

from tests.concurrency.conftest import Server, ServerGroup, sqlite_url

VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
# How long a locator waits for what a test expects (Playwright's default is 30 s).
TIMEOUT_MS = 10_000


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "Debian's chromium is not installed (scripts/with-services.sh installs it; "
            "or: apt-get install chromium)",
            pytrace=False,
        )
    return path


def loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Tab:
    """A page in its own context, and what it did that a test must see."""

    page: Page
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions
    foreign: list[str] = field(default_factory=list)  # refused requests to other hosts

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} at {message.location}")

    def route(self, route: Route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or loopback(url):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort("blockedbyclient")

    def clean(self) -> None:
        """Nothing went wrong and nothing left the machine."""
        assert self.errors == [], self.errors
        assert self.foreign == [], self.foreign


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Module-scoped: Playwright's sync API keeps an event loop running in this thread
    until it stops, which would break every asyncio test that pytest runs after it."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path())
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    watched = Tab(page)
    context.route("**/*", watched.route)
    page.on("console", watched.console)
    page.on("pageerror", lambda exc: watched.errors.append(f"uncaught: {exc}"))
    try:
        yield watched
    finally:
        context.close()


SECRET = "browser-test-secret-of-32-bytes!"


@dataclass(frozen=True)
class Buses:
    open: Server  # open mode, admin on
    closed: Server  # open mode, admin off
    token: Server  # token mode, with SECRET


@pytest.fixture(scope="session")
def buses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buses]:
    """Three ``sbus serve`` processes over SQLite, started at once and shared by the
    browser tests, which use keys and agents of their own."""
    root: Path = tmp_path_factory.mktemp("browser-buses")
    group = ServerGroup(root / "logs")
    envs = [
        {},
        {"SBUS_ADMIN_ENABLED": "0"},
        {"SBUS_AUTH": "token", "SBUS_SECRET": SECRET, "SBUS_ADMIN_ENABLED": "0"},
    ]
    try:
        with ThreadPoolExecutor(len(envs)) as pool:
            started = [
                pool.submit(group.start, sqlite_url(root, f"bus-{i}.db"), env)
                for i, env in enumerate(envs)
            ]
            servers = [future.result() for future in started]
        yield Buses(*servers)
    finally:
        group.fail_on(group.stop_all())
