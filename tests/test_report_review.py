"""report.html after a reviewed batch: what a run's own report says about that run, the reviewer's
decisions shown read-only, jobs no longer in the manifest marked, cancelled jobs apart from failures,
and the local start image loading from the output dir in Chromium."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import cli
from review_batch import MANIFEST, make_reviewed_batch
from test_report import Page, row
from test_report_browser import CHROMIUM, CHROMIUM_ARGS

from batchrun.ledger import Ledger
from batchrun.report import render


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    return make_reviewed_batch(tmp_path_factory.mktemp("reviewed"))


def test_the_report_a_run_writes_shows_that_run_finished(batch):
    text = (batch.parent / "out" / "report.html").read_text(encoding="utf-8")
    runs = text[text.index('<details class="runs">'):]
    assert "still running or interrupted" not in runs
    assert "<td>1</td>" in runs  # run 1 ended with exit code 1 (storm failed)
    # Media first: the cards come before the summary and the timeline.
    assert text.index('id="cards"') < text.index("<h2>Summary</h2>") < text.index("<h2>Timeline</h2>")


async def test_decisions_takes_and_jobs_gone_from_the_manifest_show(batch):
    out = batch.parent / "out"
    ledger = Ledger.open(out)
    try:
        ledger.set_decision("harbor-t2", decision="picked", rating=4, note="keep <this> one")
        ledger.set_decision("cliff", decision="rejected")
    finally:
        ledger.close()
    # storm is dropped from the manifest: the report written with the manifest marks it.
    edited = batch.parent / "edited.yaml"
    edited.write_text(MANIFEST.split("  - {id: storm")[0], encoding="utf-8")
    code, _, err = await cli(["report", str(edited)])
    assert code == 0, err
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    cards = {c["data-id"]: c for c in page.find("article")}
    assert cards["harbor-t2"]["data-decision"] == "picked" and cards["cliff"]["data-decision"] == "rejected"
    assert cards["storm"]["data-gone"] == "true" and cards["harbor"]["data-gone"] == "false"
    assert "take 2" in page.card_text["harbor-t2"] and "★★★★" in page.card_text["harbor-t2"]
    assert "keep <this> one" in page.card_text["harbor-t2"]  # escaped text, shown as written
    assert "not in the manifest" in page.card_text["storm"]


def test_cancelled_jobs_are_not_failures(tmp_path):
    rows = [row("a", "done", (0, 1, 5, 6)), row("b", "failed", (0, 1, 5, None)),
            row("c", "cancelled", (0, None, None, None)), row("d", "cancelled", (0, None, None, None))]
    text = render(tmp_path, rows, [], datetime.now(timezone.utc))
    assert "50%" in text and "1 of 2 done or failed jobs done (cancelled jobs not counted)" in text
    assert "1 done · 1 failed · 2 cancelled" in text


def test_local_start_image_and_sort_by_id_in_chromium(batch, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    report = batch.parent / "out" / "report.html"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.route(lambda url: not url.startswith("file:"), lambda route, request: route.abort())
        page.goto(report.as_uri())
        image = page.locator("article#card-harbor .start img")
        image.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete", arg=image.element_handle())
        assert image.evaluate("img => img.naturalWidth") == 640
        page.select_option("#sort", "id")
        ids = page.eval_on_selector_all("article.card", "cards => cards.map(c => c.dataset.id)")
        assert ids == sorted(ids) and len(ids) == 5
        page.screenshot(path=str(tmp_path / "report-reviewed.png"), full_page=True)
        browser.close()
