"""A run removes the temporary files a killed batchrun left in its output dir, and nothing else: real runs
against the sandbox on loopback, with the leftovers made as a kill leaves them."""

from __future__ import annotations

import os

from helpers import jobs, run, write_manifest

from batchrun.sandbox import Sandbox


async def test_a_run_removes_only_the_temporary_files_of_batchruns_that_are_gone(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        dead = ".clip-00.json.999999999.x1y2.tmp"  # no such process
        (out / dead).write_text("{cut")
        (out / ".results.jsonl.999999999.ab.tmp").write_text("cut")
        live = f".report.html.{os.getppid()}.cd.tmp"  # a process still running: maybe writing it now
        (out / live).write_text("<html")
        (out / ".clip-01.json.999999999.ef.tmp").mkdir()  # a directory is never ours
        (out / "notes.tmp").write_text("the user's")
        (out / ".hidden").write_text("the user's")
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.posts_total == 2
    names = set(os.listdir(out))
    assert dead not in names and ".results.jsonl.999999999.ab.tmp" not in names
    assert {live, ".clip-01.json.999999999.ef.tmp", "notes.tmp", ".hidden"} <= names
    assert (out / "notes.tmp").read_text() == "the user's"
