"""The dashboard ``/ui`` in a real browser, against real ``sbus serve`` processes over
SQLite: an open bus with the admin routes on, one with them off, and one in token mode.
Each test uses keys and agents of its own, so they share the buses.

Every page is loaded with requests to other hosts refused (``Tab``); a test that expects
no refused request from the bus asserts ``tab.clean()`` (no console error: a browser logs
every 4xx it receives as one)."""

from __future__ import annotations

import httpx
from playwright.sync_api import Locator, Page, expect

from sbus.config import Settings
from sbus.core.rights import ALL_RIGHTS, Right, Scope
from sbus.security.tokens import Issuer
from tests.browser.conftest import SECRET, Buses, Tab
from tests.concurrency.conftest import Server

JSON = {"Content-Type": "application/json"}


def client(server: Server, token: str | None = None) -> httpx.Client:
    headers = dict(JSON)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=server.base_url, headers=headers, trust_env=False)


def ok(response: httpx.Response, status: int = 200) -> dict[str, object]:
    assert response.status_code == status, response.text
    body: dict[str, object] = response.json()
    return body


def create(c: httpx.Client, key: str, content: str) -> None:
    ok(c.post("/shard", json={"key": key, "content": content}), 201)


def commit(c: httpx.Client, key: str, version: int, content: str, agent: str) -> None:
    body = {"key": key, "expected_version": version, "delta": content, "agent_id": agent}
    ok(c.post("/commit", json=body))


def read(c: httpx.Client, key: str, agent: str) -> None:
    ok(c.get(f"/shard/{key}", params={"agent_id": agent}))


def mint(agent: str, *scopes: Scope) -> str:
    issuer = Issuer.from_settings(Settings(auth="token", secret=SECRET))
    value, _ = issuer.issue(agent, scopes, 600)
    return value


def open_ui(page: Page, server: Server) -> None:
    page.goto(f"{server.base_url}/ui")
    # The module has run once the status pill has left its first state.
    expect(page.locator("#stream-status")).not_to_have_attribute("data-state", "idle")


def cells(row: Locator) -> list[str]:
    return row.locator("td").all_inner_texts()


def show_history(page: Page, key: str) -> list[str]:
    page.fill("#history-key", key)
    page.click("#history-form button[type=submit]")
    expect(page.locator("#diff-title")).to_contain_text(key)
    return page.locator("#diff span").all_inner_texts()


def test_the_dashboard_loads_clean_and_says_the_stream_is_unavailable(
    tab: Tab, buses: Buses
) -> None:
    """Until the bus serves GET /watch the page says so, and asks for nothing it lacks."""
    with client(buses.open) as c:
        create(c, "load/a", "x")
    open_ui(tab.page, buses.open)
    expect(tab.page.locator("#stream-status")).to_have_text("stream unavailable")
    expect(tab.page.locator("#stream-note")).to_contain_text("Change stream unavailable")
    expect(tab.page.locator("#known-keys option[value='load/a']")).to_have_count(1)
    expect(tab.page.locator("#readsets-note")).to_be_hidden()
    tab.clean()


def test_history_shows_the_diff_between_versions(tab: Tab, buses: Buses) -> None:
    with client(buses.open) as c:
        create(c, "hist/doc", "line one\nline two")
        commit(c, "hist/doc", 0, "line one\nline 2\nline three", "ann")
        commit(c, "hist/doc", 1, '{"b": 1, "a": [1, 2]}', "ben")
    page = tab.page
    open_ui(page, buses.open)
    assert show_history(page, "hist/doc") == [
        "- line one",
        "- line 2",
        "- line three",
        "+ {",
        '+   "b": 1,',
        '+   "a": [',
        "+     1,",
        "+     2",
        "+   ]",
        "+ }",
    ]
    versions = page.locator("#versions button")
    expect(versions).to_have_count(3)
    expect(versions.nth(0)).to_contain_text("v2  ben")
    versions.nth(1).click()
    expect(page.locator("#diff-title")).to_have_text("hist/doc: v0 → v1")
    assert page.locator("#diff span").all_inner_texts() == [
        "  line one",
        "- line two",
        "+ line 2",
        "+ line three",
    ]
    versions.nth(2).click()
    expect(page.locator("#diff-title")).to_have_text("hist/doc: v0 (the oldest version retained)")
    tab.clean()


