"""Local start images, copied into the output dir so the report and the review app show them from anywhere.

A manifest names a local image relative to its own folder, but report.html lives in the output dir and
may be zipped and sent on: a path as written is broken there. Each run (and `batchrun report` given the
manifest) copies every local start image to `<output>/start-images/<key><suffix>`, where the key is
derived from the path as written in the job's input, so the page finds the copy from the ledger row
alone. A copy is a copy, not a thumbnail (that would need an imaging library); the images are already
capped at `localfiles.MAX_INLINE_BYTES` each.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from batchrun.fsutil import atomic_write, own_folder
from batchrun.inputfile import read_regular
from batchrun.localfiles import MAX_INLINE_BYTES

FOLDER = "start-images"
FIELD = "start_image_url"
log = logging.getLogger("batchrun.run")


def copy_name(written: str) -> str:
    """The copy's path relative to the output dir, for the image path as written in a job's input."""
    suffix = PurePosixPath(written.replace("\\", "/")).suffix.lower()
    suffix = suffix if suffix in (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp") else ".img"
    return f"{FOLDER}/{hashlib.sha256(written.encode('utf-8')).hexdigest()[:20]}{suffix}"


def copy_local(output_dir: Path, jobs: Iterable) -> int:
    """Copy the local start image of each job (`Job.local_files`) that is not already there with the same
    bytes; returns how many were written. A file that cannot be read is skipped (the run has said why)."""
    written = 0
    done: set[str] = set()
    for job in jobs:
        source = job.local_files.get(FIELD)
        value = job.input.get(FIELD)
        if source is None or not isinstance(value, str) or value in done:
            continue
        done.add(value)
        target = output_dir / copy_name(value)
        try:
            data, _ = read_regular(Path(source), MAX_INLINE_BYTES)
            if target.is_file() and not target.is_symlink() and target.read_bytes() == data:
                continue
            atomic_write(own_folder(target.parent) / target.name, data, durable=False)
            written += 1
        except Exception as exc:  # noqa: BLE001 - a picture for people; never stops a run
            log.warning("could not copy start image %s into %s: %s", source, output_dir, exc)
    return written
