"""The dashboard ``/ui`` in a real browser, against real ``sbus serve`` processes over
SQLite: an open bus with the admin routes on, one with them off, and one in token mode.
Each test uses keys and agents of its own, so they share the buses.

Every page is loaded with requests to other hosts refused (``Tab``); a test that expects
no refused request from the bus asserts ``tab.clean()`` (no console error: a browser logs
every 4xx it receives as one)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from playwright.sync_api import Locator, Page, expect

from sbus.config import Settings
from sbus.core.rights import ALL_RIGHTS, Right, Scope
from sbus.security.tokens import Issuer
from tests.browser.conftest import SECRET, Buses, Tab
from tests.concurrency.conftest import Server

JSON = {"Content-Type": "application/json"}
# SBUS_SCREENSHOT_DIR=docs/img refreshes the screenshots docs/dashboard.md shows.
SCREENSHOTS = os.environ.get("SBUS_SCREENSHOT_DIR")


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


def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=Path(SCREENSHOTS) / name, full_page=True)


def cells(row: Locator) -> list[str]:
    return row.locator("td").all_inner_texts()


def show_history(page: Page, key: str) -> list[str]:
    page.fill("#history-key", key)
    page.click("#history-form button[type=submit]")
    expect(page.locator("#diff-title")).to_contain_text(key)
    return page.locator("#diff span").all_inner_texts()


def test_the_dashboard_loads_clean_and_goes_live(tab: Tab, buses: Buses) -> None:
    """Every key is watched (no prefix), with conflicts: admin is on."""
    with client(buses.open) as c:
        create(c, "load/a", "x")
    open_ui(tab.page, buses.open)
    status = tab.page.locator("#stream-status")
    expect(status).to_have_attribute("data-state", "live")
    expect(status).to_have_text("live")
    expect(tab.page.locator("#stream-note")).to_be_hidden()
    expect(tab.page.locator("#prefix-form")).to_be_visible()
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
    expect(page.locator("#stream-status")).to_have_attribute("data-state", "live")
    expect(page.locator("#stream-note")).to_contain_text("AdminDisabled")
    expect(page.locator("#stream-note")).to_contain_text("conflicts are not shown")
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


def commit_refused(c: httpx.Client, key: str, version: int, agent: str, read: str) -> str:
    """A commit of ``key`` naming ``read`` at version 0 in its read set, which has moved."""
    body = {
        "key": key,
        "expected_version": version,
        "delta": "late",
        "agent_id": agent,
        "read_set": [{"key": read, "version_at_read": 0}],
    }
    r = c.post("/commit", json=body)
    assert r.status_code == 409, r.text
    error: str = r.json()["error"]
    return error


def watching(page: Page, server: Server, prefix: str) -> None:
    page.goto(f"{server.base_url}/ui?prefix={prefix}")
    expect(page.locator("#stream-status")).to_have_attribute("data-state", "live")


def test_commits_and_conflicts_appear_live(tab: Tab, buses: Buses) -> None:
    """lou commits a key lia has read; lia's commit over her stale read is refused.
    The commit and the conflict each show within 2 seconds of the bus answering, in
    the feed and in the key and agent tables, and lia's read set turns stale."""
    with client(buses.open) as c:
        create(c, "live/plan", '{"goal": "ship", "steps": ["build"]}')
        create(c, "live/code", "print(1)")
        read(c, "live/plan", "lia")
        read(c, "live/code", "lia")
    page = tab.page
    watching(page, buses.open, "live/")
    lia_plan = page.locator("#readsets tr[data-key='live/plan']", has_text="lia")
    expect(lia_plan).to_have_class("fresh")

    with client(buses.open) as c:
        commit(c, "live/plan", 0, '{"goal": "ship", "steps": ["build", "test"]}', "lou")
    change = page.locator("#feed tr.change[data-key='live/plan']")
    expect(change).to_have_count(1, timeout=2000)
    assert cells(change)[1:5] == ["commit", "live/plan", "1", "lou"]
    expect(lia_plan).to_have_class("stale")

    with client(buses.open) as c:
        assert commit_refused(c, "live/code", 0, "lia", "live/plan") == "CrossShardStale"
    conflict = page.locator("#feed tr.conflict[data-key='live/code']")
    expect(conflict).to_have_count(1, timeout=2000)
    assert cells(conflict)[1:] == [
        "conflict",
        "live/code",
        "",
        "lia",
        "CrossShardStale (stale: live/plan)",
    ]
    expect(page.locator("#keys tr", has_text="live/code")).to_have_class("has-conflicts")
    assert cells(page.locator("#keys tr", has_text="live/plan"))[2:] == ["1", "0", "1", "lou"]
    assert cells(page.locator("#agents tr", has_text="lia")) == ["lia", "0", "1", "live/code"]

    change.locator("button.key").click()
    expect(page.locator("#diff-title")).to_have_text("live/plan: v0 → v1")
    expect(page.locator("#diff .add")).to_have_text(['+     "build",', '+     "test"'])
    screenshot(page, "dashboard.png")
    tab.clean()


def test_token_mode_streams_only_readable_keys(tab: Tab, buses: Buses) -> None:
    root = mint("root", Scope("**", ALL_RIGHTS))
    with client(buses.token, root) as c:
        create(c, "t/pub/a", "a0")
        create(c, "t/secret/b", "b0")
    page = tab.page
    page.goto(f"{buses.token.base_url}/ui?prefix=t/")
    page.fill("#token", mint("dave", Scope.of("t/pub/**", Right.READ.value)))
    page.click("#token-form button[type=submit]")
    expect(page.locator("#stream-status")).to_have_attribute("data-state", "live")
    # Committed in this order: had the secret one been sent, it would be listed first.
    with client(buses.token, root) as c:
        commit(c, "t/secret/b", 0, "b1", "root")
        commit(c, "t/pub/a", 0, "a1", "root")
    expect(page.locator("#feed tr.change[data-key='t/pub/a']")).to_have_count(1)
    expect(page.locator("#feed tr.change")).to_have_count(1)
    tab.clean()