def test_read_sets_mark_stale_entries(tab: Tab, buses: Buses) -> None:
    """alice read both keys at version 0; bob then committed one of them."""
    with client(buses.open) as c:
        create(c, "rs/plan", "p0")
        create(c, "rs/notes", "n0")
        read(c, "rs/plan", "alice")
        read(c, "rs/notes", "alice")
        commit(c, "rs/plan", 0, "p1", "bob")
    page = tab.page
    open_ui(page, buses.open)
    plan = page.locator("#readsets tr[data-key='rs/plan']", has_text="alice")
    notes = page.locator("#readsets tr[data-key='rs/notes']", has_text="alice")
    expect(plan).to_have_class("stale")
    assert plan.locator("td").all_inner_texts() == [
        "alice",
        "(default)",
        "rs/plan",
        "0",
        "1",
        "stale",
    ]
    expect(notes).to_have_class("fresh")
    assert cells(notes)[3:] == ["0", "0", "current"]
    # A commit sets the committer's entry to the version it wrote (protocol.md 4).
    bob = page.locator("#readsets tr[data-key='rs/plan']", has_text="bob")
    assert bob.locator("td").all_inner_texts() == [
        "bob",
        "(default)",
        "rs/plan",
        "1",
        "1",
        "current",
    ]
    tab.clean()


def test_without_admin_the_admin_panels_say_so(tab: Tab, buses: Buses) -> None:
    page = tab.page
    open_ui(page, buses.closed)
    expect(page.locator("#readsets-note")).to_contain_text("AdminDisabled")
    expect(page.locator("#readsets-note")).to_contain_text("SBUS_ADMIN_ENABLED=1")
    expect(page.locator("#readsets tbody tr")).to_have_count(0)
    tab.clean()


def test_token_mode_asks_for_a_token_and_shows_only_what_it_may_read(
    tab: Tab, buses: Buses
) -> None:
    root = mint("root", Scope("**", ALL_RIGHTS))
    with client(buses.token, root) as c:
        create(c, "pub/a", "a0")
        commit(c, "pub/a", 0, "a1", "root")
        create(c, "secret/b", "b0")
    page = tab.page
    open_ui(page, buses.token)
    expect(page.locator("#token-panel")).to_be_visible()
    expect(page.locator("#panels")).to_be_hidden()
    expect(page.locator("#prefix-form")).to_be_hidden()

    page.fill("#token", "not-a-token")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-error")).to_contain_text("Unauthorized")
    expect(page.locator("#panels")).to_be_hidden()

    reader = mint("carol", Scope.of("pub/**", Right.READ.value))
    page.fill("#token", reader)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#panels")).to_be_visible()
    expect(page.locator("#who")).to_have_text("agent carol")
    # Only the readable key is listed; the admin panel names the missing right.
    expect(page.locator("#known-keys option")).to_have_count(1)
    expect(page.locator("#known-keys option")).to_have_attribute("value", "pub/a")
    expect(page.locator("#readsets-note")).to_contain_text("CapabilityDenied")
    assert show_history(page, "pub/a") == ["- a0", "+ a1"]
    show_history(page, "secret/b")
    expect(page.locator("#history-note")).to_contain_text("CapabilityDenied")
    expect(page.locator("#diff span")).to_have_count(0)

    # The token stays for the tab (sessionStorage) and is forgotten on request.
    page.reload()
    expect(page.locator("#who")).to_have_text("agent carol")
    page.click("#sign-out")
    expect(page.locator("#token-panel")).to_be_visible()
    assert tab.foreign == []
