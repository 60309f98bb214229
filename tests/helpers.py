"""Shared test helpers: a fake clock, a manifest writer, and a runner that drives a real run.

Nothing here replaces batchrun's own code: runs go through `run_manifest` (or `main`) against a
real `Sandbox` served on 127.0.0.1, and only time is simulated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import sqlite3
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest
from batchrun.plan import RunOptions
from batchrun.run import RunOutcome, run_manifest
from batchrun.sandbox import Sandbox

IMAGE = "https://example.com/cliff.png"
TOKEN = "test-token"


class FakeClock:
    """One clock for the sandbox and the run: `sleep(d)` advances it at once instead of waiting."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    __call__ = now

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        self.sleeps.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


class ScaledClock:
    """Real concurrency, faster time: `speed` simulated seconds pass per real second.

    Concurrent sleeps overlap as they do for real (a `FakeClock` adds them up one after the other), so
    jobs that wait together are tested waiting together, with the server's real-world figures
    (Retry-After: 10) and without waiting for real."""

    def __init__(self, speed: float = 100.0, start: float = 1000.0) -> None:
        self.speed, self.start = speed, start
        self._t0 = time.monotonic()

    def now(self) -> float:
        return self.start + (time.monotonic() - self._t0) * self.speed

    __call__ = now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, float(seconds)) / self.speed)


def job(job_id: str, prompt: str | None = None, **extra: Any) -> dict[str, Any]:
    """A manifest job entry with a valid input."""
    return {"id": job_id, "prompt": prompt or f"waves crash below ({job_id})", **extra}


def jobs(n: int, prefix: str = "clip") -> list[dict[str, Any]]:
    return [job(f"{prefix}-{i:02d}") for i in range(n)]


def write_manifest(folder: Path, job_list: list[dict[str, Any]], *, name: str = "batch.yaml",
                   output: str | None = "out", **settings: Any) -> Path:
    """A manifest with fast test settings (no real waiting); `settings` override them."""
    doc: dict[str, Any] = {"version": 1}
    if output is not None:
        doc["output"] = output
    doc.update({"concurrency": 4, "poll_min_interval": 0, "poll_max_interval": 5, "requests_per_second": 1000})
    doc.update(settings)
    doc["defaults"] = {"duration": 5, "generate_audio": False, "start_image_url": IMAGE}
    doc["jobs"] = job_list
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def model_input(manifest_path: Path, job_id: str) -> dict[str, Any]:
    """The input batchrun sends for a job (what the sandbox counts POSTs by)."""
    manifest = load_manifest(manifest_path)
    return next(j.input for j in manifest.jobs if j.id == job_id)


async def run(manifest_path: Path, sandbox: Sandbox, *, token: str = TOKEN, clock: FakeClock | None = None,
              options: RunOptions = RunOptions(), rand=lambda: 0.5,
              handle_signals: bool = False, preflight: bool = False) -> tuple[RunOutcome, str]:
    """One real run against `sandbox`; returns the outcome and what it wrote to its stream.

    Preflight is off unless asked for: the test manifests' image URLs point at example.com."""
    manifest = load_manifest(manifest_path)
    options = dataclasses.replace(options, preflight=preflight and options.preflight)
    stream = io.StringIO()
    kwargs: dict[str, Any] = {}
    if clock is not None:
        kwargs.update(clock=clock.now, sleep=clock.sleep)
    else:
        kwargs.update(sleep=_no_wait)
    outcome = await run_manifest(manifest, base_url=sandbox.base_url, token=token, options=options, stream=stream,
                                 progress=False, handle_signals=handle_signals, rand=rand, **kwargs)
    return outcome, stream.getvalue()


def old_ledger(folder: Path, version: int) -> sqlite3.Connection:
    """A new `ledger.sqlite` in `folder` made by the first `version` migrations only, as an older batchrun
    left it; returns the open connection, for the caller to add rows, commit and close."""
    from batchrun.ledger import LEDGER_NAME, MIGRATIONS

    conn = sqlite3.connect(folder / LEDGER_NAME)
    for migration in MIGRATIONS[:version]:
        for statement in migration.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version={version}")
    return conn


async def finished_run(folder: Path, n: int) -> tuple[Path, Path]:
    """A manifest of `n` jobs in `folder` run to the end against a fresh sandbox (every job done); returns
    (the manifest, its output dir)."""
    manifest = write_manifest(folder, jobs(n))
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
    return manifest, folder / "out"


