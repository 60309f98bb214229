"""report.html, read as text: built from a real run against the in-process sandbox, plus synthetic
ledgers rows for what a sandbox run cannot produce (a thousand jobs, missing timestamps)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from batchrun.ledger import JobRow, Output
from batchrun.manifest import load_manifest
from batchrun.report import REPORT_NAME, render, write_report
from batchrun.report_cards import ImageBudget, image_src, parse_time
from batchrun.run import run_manifest
from batchrun.startimages import copy_name

IMAGE = "https://example.com/start.png"
SCRIPT_PROMPT = 'A cat <script>alert(1)</script> says "quotes" & ampersands'
FAIL_PROMPT = "A storm rolls in over the cliff [fail]"
LONG_PROMPT = ("Bring this still photograph to life with cinematic motion: the young woman turns her head and "
               "smiles as warm sunlight catches her freckles, and foamy waves crash against the rocks below.")
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def make_batch(folder: Path) -> Path:
    """Run a small manifest through the real pipeline (sandbox), write the report; return the output dir."""
    manifest = {
        "version": 1,
        "concurrency": 4,
        "poll_min_interval": 0.2,
        "poll_max_interval": 0.5,
        "defaults": {"duration": 5, "generate_audio": False, "start_image_url": IMAGE},
        "jobs": [
            {"id": "calm-sea", "prompt": LONG_PROMPT},
            {"id": "script-prompt", "prompt": SCRIPT_PROMPT, "duration": 10},
            {"id": "storm", "prompt": FAIL_PROMPT},
            {"id": "gulls", "prompt": "Seagulls glide past the cliff.", "generate_audio": True},
        ],
    }
    path = folder / "batch.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    output = folder / "out"
    outcome = asyncio.run(run_manifest(load_manifest(path, output=output), base_url=None, token=None, sandbox=True,
                                       progress=False, handle_signals=False))
    assert outcome.counts == {"done": 3, "failed": 1}, outcome.lines
    write_report(output)
    return output


class Page(HTMLParser):
    """The parts of the page the tests look at: elements with their attributes, and each card's text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.card_text: dict[str, str] = {}
        self._card: str | None = None
        self._depth = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag == "article" and "card" in attributes.get("class", "").split():
            self._card, self._depth = attributes["id"].removeprefix("card-"), 0
            self.card_text[self._card] = ""
        if self._card is not None and tag == "article":
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._card is not None and tag == "article":
            self._depth -= 1
            if self._depth == 0:
                self._card = None

    def handle_data(self, data: str) -> None:
        if self._card is not None:
            self.card_text[self._card] += data

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Page, dict[str, dict]]:
    output = make_batch(tmp_path_factory.mktemp("report"))
    text = (output / REPORT_NAME).read_text(encoding="utf-8")
    lines = (output / "results.jsonl").read_text(encoding="utf-8").splitlines()
    results = {row["id"]: row for row in map(json.loads, lines)}
    return output, text, Page(text), results


def test_every_job_has_a_card_with_its_facts(batch):
    _, _, page, results = batch
    assert set(page.card_text) == set(results)
    for job_id, row in results.items():
        card = page.card_text[job_id]
        assert row["state"] in card
        assert row["request_id"] in card
        if row["cost_usd"] is not None:
            assert f"${row['cost_usd']:.2f}" in card
    assert "10 s" in page.card_text["script-prompt"]  # its own duration, not the default's
    assert "with audio" in page.card_text["gulls"]


def test_videos_are_relative_and_on_disk(batch):
    output, _, page, results = batch
    videos = page.find("video")
    assert len(videos) == sum(1 for row in results.values() if row["state"] == "done")
    for video in videos:
        src = video["src"]
        assert urlsplit(src).scheme == "" and not src.startswith("/") and ".." not in src, src
        assert (output / unquote(src)).is_file()
        # Lazy: the inline script switches cards near the viewport to "metadata".
        assert video["preload"] == "none" and "controls" in video


def test_failed_job_shows_its_error(batch):
    _, _, page, results = batch
    error = results["storm"]["error"]
    assert results["storm"]["state"] == "failed" and error["message"]
    assert error["message"] in page.card_text["storm"]
    assert error["kind"] in page.card_text["storm"]
    assert "failed" in page.find("article", id="card-storm")[0]["class"]


def test_prompts_are_escaped(batch):
    _, text, page, _ = batch
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&quot;quotes&quot; &amp; ampersands" in text
    assert SCRIPT_PROMPT in page.card_text["script-prompt"]  # and it reads back as the user wrote it
    assert len(page.find("script")) == 1  # ours, inline
    # A long prompt is cut short, with the whole of it behind <details>.
    assert LONG_PROMPT in page.card_text["calm-sea"]
    assert '<details class="prompt">' in text


