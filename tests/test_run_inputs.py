"""What a run sends and refuses to pay for: preflight of image URLs, local files as data: URIs, `plan`."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import yaml
from helpers import results, run
from test_preflight import host, image, tls_contexts  # noqa: F401 - `host` is a fixture

from batchrun.cli import main
from batchrun.plan import RunOptions
from batchrun.sandbox import Sandbox


def _manifest(tmp_path, jobs_list, **settings) -> object:
    doc = {"version": 1, "output": "out", "concurrency": 4, "poll_min_interval": 0, "requests_per_second": 0,
           "defaults": {"duration": 5, "generate_audio": False}, "jobs": jobs_list, **settings}
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _line_of(path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


async def test_preflight_holds_jobs_with_bad_images_and_pays_for_the_rest(tmp_path, host):  # noqa: F811
    manifest = _manifest(tmp_path, [
        {"id": "good", "prompt": "a", "start_image_url": host.base + "/good.png"},
        {"id": "also-good", "prompt": "b", "start_image_url": host.base + "/good.png"},
        {"id": "gone", "prompt": "c", "start_image_url": host.base + "/missing.png"},
        {"id": "page", "prompt": "d", "start_image_url": host.base + "/page"},
    ])
    options = RunOptions(preflight_ssl=tls_contexts()[1])
    async with Sandbox() as sandbox:
        outcome, said = await run(manifest, sandbox, options=options, preflight=True)
        assert outcome.exit_code == 1
        assert sandbox.posts_total == 2  # nothing was paid for the two doomed jobs
        assert "preflight: 3 image URLs, 3 fetched, 0 known good from earlier runs; 2 jobs held" in said
        line = _line_of(manifest, "/missing.png")
        assert f"{manifest}:{line}:" in said and "HTTP 404" in said  # located at the job's field
        rows = results(tmp_path / "out")
        assert rows["good"]["state"] == rows["also-good"]["state"] == "done"
        assert rows["gone"]["state"] == "pending" and rows["gone"]["error"]["kind"] == "preflight"
        assert "HTTP 404" in rows["gone"]["error"]["message"]
        assert "not an image" in rows["page"]["error"]["message"] or "web page" in rows["page"]["error"]["message"]
        assert host.hits["/good.png"] == 1  # each distinct URL once

        # The next run does not fetch the good URL again; the bad ones are checked again (they may be fixed).
        again, said = await run(manifest, sandbox, options=options, preflight=True)
        assert again.exit_code == 1
        assert "preflight: 2 image URLs, 2 fetched, 0 known good" in said
        assert host.hits["/good.png"] == 1 and host.hits["/missing.png"] == 2

        # --no-preflight: the user takes the risk.
        last, _ = await run(manifest, sandbox, options=RunOptions(preflight=False), preflight=False)
        assert sandbox.posts_total == 4
    assert last.exit_code == 0


async def test_validate_check_urls_reports_located_problems(tmp_path, host):  # noqa: F811
    manifest = _manifest(tmp_path, [
        {"id": "small", "prompt": "a", "start_image_url": host.base + "/small.png"},
        {"id": "ok", "prompt": "b", "start_image_url": host.base + "/good.jpg"},
    ])
    from batchrun.manifest import load_manifest
    from batchrun.preflight import check_manifest, problems_for

    checks = await check_manifest(load_manifest(manifest), ssl=tls_contexts()[1])
    problems = problems_for(load_manifest(manifest), checks)
    assert len(problems) == 1
    assert str(problems[0]).startswith(f"{manifest}:{_line_of(manifest, '/small.png')}:")
    assert "300" in problems[0].message  # Kling's minimum side


def test_validate_check_urls_from_the_cli_without_network_says_what_failed(tmp_path):
    manifest = _manifest(tmp_path, [{"id": "x", "prompt": "a", "start_image_url": "https://127.0.0.1:9/none.png"}])
    out, err = io.StringIO(), io.StringIO()
    code = main(["validate", "--check-urls", str(manifest)], stdout=out, stderr=err)
    assert code == 2
    assert "cannot connect to 127.0.0.1" in out.getvalue()
    assert out.getvalue().rstrip().endswith("invalid: 1 error")


async def test_local_images_are_sent_inline_and_editing_one_changes_the_job(tmp_path):
    (tmp_path / "images").mkdir()
    png = image((640, 480))
    (tmp_path / "images" / "harbor.png").write_bytes(png)
    manifest = _manifest(tmp_path, [{"id": "harbor", "prompt": "boats", "start_image_url": "images/harbor.png"}])
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        sent = next(iter(sandbox.jobs.values())).input["start_image_url"]
        assert sent == "data:image/png;base64," + base64.b64encode(png).decode()
        provenance = json.loads((tmp_path / "out" / "harbor.json").read_text())
        assert provenance["input"]["start_image_url"] == "images/harbor.png"  # no megabytes of base64 on disk
        assert b"base64" not in (tmp_path / "out" / "ledger.sqlite").read_bytes()

        # The same picture, edited: the job's input changed after it was paid for.
        (tmp_path / "images" / "harbor.png").write_bytes(image((640, 400)))
        again, said = await run(manifest, sandbox)
        assert again.exit_code == 1
        assert "its input changed after it was submitted" in said
        assert sandbox.posts_total == 1


async def test_plan_shows_local_files_by_absolute_path_and_sends_nothing(tmp_path):
    images = tmp_path / "shared-images"
    images.mkdir()
    (images / "cliff.png").write_bytes(image((480, 480)))
    folder = tmp_path / "batches"
    folder.mkdir()
    manifest = _manifest(folder, [{"id": "cliff", "prompt": "waves", "start_image_url": "../shared-images/cliff.png"}])
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, ["plan", str(manifest)], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert str(images / "cliff.png") in out.getvalue()
    assert not (folder / "out").exists()


async def test_preflight_counts_one_url_and_one_held_job_in_the_singular(tmp_path, host):  # noqa: F811
    manifest = _manifest(tmp_path, [{"id": "gone", "prompt": "c", "start_image_url": host.base + "/missing.png"}])
    async with Sandbox() as sandbox:
        outcome, said = await run(manifest, sandbox, options=RunOptions(preflight_ssl=tls_contexts()[1]),
                                  preflight=True)
        assert outcome.exit_code == 1 and sandbox.posts_total == 0
        assert "preflight: 1 image URL, 1 fetched, 0 known good from earlier runs; 1 job held" in said, said
