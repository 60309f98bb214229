"""A small reviewed batch made through the real pipeline: two inputs with two takes each (one with a
local start image), one failing job, run against an in-process sandbox that counts what it creates."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from helpers import run
from PIL import Image

from batchrun.sandbox import Sandbox

MANIFEST = """\
version: 1
output: out
concurrency: 4
poll_min_interval: 0
poll_max_interval: 5
requests_per_second: 1000
defaults: {duration: 5, generate_audio: false, takes: 2}
jobs:
  - {id: harbor, prompt: "Boats rock gently at dawn.", start_image_url: images/harbor.png}
  - {id: cliff, prompt: "Waves crash <b>below</b>.", start_image_url: "https://example.com/cliff.png"}
  - {id: storm, prompt: "A storm rolls in [fail]", start_image_url: "https://example.com/storm.png", takes: 1}
"""


def make_reviewed_batch(folder: Path) -> Path:
    """Write the manifest and its local image, run it once; return the manifest's path."""
    image = io.BytesIO()
    Image.new("RGB", (640, 360), (40, 90, 160)).save(image, "PNG")
    (folder / "images").mkdir()
    (folder / "images" / "harbor.png").write_bytes(image.getvalue())
    manifest = folder / "batch.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    assert run_counting(manifest) == 5
    return manifest


async def count_run(manifest: Path) -> int:
    """One real run against a fresh sandbox; how many jobs (paid requests) it created."""
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        return sandbox.jobs_created


def run_counting(manifest: Path) -> int:
    """`count_run` from code that has no event loop going."""
    return asyncio.run(count_run(manifest))