def test_works_offline_with_no_external_assets(batch):
    _, text, page, _ = batch
    assert all("src" not in script for script in page.find("script"))
    assert not page.find("link") and "@import" not in text and "@font-face" not in text
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {IMAGE, SVG_NAMESPACE}, urls
    images = page.find("img")
    assert len(images) == 4 and {img["src"] for img in images} == {IMAGE}
    assert all(img["loading"] == "lazy" for img in images)


def test_content_security_policy_pins_our_own_style_and_script(batch):
    _, text, page, _ = batch
    policy = page.find("meta", **{"http-equiv": "Content-Security-Policy"})[0]["content"]

    def pinned(tag: str) -> str:
        body = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S).group(1)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    assert f"script-src {pinned('script')}" in policy
    assert f"style-src {pinned('style')}" in policy
    assert "default-src 'none'" in policy


def test_timeline_has_one_row_per_job(batch):
    _, text, page, results = batch
    svg = text[text.index("<svg"): text.index("</svg>")]
    assert len(re.findall(r'<a [^>]*class="row"', svg)) == len(results)
    rows = page.find("a", **{"class": "row"})
    assert {r["data-id"] for r in rows} == set(results)
    assert all(r["href"] == f"#card-{r['data-id']}" for r in rows)
    for phase in ("queued", "rendering", "downloading"):
        assert f'class="seg {phase}"' in svg
    assert 'class="tick"' in svg and ">+0s<" in svg


def test_summary_and_filters(batch):
    _, text, page, results = batch
    assert "done: 3" in text and "failed: 1" in text
    assert "75%" in text  # 3 of 4 finished jobs
    spent = sum(row["cost_usd"] or 0 for row in results.values())
    assert f"${spent:,.2f}" in text
    assert ">20 s<" in text and "of 25 s" in text  # delivered 5 + 10 + 5 s of 5 + 10 + 5 + 5
    filters = {b["data-filter"] for b in page.find("button")}
    assert filters == {"all", "done", "failed"}
    assert {o["value"] for o in page.find("option")} >= {"cost-desc", "render-desc"}


def test_rewrite_is_atomic_and_leaves_no_temporary_files(batch):
    output = batch[0]
    before = set(output.iterdir())
    assert write_report(output) == output / REPORT_NAME
    assert set(output.iterdir()) == before


# -- synthetic rows ------------------------------------------------------------------------------
T0 = datetime(2026, 5, 1, 9, 0, tzinfo=timezone.utc)


def iso(seconds: float | None, *, z: bool = True) -> str | None:
    if seconds is None:
        return None
    text = (T0 + timedelta(seconds=seconds)).isoformat()
    return text.replace("+00:00", "Z") if z else text


def row(job_id: str, state: str, times: tuple[float | None, ...], **extra) -> JobRow:
    submitted, started, finished, downloaded = times
    fields = dict(id=job_id, state=state, model="kling", input={"prompt": f"clip {job_id}", "start_image_url": IMAGE},
                  input_sha256="0" * 64, request_id=f"req-{job_id}" if submitted is not None else None,
                  submissions=int(submitted is not None), remote_status=None, estimated_cost_usd=0.84,
                  cost_usd=None, error_kind=None, error_message=None, output_urls=[], first_seen_at=iso(0),
                  submitted_at=iso(submitted), started_at=iso(started), finished_at=iso(finished, z=False),
                  downloaded_at=iso(downloaded))
    fields.update(extra)
    return JobRow(**fields)


def test_a_thousand_jobs_render_fast_with_thin_rows(tmp_path):
    rows = []
    for i in range(1000):
        start = i * 3.0
        rows.append(row(f"clip-{i:04d}", "done", (start, start + 5, start + 95, start + 97), cost_usd=0.42,
                        outputs=(Output(0, f"clip-{i:04d}.mp4", 10, "0" * 64),)))
        (tmp_path / f"clip-{i:04d}.mp4").write_bytes(b"\0" * 10)
    began = time.perf_counter()
    text = render(tmp_path, rows, [], datetime.now(timezone.utc))
    assert time.perf_counter() - began < 5
    assert len(text) < 3_000_000
    assert text.count('class="row"') == 1000
    heights = {float(h) for h in re.findall(r'<rect class="seg queued" [^>]*height="([\d.]+)"', text)}
    assert max(heights) < 1.5
    assert text.count('preload="none"') == 1000 and 'preload="metadata"' not in text
    assert "$420.00" in text