async def _no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


def results(output_dir: Path) -> dict[str, dict[str, Any]]:
    lines = (output_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return {row["id"]: row for row in rows}


def ledger_rows(output_dir: Path) -> dict[str, dict[str, Any]]:
    """The ledger's job rows, read with plain sqlite3 (read-only)."""
    conn = sqlite3.connect(f"file:{output_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM jobs")}
    finally:
        conn.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SPEC_FIELDS = {"id", "state", "request_id", "submissions", "input_sha256", "outputs", "cost_usd", "error",
               "submitted_at", "finished_at"}


def assert_done(output_dir: Path, row: dict[str, Any], video: bytes) -> None:
    """A done job as a user sees it: one verified video, its provenance, and a complete results line."""
    assert SPEC_FIELDS <= row.keys()
    assert row["state"] == "done", row
    assert row["error"] is None
    assert row["request_id"]
    for stamp in ("submitted_at", "finished_at"):  # ISO 8601 UTC
        assert row[stamp].endswith("Z"), row[stamp]
        assert datetime.fromisoformat(row[stamp].replace("Z", "+00:00")).utcoffset() == timedelta(0)
    assert len(row["outputs"]) == 1
    out = row["outputs"][0]
    assert out["path"] == f"{row['id']}.mp4"
    data = (output_dir / out["path"]).read_bytes()
    assert data == video
    assert out["bytes"] == len(video)
    assert out["sha256"] == sha256(data)
    assert not (output_dir / f"{row['id']}.mp4.part").exists()
    provenance = json.loads((output_dir / f"{row['id']}.json").read_text(encoding="utf-8"))
    assert provenance["id"] == row["id"]
    assert provenance["request_id"] == row["request_id"]
    assert provenance["state"] == "done"
    assert provenance["outputs"] == row["outputs"]
    assert provenance["input_sha256"] == row["input_sha256"]
    assert provenance["model"] == "kling/kling-3.0/standard/image-to-video"
    assert provenance["input"]["start_image_url"] == IMAGE


def assert_spend_consistent(outcome: RunOutcome, output_dir: Path) -> None:
    """The spend a run reports is what results.jsonl adds up to (and what the next run starts from)."""
    total = sum(row["cost_usd"] or 0.0 for row in results(output_dir).values())
    assert abs(outcome.spent_usd - total) < 1e-6, (outcome.spent_usd, total)


def write_yaml(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    """A manifest written from indented test text."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def manifest_problems(tmp_path: Path, text: str) -> list[str]:
    """Every problem the manifest has, as 'LINE:COL: where: message'."""
    path = write_yaml(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


async def cli(argv: list[str]) -> tuple[int, str, str]:
    """`batchrun.cli.main(argv)` in a worker thread (it runs its own event loop, so a sandbox in the test's
    loop keeps serving): (exit code, stdout, stderr)."""
    from batchrun.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def mp4(payload: bytes, brand: bytes = b"isom") -> bytes:
    """A small file with an MP4's box structure: an ftyp box, then an mdat box holding `payload`. Its box
    sizes say where it ends, as a real MP4's do (batchrun checks them when a body comes without a length)."""
    ftyp = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x02\x00isomiso2"
    return ftyp + (8 + len(payload)).to_bytes(4, "big") + b"mdat" + payload


def forge_keeping_stat(path: Path) -> None:
    """Overwrite the request id in the `<id>.json` at `path` with x's, in place, keeping its size, inode and
    mtime: the edit only a full read (`--verify`) can see."""
    before, data = path.stat(), path.read_bytes()
    request_id = json.loads(data)["request_id"]
    with open(path, "r+b") as handle:
        handle.write(data.replace(request_id.encode(), b"x" * len(request_id)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def mux_silence(out: Any, sound: Any, seconds: int) -> None:
    """Encode `seconds` of stereo silence through PyAV's audio stream `sound` into the container `out`,
    then flush the encoder."""
    import av

    samples = 1024
    for i in range(seconds * 44100 // samples):
        frame = av.AudioFrame(format="fltp", layout="stereo", samples=samples)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate, frame.pts = 44100, i * samples
        out.mux(sound.encode(frame))
    out.mux(sound.encode(None))
