"""The HTML report in a real browser: Debian's headless Chromium driven by Playwright, offline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomap import runs
from anomap.benchmark import summarize
from anomap.report import run_folder, write_benchmark_report, write_report
from test_report import EVIL, evil_category, synthetic_run

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

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium "
    "(apt-get install chromium chromium-driver; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny evaluated run whose data set has an image named like an HTML tag."""
    root = evil_category(tmp_path_factory.mktemp("data"))
    det = runs.fit_category(root, "evil", backbone="efficientnet_lite0", image_size=128, device="cpu")
    out = tmp_path_factory.mktemp("run")
    runs.evaluate_to_folder(det, root, "evil", out)
    return out


@pytest.fixture(scope="module")
def page(run_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.problems = []
        tab.on("console", lambda msg: tab.problems.append(msg.text) if msg.type == "error" else None)
        tab.on("pageerror", lambda err: tab.problems.append(str(err)))
        tab.on("dialog", lambda dialog: (tab.problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        tab.on("request", lambda req: None if req.url.startswith("file://") else tab.problems.append(req.url))
        tab.goto((run_dir / "report.html").as_uri())
        tab.wait_for_load_state("load")
        yield tab
        browser.close()


def visible(tab) -> list[dict]:
    return tab.eval_on_selector_all(
        "#gallery .tile",
        "els => els.filter(e => !e.hidden && e.offsetParent !== null)"
        ".map(e => ({truth: e.dataset.truth, outcome: e.dataset.outcome}))",
    )


def test_loads_offline_without_errors_and_with_every_picture(page):
    assert page.problems == []
    broken = page.eval_on_selector_all("img", "els => els.filter(e => !(e.complete && e.naturalWidth > 0)).length")
    assert broken == 0
    assert page.locator("img").count() >= 6 + 5


def test_one_tile_per_test_image_and_names_shown_as_text(page, run_dir):
    saved = json.loads((run_dir / "predictions.json").read_text())
    assert page.locator("#gallery .tile").count() == len(saved["images"]) == 6
    assert page.locator(".tile .name", has_text=EVIL).count() == 1
    assert page.locator(".tile .name img").count() == 0


def test_filters_hide_the_right_tiles(page, run_dir):
    saved = json.loads((run_dir / "predictions.json").read_text())["images"]
    fp = sum(r["label"] == 0 and r["decision"] == "anomalous" for r in saved)
    page.click("button[data-filter=normal]")
    shown = visible(page)
    assert len(shown) == 3 and {t["truth"] for t in shown} == {"normal"}
    assert page.inner_text("#shown") == "showing 3 of 6"
    page.click("button[data-filter=anomalous]")
    assert [t["truth"] for t in visible(page)] == ["anomalous"] * 3
    page.click("button[data-filter=fp]")
    assert len(visible(page)) == fp and all(t["outcome"] == "fp" for t in visible(page))
    page.click("button[data-filter=all]")
    assert len(visible(page)) == 6
    assert page.get_attribute("button[data-filter=all]", "aria-pressed") == "true"


def test_screenshot_is_not_blank(page):
    pixels = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L"), np.float32)
    assert pixels.var() > 100


def test_benchmark_page_links_to_a_working_run_report(tmp_path, page):
    row = {
        "category": EVIL,
        "method": "patchcore",
        "setting": "clean",
        "seed": 1,
        "image_auroc": 0.75,
        "pixel_auroc": None,
        "aupro": None,
        "f1": 0.8,
        "oracle_f1": 0.8,
        "threshold": 0.6,
        "fit_seconds": 1.0,
        "predict_ms_per_image": 2.0,
    }
    run = tmp_path / run_folder({**row, "category": "evil"})
    run.parent.mkdir(parents=True)
    write_report(synthetic_run(run))
    doc = {"config": {"categories": [EVIL]}, "rows": [{**row, "category": "evil"}, row], "summary": summarize([row])}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    page.problems.clear()
    page.goto(write_benchmark_report(tmp_path).as_uri())
    # results, runs and configuration tables; shown as text, never as an element
    assert page.locator("td", has_text=EVIL).count() == 3 and page.locator("td img").count() == 0
    assert page.locator("a.run").count() == 1
    page.click("a.run")
    page.wait_for_load_state("load")
    assert page.url == (run / "report.html").as_uri()
    assert page.locator("#gallery .tile").count() == 4 and page.problems == []
