"""The page of `anomap serve` in a real browser: Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from test_report_browser import ARGS, CHROMIUM
from test_serve import BAD, GOOD, TOKEN, Server, fit_demo_model

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium "
    "(apt-get install chromium chromium-driver; .ci/run installs it)",
)
pytest.importorskip("fastapi", reason="anomap serve needs the serve extra")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str, token: str | None = TOKEN):
    """A tab on `url`, given `token` when the page asks for one, that records console errors,
    page errors and requests to other hosts."""
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    tab.problems = []
    tab.on("console", lambda msg: tab.problems.append(msg.text) if msg.type == "error" else None)
    tab.on("pageerror", lambda err: tab.problems.append(str(err)))
    tab.on("request", lambda req: None if req.url.startswith((url, "data:", "blob:")) else tab.problems.append(req.url))
    tab.goto(url + "/")
    if token is not None:
        tab.fill("#token", token)
        tab.click("#auth button")
    return tab


def upload(tab, *paths) -> None:
    tab.wait_for_selector("#drop:not(.disabled)")
    tab.set_input_files("#files", [str(p) for p in paths])
    cards = tab.locator(".card").count()  # one per file, added at once
    tab.locator(".card[data-decision]").nth(cards - 1).wait_for()  # a locator: the page's policy forbids eval


def refused(tab, *statuses: int) -> list[str]:
    """The problems a tab recorded, less the browser's log lines of requests refused with `statuses`."""
    return [p for p in tab.problems if not any(f"status of {s} " in p for s in statuses)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return fit_demo_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-page")
    (folder / "token").write_text(TOKEN)
    srv = Server(model_file, folder / "log.txt", "--token-file", str(folder / "token"))
    try:
        yield srv
    finally:
        srv.stop()


def test_the_page_asks_for_the_token(browser, server):
    tab = open_page(browser, server.url, token=None)
    tab.wait_for_selector("#auth:not([hidden])")
    assert tab.locator("#drop.disabled").count() == 1
    tab.fill("#token", "wrong-token-0123456789")
    tab.click("#auth button")
    tab.locator("#auth-error", has_text="not accepted").wait_for()
    tab.fill("#token", TOKEN)
    tab.click("#auth button")
    tab.wait_for_selector("#drop:not(.disabled)")
    assert tab.locator("#auth").is_hidden() and "patchcore" in tab.inner_text("#model")
    assert refused(tab, 401) == []
    tab.close()


def test_a_defective_image_shows_anomalous_with_a_heatmap(browser, server, tmp_path):
    tab = open_page(browser, server.url)
    upload(tab, GOOD[0])
    upload(tab, BAD[0])
    cards = tab.locator(".card")
    newest = cards.nth(0)
    assert cards.count() == 2 and newest.locator(".name").inner_text() == BAD[0].name  # newest first
    assert newest.get_attribute("data-decision") == "anomalous"
    assert newest.locator(".decision").inner_text() == "anomalous"
    assert "threshold" in newest.locator(".numbers").inner_text()
    assert cards.nth(1).get_attribute("data-decision") == "normal"
    heat = newest.locator("img.heatmap")
    assert heat.evaluate("img => img.complete && img.naturalWidth") == Image.open(BAD[0]).width
    red = newest.locator("canvas.outline").evaluate(
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
        " for (let i = 0; i < d.length; i += 4) n += d[i] === 255 && d[i + 1] === 23 && d[i + 2] === 68; return n; }"
    )
    assert red > 0, "the mask outline is drawn"
    shot = tab.screenshot(full_page=True)
    (tmp_path / "page.png").write_bytes(shot)
    assert np.asarray(Image.open(io.BytesIO(shot)).convert("L"), np.float32).var() > 100
    assert refused(tab, 401) == []  # the page's first call, before it had the token
    tab.close()


def test_the_api_docs_work_offline(browser, server):
    tab = browser.new_page()
    outside = []
    tab.on("request", lambda req: None if req.url.startswith((server.url, "data:")) else outside.append(req.url))
    tab.goto(server.url + "/docs")
    tab.get_by_text("/v1/predict/batch").first.wait_for()
    assert outside == []
    tab.close()


def test_a_file_that_is_no_image_shows_the_error(browser, server, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    tab = open_page(browser, server.url)
    upload(tab, text)
    card = tab.locator(".card").nth(0)
    assert card.get_attribute("data-decision") == "error"
    assert "not a PNG, JPEG, BMP or TIFF image" in card.locator(".decision").inner_text()
    assert refused(tab, 401, 415) == []  # 401: the page's first call, before it had the token
    tab.close()