def test_missing_timestamps_show_what_there_is(tmp_path):
    rows = [
        row("never-sent", "pending", (None, None, None, None)),
        row("waiting", "queued", (0, None, None, None)),
        row("rendering", "running", (0, 2, None, None)),
        # Finished before any poll saw it running: no split between queue and render.
        row("quick-fail", "failed", (1, None, 4, None), error_kind="remote_failed",
            error_message="content <policy> & \"rules\""),
        row("fetching", "downloading", (1, 3, 8, None)),
        row("done", "done", (0, 1, 9, 10), cost_usd=0.42, outputs=(Output(0, "done.mp4", 10, "0" * 64),)),
    ]
    text = render(tmp_path, rows, [], datetime.now(timezone.utc))
    page = Page(text)
    # The job never sent has no times: it has its card, not a timeline row.
    assert text.count('class="row"') == len(rows) - 1 and "Not drawn: 1 job not submitted yet." in text
    svg = text[text.index("<svg"): text.index("</svg>")]
    assert svg.count("seg queued open") == 1 and svg.count("seg rendering open") == 1
    assert svg.count("seg downloading open") == 1 and svg.count('class="seg remote"') == 1
    assert 'class="mark failed"' in svg
    assert "content <policy> & \"rules\"" in page.card_text["quick-fail"]
    assert "no video (pending)" in page.card_text["never-sent"]
    # A done job whose file is gone says so instead of linking a missing video.
    assert "file missing: done.mp4" in page.card_text["done"] and not page.find("video")


def test_a_card_shows_a_video_or_poster_only_when_it_is_a_file_there(tmp_path):
    """What is on disk decides (as a stat would, the folders being listed once): a video or poster that is a
    link to a file counts; a dangling link, a folder in its place, or a file in a subfolder of another
    name does not; a second output in a subfolder is found in that subfolder."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "real.mp4").write_bytes(b"video")
    (tmp_path / "linked.mp4").symlink_to(tmp_path / "elsewhere" / "real.mp4")
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "linked-2.mp4").write_bytes(b"video 2")
    (tmp_path / "posters").mkdir()
    (tmp_path / "posters" / "linked.jpg").symlink_to(tmp_path / "elsewhere" / "real.mp4")
    (tmp_path / "posters" / "folder.jpg").mkdir()

    def done(job_id, *paths):
        return row(job_id, "done", (0, 1, 9, 10), cost_usd=0.42,
                   outputs=tuple(Output(i, p, 5, "0" * 64) for i, p in enumerate(paths)))

    rows = [done("linked", "linked.mp4", "extra/linked-2.mp4", "extra/gone-3.mp4"), done("dangling", "dangling.mp4"),
            done("folder", "folder.mp4")]
    text = render(tmp_path, rows, [], datetime.now(timezone.utc))
    page = Page(text)
    linked = text[text.index('id="card-linked"'):text.index("</article>", text.index('id="card-linked"'))]
    assert 'src="linked.mp4"' in linked and 'poster="posters/linked.jpg"' in linked
    assert 'href="extra/linked-2.mp4"' in linked and "missing: extra/gone-3.mp4" in linked
    assert "file missing: dangling.mp4" in page.card_text["dangling"]
    assert "file missing: folder.mp4" in page.card_text["folder"]


def test_start_images_of_every_kind(tmp_path):
    pixel = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    inputs = {"data": pixel, "local": "images/harbor one.png", "absolute": "/srv/img/a.png",
              "script": "javascript:alert(1)", "html": "data:text/html,<script>alert(1)</script>",
              "uncopied": "images/elsewhere.png"}
    rows = [row(name, "pending", (None, None, None, None), input={"prompt": "p", "start_image_url": url})
            for name, url in inputs.items()]
    # A manifest's local path is relative to the manifest, not to the page: the run's copy is shown.
    copy = tmp_path / copy_name("images/harbor one.png")
    copy.parent.mkdir()
    copy.write_bytes(b"\x89PNG fake")
    page = Page(render(tmp_path, rows, [], datetime.now(timezone.utc)))
    sources = [img["src"] for img in page.find("img")]
    assert sources == [pixel, copy.relative_to(tmp_path).as_posix(), "file:///srv/img/a.png"]
    assert "not copied into this folder" in page.card_text["uncopied"]
    assert "javascript: URL not shown" in page.card_text["script"]
    assert image_src(pixel, ImageBudget(len(pixel) - 1)) == (None, "inline image left out to keep the page small")
    assert "inline data that is not an image" in page.card_text["html"]


def test_parse_time_reads_both_ledger_formats():
    assert parse_time("2026-11-25T19:14:19.390Z") == datetime(2026, 11, 25, 19, 14, 19, 390000, timezone.utc)
    assert parse_time("2026-11-25T19:14:20.632201+00:00") == datetime(2026, 11, 25, 19, 14, 20, 632201,
                                                                        timezone.utc)
    assert parse_time("2026-11-25T19:14:20+00:00").second == 20
    assert parse_time(None) is None and parse_time("yesterday") is None


def test_a_folder_that_cannot_be_listed_or_searched_shows_nothing_from_it(tmp_path):
    """`Files` asks about the file itself when its folder cannot be listed, and takes "cannot even ask"
    (no search permission on the folder, a name too long) as "not there", never as an error."""
    from batchrun.report_cards import Files

    (tmp_path / "clip.mp4").write_bytes(b"video")
    files = Files(tmp_path)
    assert files.has("clip.mp4") and not files.has("other.mp4")
    assert not files.has("x" * 300 + "/poster.jpg")  # listing and stat both fail (ENAMETOOLONG)
    assert not files.has("posters/none.jpg")  # no such folder
