"""report.html in a real browser: headless Chromium (Debian's package) driven by Playwright, from file://.

Skipped, saying what is missing, where Chromium or Playwright is not installed. The page is opened
with the network cut off except for the start images, which are answered with a local PNG, as a
reviewer offline would see them fail politely rather than the test depending on example.com.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from test_report import make_batch

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PIXEL_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
                             "rkJggg==")
METADATA_TIMEOUT_MS = 15_000

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                               "(pip install playwright; its own browser download is not needed)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

# Resolves once every video on screen has its metadata, or rejects naming the first one that failed.
WAIT_FOR_VISIBLE_METADATA = """
async (timeout) => {
  const onScreen = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.bottom > 0 && r.top < window.innerHeight;
  };
  const videos = Array.from(document.querySelectorAll("video")).filter(onScreen);
  await Promise.all(videos.map((v) => v.readyState >= 1 ? null : new Promise((resolve, reject) => {
    v.addEventListener("loadedmetadata", resolve, { once: true });
    v.addEventListener("error", () => reject(new Error("could not load " + v.currentSrc)), { once: true });
    setTimeout(() => reject(new Error("no metadata after " + timeout + " ms: " + v.currentSrc)), timeout);
  })));
  return videos.map((v) => ({ src: v.getAttribute("src"), duration: v.duration }));
}
"""


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_batch(tmp_path_factory.mktemp("report-browser"))


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, report: Path, problems: list[str], outside: list[str]):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def answer(route, request):
        outside.append(f"{request.resource_type} {request.url}")
        if request.resource_type == "image":
            route.fulfill(status=200, content_type="image/png", body=PIXEL_PNG)
        else:
            route.abort()

    page.route(lambda url: not url.startswith("file:"), answer)
    page.goto(report.as_uri())
    return page


def test_report_in_chromium(browser, output_dir: Path, tmp_path: Path):
    problems: list[str] = []
    outside: list[str] = []
    page = _open(browser, output_dir / "report.html", problems, outside)
    cards = page.locator("article.card")
    assert cards.count() == 4

    # Videos near the viewport switch to preload=metadata and really load from the relative paths.
    page.locator("#cards").scroll_into_view_if_needed()
    loaded = page.evaluate(WAIT_FOR_VISIBLE_METADATA, METADATA_TIMEOUT_MS)
    assert len(loaded) == 3, loaded  # the three done jobs, all on screen
    assert all(v["duration"] > 0 for v in loaded), loaded
    assert page.locator("video[preload=metadata]").count() == 3
    page.evaluate("window.scrollTo(0, 0)")  # the sticky toolbar would otherwise sit mid-page in the shot
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

    # Filter buttons: "failed" leaves only the failed card, "all" brings everything back.
    page.click("button[data-filter=failed]")
    visible = page.locator("article.card:visible")
    assert visible.count() == 1
    assert visible.first.get_attribute("data-state") == "failed"
    assert "1 of 4 shown" in page.locator("#shown").inner_text()
    page.screenshot(path=str(tmp_path / "report-failed.png"), full_page=True)
    page.click("button[data-filter=all]")
    assert page.locator("article.card:visible").count() == 4

    # Sort by cost, highest first (jobs without a known cost would go last).
    page.select_option("#sort", "cost-desc")
    costs = page.eval_on_selector_all("article.card", "cards => cards.map(c => c.dataset.cost)")
    known = [float(c) for c in costs if c]
    assert len(known) >= 3 and known == sorted(known, reverse=True) and all(costs[: len(known)]), costs
    page.select_option("#sort", "render-desc")
    renders = page.eval_on_selector_all("article.card", "cards => cards.map(c => c.dataset.render)")
    known = [float(r) for r in renders if r]
    assert len(known) >= 3 and known == sorted(known, reverse=True) and all(renders[: len(known)]), renders

    # A timeline row links to its card.
    page.click("svg.timeline a.row[data-id=storm]")
    assert page.evaluate("location.hash") == "#card-storm"

    assert not problems, problems
    assert outside and all(entry.startswith("image ") for entry in outside), outside
    print(f"screenshots in {tmp_path}")
