"""A finished output dir, as a `--sandbox` run of every job leaves it, built without running one: for
benchmarks and tests of large output dirs (100,000 jobs in about a minute instead of an hour of runs).

`fill(manifest_path)` loads the manifest and records each job through the ledger's own API, in the
order a run does (pending; the intent; the request id; downloading with the result's cost and finish
time; done with the file's size, sha256, mtime and inode), writes each video (the sandbox's sample of
the model's kind) and its `<id>.json` with `results.write_provenance`, then results.jsonl with
`results.write_results`, and records one finished run. What it leaves differs from a real run's only in
what no check reads: request ids are `sandbox-<n>`, no run.log, files are not fsynced, and the media
facts and poster of the first video stand for all (they are the same bytes).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from batchrun import mediafacts
from batchrun.ledger import Ledger, Output, utc_now
from batchrun.manifest import load_manifest
from batchrun.results import write_provenance, write_results
from batchrun.sandbox.server import _sample_video

IMAGE = "https://example.com/cliff.png"


def write_manifest(path: Path, jobs: int, *, output: str = "out", prefix: str = "clip") -> Path:
    """A Kling image-to-video manifest of `jobs` jobs, `<prefix>-000001`... (sandbox-valid inputs)."""
    width = max(6, len(str(jobs)))
    lines = ["version: 1", f"output: {output}", "concurrency: 64", "poll_min_interval: 0",
             "requests_per_second: 1000", "defaults:", "  duration: 5", "  generate_audio: false",
             f"  start_image_url: {IMAGE}", "jobs:"]
    lines += [f"  - {{id: {prefix}-{i:0{width}d}, prompt: \"waves crash below the cliff, take {i}\"}}"
              for i in range(1, jobs + 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fill(manifest_path: Path, *, video: bytes | None = None) -> Path:
    """Make the manifest's output dir hold every job `done` (simulated money); returns the output dir. Jobs
    the ledger already holds are left as they are, so a second call adds the manifest's new jobs."""
    manifest = load_manifest(manifest_path)
    output_dir = manifest.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    video = _sample_video() if video is None else video
    digest = hashlib.sha256(video).hexdigest()
    ledger = Ledger.open(output_dir)
    try:
        run_id = ledger.start_run()
        todo = [job for job in manifest.jobs if ledger.state_of(job.id) is None]  # jobs already there stay
        ledger.add_pending((job.id, manifest.model_of(job).model_id, job.input, job.input_sha256,
                            manifest.estimate_or_none(job)) for job in todo)
        ledger.mark_submitting([job.id for job in todo], simulated=True)
        for n, job in enumerate(todo, len(manifest.jobs) - len(todo) + 1):
            ledger.mark_submitted(job.id, f"sandbox-{n}")
            ledger.set_state(job.id, "downloading", clear_error=True, remote_status="succeeded",
                             output_urls=[f"http://127.0.0.1/sandbox-{n}/video.mp4"],
                             cost_usd=manifest.estimate_or_none(job), finished_at=utc_now())
            name = f"{job.id}.mp4"
            path = output_dir / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, video)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            ledger.mark_done(job.id, [Output(0, name, len(video), digest,
                                             st.st_mtime_ns, st.st_ino)])
            write_provenance(output_dir, ledger.get(job.id))
        _media_facts(ledger, output_dir, todo)
        write_results(ledger, output_dir)
        ledger.finish_run(run_id, 0, {"counts": {"done": len(todo)}, "simulated": True})
    finally:
        ledger.close()
    return output_dir


def _media_facts(ledger: Ledger, output_dir: Path, jobs: list) -> None:
    """What `mediafacts.fill` stores at a run's end (facts and a poster per video), read from the first
    video only: every video here holds the same bytes."""
    if not jobs:
        return
    first = output_dir / f"{jobs[0].id}.mp4"
    poster = output_dir / mediafacts.poster_path(jobs[0].id)
    facts = mediafacts.read_video(first, poster) or {}
    image = poster.read_bytes() if poster.is_file() else None
    for job in jobs:
        if image is not None and job is not jobs[0]:
            (output_dir / mediafacts.poster_path(job.id)).write_bytes(image)
        ledger.set_media(job.id, facts)
