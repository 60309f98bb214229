"""A full disk under the output dir: the run stops cleanly, marks nothing done that is not on disk,
prints no traceback, leaves a sound ledger, and names any paid job it could not record."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest
from helpers import jobs, run, write_manifest

from batchrun.ledger import LEDGER_NAME
from batchrun.sandbox import Sandbox

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(100_000)


@pytest.fixture
def tiny_disk(tmp_path):
    target = tmp_path / "tiny"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(target)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): disk full not tested")
    yield target
    subprocess.run(["umount", "-l", str(target)], check=False)


async def test_a_full_disk_stops_the_run_cleanly(tmp_path, tiny_disk):
    manifest = write_manifest(tmp_path, jobs(6), output=str(tiny_disk / "out"), concurrency=2)
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, said = await run(manifest, sandbox)
    assert outcome.exit_code == 1
    assert "Traceback" not in said
    assert any("disk" in line and line.startswith("stopped:") for line in outcome.lines), outcome.lines
    out = tiny_disk / "out"
    conn = sqlite3.connect(f"file:{out / LEDGER_NAME}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        done = [row[0] for row in conn.execute("SELECT id FROM jobs WHERE state='done'")]
        rows = dict(conn.execute("SELECT id, request_id FROM jobs"))
    finally:
        conn.close()
    assert len(done) < 6
    for job_id in done:  # nothing is done that is not whole on disk
        assert (out / f"{job_id}.mp4").read_bytes() == VIDEO
    # Every job the server created is either recorded with its request id or named in the output.
    for request_id in sandbox.jobs:
        assert request_id in rows.values() or request_id in said, request_id
