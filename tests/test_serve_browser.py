"""The web page in headless Chromium against a live server: search, history, cards."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mmnewsrec.serve import Recommender, create_app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.slow,  # a browser and a server: about 10 s
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)",
    ),
]
pytest.importorskip("playwright", reason="the Python package playwright is not installed")


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def rec(tiny_run) -> Recommender:
    return Recommender.from_run(tiny_run)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def open_tab(browser, url: str):
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    tab.set_default_timeout(15_000)
    tab.goto(url)
    return tab


@pytest.fixture(scope="module")
def page(rec, browser):
    with live_server(create_app(rec)) as url:
        tab = open_tab(browser, url)
        yield tab
        tab.close()


def test_page_recommends_cards_with_images(page, rec, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#health")).to_contain_text(f"{rec.store.num_news} news")
    page.fill("#search", "golf")
    first = page.locator("#search-results li").first
    expect(first).to_contain_text("olf")
    first.click()
    other = rec.store.news_ids[2]
    page.fill("#ids", f"{other}, N-missing")
    page.click("#add-ids")
    expect(page.locator("#history li")).to_have_count(3)
    expect(page.locator("#history li").nth(1)).to_contain_text(rec.summary(2).title)
    expect(page.locator("#history li.unknown")).to_have_count(1)
    page.fill("#k", "6")
    page.click("#submit")

    cards = page.locator(".card")
    expect(cards).to_have_count(6)
    expect(page.locator("#message")).to_contain_text("N-missing")
    expect(page.locator("#history li.unknown")).to_have_count(1)
    expected = rec.recommend([first.get_attribute("title").split(" ")[0], other], k=6)
    shown = [cards.nth(i).get_attribute("data-news-id") for i in range(6)]
    assert shown == [item.news_id for item in expected.items]
    for i, item in enumerate(expected.items):
        card = cards.nth(i)
        expect(card.locator(".badge")).to_contain_text("rerank")
        expect(card.locator(".title")).to_have_text(item.title)
        assert card.locator("img").count() == int(item.has_image)
    page.wait_for_function(
        "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    page.click("#clear")
    page.click("#submit")
    expect(page.locator(".card .badge").first).to_contain_text("popularity")
    expect(page.locator("#history-empty")).to_be_visible()


@pytest.fixture(scope="module")
def live_page(rec, browser, tmp_path_factory):
    """The page over a server that keeps users and logs events."""
    from mmnewsrec.serve.live import open_live

    served, live = open_live(rec, tmp_path_factory.mktemp("state"))
    with live_server(create_app(served, live=live)) as url:
        tab = open_tab(browser, url)
        yield tab, live
        tab.close()
    live.state.close()


def test_a_users_click_moves_the_news_into_the_history_and_out_of_the_list(live_page, rec):
    from playwright.sync_api import expect

    page, live = live_page
    page.fill("#user", "U-browser")
    page.fill("#k", "8")
    page.click("#sign-in")
    expect(page.locator("#user-status")).to_contain_text("a new user")
    cards = page.locator(".card")
    expect(cards).to_have_count(8)
    expect(page.locator("#message")).to_contain_text("No clicks yet")
    shown = [cards.nth(i).get_attribute("data-news-id") for i in range(8)]
    clicked = shown[2]
    cards.nth(2).click()

    expect(page.locator("#history li")).to_have_count(1)
    expect(page.locator("#history li").first).to_contain_text(
        rec.summary(rec.index_of(clicked)).title
    )
    expect(page.locator("#user-status")).to_contain_text("U-browser: 1 clicks")
    expect(page.locator(f'.card[data-news-id="{clicked}"]')).to_have_count(0)
    expect(cards.first.locator(".badge")).to_contain_text("rerank")
    assert live.users.history("U-browser").tolist() == [rec.index_of(clicked)]
    logged = list(live.state.impressions())
    assert [(e.user_id, list(e.shown), list(e.clicked)) for e in logged] == [
        ("U-browser", shown, [clicked])
    ]
