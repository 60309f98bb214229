"""The review app in a real browser: headless Chromium (Debian's package) driven by Playwright.

A reviewer works with the keyboard only: pick, reject, rate and note; the page is reloaded and the
decisions are still there, in the ledger and in `export --picked`; a re-roll from the page is submitted
by the next run, exactly once. The page may reach nothing but the app itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import threading
from pathlib import Path

import pytest
from helpers import ledger_rows
from review_batch import make_reviewed_batch, run_counting
from test_report_browser import CHROMIUM, CHROMIUM_ARGS, METADATA_TIMEOUT_MS, WAIT_FOR_VISIBLE_METADATA

from batchrun.cli import main
from batchrun.manifest import load_manifest
from batchrun.review_app import ReviewServer

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


class ServedInThread:
    """A ReviewServer on its own event loop in a thread, so the synchronous Playwright API can drive it."""

    def __init__(self, manifest: Path):
        self.manifest = manifest
        self.loop = asyncio.new_event_loop()
        self.url = ""

    def __enter__(self):
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            server = ReviewServer(self.manifest.parent / "out", load_manifest(self.manifest), refresh_seconds=0.3)
            self.loop.run_until_complete(server.__aenter__())
            self.url = server.url
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(server.__aexit__(None, None, None))
            self.loop.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(20), "the review server did not start"
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(20)


def _run_in_thread(manifest: Path) -> int:
    """`run_counting` beside Playwright's own event loop (a run needs one of its own)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run_counting, manifest).result(timeout=60)


def _export(output_dir: Path, *flags: str) -> list[dict]:
    out = io.StringIO()
    assert main(["export", str(output_dir), *flags], stdout=out, stderr=io.StringIO()) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_review_with_the_keyboard_in_chromium(tmp_path: Path):
    manifest = make_reviewed_batch(tmp_path)
    output_dir = tmp_path / "out"
    outside: list[str] = []
    problems: list[str] = []
    with ServedInThread(manifest) as served, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.route(lambda url: not url.startswith(served.url.split("/?")[0]),
                   lambda route, request: (outside.append(request.url), route.abort()))
        page.goto(served.url)
        takes = page.locator("article.take")
        takes.first.wait_for()
        assert takes.count() == 5
        # Grouped by input, takes side by side, media first: the first video is on the first screen.
        groups = page.eval_on_selector_all("section.group", "s => s.map(g => [g.dataset.group, "
                                           "Array.from(g.querySelectorAll('article.take')).map(t => t.dataset.id)])")
        assert groups == [["harbor", ["harbor", "harbor-t2"]], ["cliff", ["cliff", "cliff-t2"]], ["storm", ["storm"]]]
        loaded = page.evaluate(WAIT_FOR_VISIBLE_METADATA, METADATA_TIMEOUT_MS)
        assert len(loaded) == 4 and all(v["duration"] > 0 for v in loaded), loaded
        # The local start image is served from the output dir's copy and really loads.
        width = page.eval_on_selector("section.group[data-group=harbor] img", "img => img.complete && img.naturalWidth")
        assert width == 640
        # Poster frames (from the real sample video) load; the sample is 2 s where 5 s was asked: flagged.
        posters = page.eval_on_selector_all("video[poster]", "vs => vs.map(v => v.getAttribute('poster'))")
        assert len(posters) == 4
        sizes = page.evaluate("""async (urls) => Promise.all(urls.map((u) => new Promise((resolve) => {
            const image = new Image(); image.onload = () => resolve(image.naturalWidth);
            image.onerror = () => resolve(0); image.src = u; })))""", posters)
        assert sizes == [160] * 4, sizes
        assert "shorter than asked: 2 s, asked 5 s" in page.locator("article.take[data-id=harbor] .flag").inner_text()
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)

        # Keyboard only: the first take has focus. Reject it, move right, pick and rate the second.
        assert page.evaluate("document.activeElement.dataset.id") == "harbor"
        page.keyboard.press("x")
        page.wait_for_selector("article.take[data-id=harbor][data-decision=rejected]")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("p")
        page.wait_for_selector("article.take[data-id=harbor-t2][data-decision=picked]")
        page.keyboard.press("4")
        page.wait_for_selector("article.take[data-id=harbor-t2][data-rating='4']")
        page.keyboard.press("n")
        page.keyboard.type("the boats, not the gulls")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelector('#status').textContent === 'saved harbor-t2'")
        # Down to the next input, same column: pick cliff-t2 with a click.
        page.keyboard.press("ArrowDown")
        assert page.evaluate("document.activeElement.dataset.id") == "cliff-t2"
        page.click("article.take[data-id=cliff-t2] button.pick")
        page.wait_for_selector("article.take[data-id=cliff-t2][data-decision=picked]")

        # Re-roll cliff from the page: an "asked" take appears next to the others.
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("r")
        page.wait_for_selector("article.take[data-id=cliff-t3][data-state=asked]")
        # A failed job has nothing to judge: the keys say so and store nothing.
        page.locator("article.take[data-id=storm]").focus()
        page.keyboard.press("p")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('no video to judge')")

        # Reload: every decision is still there (read back from the ledger).
        page.reload()
        page.wait_for_selector("article.take[data-id=harbor-t2][data-decision=picked][data-rating='4']")
        assert page.locator("article.take[data-id=harbor][data-decision=rejected]").count() == 1
        assert page.locator("article.take[data-id=harbor-t2] textarea").input_value() == "the boats, not the gulls"
        page.screenshot(path=str(tmp_path / "review-decided.png"), full_page=True)
        # Show only the picks, then only what is left to review.
        page.click("button[data-show=picked]")
        assert page.eval_on_selector_all("article.take:not([hidden])", "cs => cs.map(c => c.dataset.id)") == [
            "harbor-t2", "cliff-t2"]
        page.click("button[data-show=review]")
        assert page.eval_on_selector_all("article.take:not([hidden])", "cs => cs.map(c => c.dataset.id)") == ["cliff"]
        page.click("button[data-show=all]")

        # The next run submits the one take asked for from the page, and nothing after that; the open
        # page shows the new take by itself, next to the earlier ones.
        assert _run_in_thread(manifest) == 1
        page.wait_for_selector("section.group[data-group=cliff] article.take[data-id=cliff-t3][data-state=done] video")
        assert _run_in_thread(manifest) == 0
        browser.close()
    assert not problems, problems
    assert not outside, outside

    rows = ledger_rows(output_dir)
    assert (rows["harbor-t2"]["decision"], rows["harbor-t2"]["rating"], rows["harbor-t2"]["note"]) == (
        "picked", 4, "the boats, not the gulls")
    assert rows["harbor"]["decision"] == "rejected" and rows["storm"]["decision"] is None
    assert [r["id"] for r in _export(output_dir, "--picked")] == ["harbor-t2", "cliff-t2"]
    assert ledger_rows(output_dir)["cliff-t3"]["state"] == "done"
    print(f"screenshots in {tmp_path}")
