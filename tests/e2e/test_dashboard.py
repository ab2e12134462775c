"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by
Playwright) against a real poise (two workers, h11 backends, an admin token): the page
asks for the token and then lists every backend; its numbers move under traffic; its
drain and enable buttons drain and enable (as the admin API then says).

Every wait polls (Playwright's ``expect`` or :func:`wait_for`) with a deadline; no
sleep is an assertion.  Skipped, saying why, only when there is no Chromium or no
Playwright (``make test`` installs both: .ci/apt-deps and the ``dev`` extra).
"""

from __future__ import annotations

import os
import re

import pytest

from tests.support.loadgen import LoadGen
from tests.support.waiting import wait_for

CHROMIUM = "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian package chromium: .ci/apt-deps)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (the dev extra)")
expect = sync_api.expect

TOKEN = "dash-e2e-token"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def backends(module_stack):
    return module_stack.backend("b1"), module_stack.backend("b2")


@pytest.fixture(scope="module")
def px(module_stack, backends):
    return module_stack.poise(list(backends), workers=2, admin={"token": TOKEN})


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # (never a browser of Playwright's own: the system's Chromium)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, px):
    """A fresh tab (its own session storage) on the dashboard; at the end, the page
    must have logged no script error and no refused resource but the expected 401s."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" and "401" not in m.text else None)
    host, port = px.admin.addr
    page.goto(f"http://{host}:{port}/")
    yield page
    context.close()
    assert problems == []


def log_in(page, token: str = TOKEN) -> None:
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Show the dashboard").click()


def row(page, address: str):
    return page.locator(f'#clusters tr[data-key="{address}"]')


def state(px, address: str) -> str:
    r = px.admin.get("/clusters/app")
    assert r.status == 200, r
    return next(b["state"] for b in r.json()["backends"] if b["address"] == address)


def test_the_page_asks_for_the_token_then_shows_every_backend(page, px, backends):
    expect(page.get_by_label("Token")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#board")).to_be_hidden()
    log_in(page, "not-the-token")
    expect(page.get_by_role("alert")).to_have_text("That token was refused.",
                                                   timeout=WAIT_MS)
    log_in(page)
    expect(page.locator("#board")).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_label("Token")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("live", timeout=WAIT_MS)
    for b in backends:
        r = row(page, b.address)
        expect(r).to_have_count(1, timeout=WAIT_MS)
        expect(r.locator(".badge")).to_have_text("up")
        expect(r.get_by_role("button", name=f"Drain {b.address} in app")).to_be_enabled()
    expect(page.locator("#clusters h2")).to_have_text(["app"])
    listener = page.locator("#listeners tbody tr")
    expect(listener).to_have_count(1)
    expect(listener.locator("th")).to_have_text("web")
    expect(listener.locator("td").first).to_have_text(f"127.0.0.1:{px.port} (http)")
    # The token stays in this tab: a reload shows the data without asking again.
    page.reload()
    expect(row(page, backends[0].address)).to_have_count(1, timeout=WAIT_MS)
    expect(page.get_by_label("Token")).to_be_hidden()


def _number(text: str) -> float:
    match = re.search(r"[\d,]+(?:\.\d+)?", text)
    return float(match.group().replace(",", "")) if match else 0.0


def test_numbers_move_under_traffic(page, px, backends):
    log_in(page)
    b1 = row(page, backends[0].address)
    expect(b1).to_have_count(1, timeout=WAIT_MS)
    requests = b1.locator("td.num").nth(2)          # weight, in flight, requests, errors
    rate = b1.locator("td.chart .now").first

    def seen() -> float:
        return _number(requests.inner_text())

    before = seen()
    with LoadGen(px.addr, connections=2, pause=0.005):
        wait_for(lambda: seen() > before, 15, lambda: f"requests of b1 past {before} "
                                                      f"(shows {requests.inner_text()})")
        middle = seen()
        wait_for(lambda: seen() > middle, 15, "the requests of b1 to move again")
        # the rate comes from the history: it shows traffic, and its chart has a line
        wait_for(lambda: _number(rate.inner_text()) > 0, 15,
                 lambda: f"a request rate above 0 (shows {rate.inner_text()!r})")
        line = b1.locator("path.line.rps")
        expect(line).to_have_count(1, timeout=WAIT_MS)
        first = line.get_attribute("d")
        wait_for(lambda: line.get_attribute("d") != first, 15, "the rate chart to move")
        latency = b1.locator("td.chart .now").nth(2)
        wait_for(lambda: "ms" in latency.inner_text(), 15,
                 lambda: f"a latency (shows {latency.inner_text()!r})")
        listener_rate = page.locator("#listeners tbody tr td.chart .now").first
        wait_for(lambda: _number(listener_rate.inner_text()) > 0, 15,
                 "a request rate on the listener")

    def counted() -> int:
        return next(b["requests"] for b in px.admin.get("/clusters/app").json()["backends"]
                    if b["address"] == backends[0].address)
    # Once the last counts are in, the page and the admin API agree.
    wait_for(lambda: seen() == counted(), 15,
             lambda: f"the page ({seen()}) to show the admin API's count ({counted()})")


def test_drain_and_enable_buttons(page, px, backends):
    log_in(page)
    address = backends[1].address
    r = row(page, address)
    expect(r).to_have_count(1, timeout=WAIT_MS)
    assert state(px, address) == "up"
    r.get_by_role("button", name=f"Drain {address} in app").click()
    wait_for(lambda: state(px, address) == "drained", 15, "the backend to be drained")
    expect(r.locator(".badge")).to_have_text("drained", timeout=WAIT_MS)
    expect(r.locator("td.reason")).to_have_text("drained by an operator")
    enable = r.get_by_role("button", name=f"Enable {address} in app")
    expect(enable).to_be_visible(timeout=WAIT_MS)
    enable.click()
    wait_for(lambda: state(px, address) == "up", 15, "the backend to be enabled")
    expect(r.locator(".badge")).to_have_text("up", timeout=WAIT_MS)
    expect(r.get_by_role("button", name=f"Drain {address} in app")).to_be_visible()
