"""A re-run knows results.jsonl is current from the ledger's change count and the file's recorded stat
(ledger schema 8), without reading either; any change to what the file shows, made by this batchrun,
another process or by hand with sqlite3, and any edit or replacement of the file, gets it rewritten.
Real runs against the sandbox on loopback; the ledger and the file are changed as people and tools do."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

from helpers import jobs, results, run, write_manifest

from batchrun.ledger import Ledger
from batchrun.results import RESULTS_FORMAT, job_record
from batchrun.sandbox import Sandbox


def _stamp(path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def _done_dir(tmp_path, n: int = 3):
    manifest = write_manifest(tmp_path, jobs(n))
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    return manifest, tmp_path / "out"


async def _rerun(manifest) -> None:
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.posts_total == 0


async def test_a_ledger_change_made_by_hand_with_sqlite3_gets_results_jsonl_rewritten(tmp_path):
    manifest, out = await _done_dir(tmp_path)
    path = out / "results.jsonl"
    await _rerun(manifest)
    before = _stamp(path)
    conn = sqlite3.connect(out / "ledger.sqlite")
    with conn:
        conn.execute("UPDATE jobs SET note='fixed by hand' WHERE id='clip-01'")
    conn.close()
    await _rerun(manifest)
    assert _stamp(path) != before
    assert results(out)["clip-01"]["note"] == "fixed by hand"
    # An output's recorded digest changed by hand is a change too (the file is then also fetched again).
    conn = sqlite3.connect(out / "ledger.sqlite")
    with conn:
        conn.execute("UPDATE requests SET request_id='edited-by-hand' WHERE job_id='clip-02'")
    conn.close()
    await _rerun(manifest)
    assert "edited-by-hand" in results(out)["clip-02"]["request_ids"]


async def test_a_ledger_change_made_by_another_process_gets_results_jsonl_rewritten(tmp_path):
    manifest, out = await _done_dir(tmp_path)
    path = out / "results.jsonl"
    await _rerun(manifest)
    before = _stamp(path)
    # Another batchrun process records a reviewer's decision and writes nothing else.
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from batchrun.ledger import Ledger; "
                    "Ledger.open(Path(sys.argv[1])).set_decision('clip-00', decision='picked', rating=5)", str(out)],
                   check=True)
    await _rerun(manifest)
    assert _stamp(path) != before
    assert (results(out)["clip-00"]["decision"], results(out)["clip-00"]["rating"]) == ("picked", 5)
    # And a no-op re-run after that leaves the rewritten file alone.
    after = _stamp(path)
    await _rerun(manifest)
    assert _stamp(path) == after


async def test_an_edited_or_replaced_results_jsonl_is_rewritten_from_the_ledger(tmp_path):
    manifest, out = await _done_dir(tmp_path)
    path = out / "results.jsonl"
    await _rerun(manifest)
    good = path.read_bytes()
    saved = tmp_path / "saved.jsonl"
    shutil.copy2(path, saved)
    # Same length, other bytes, written in place (same inode).
    with open(path, "r+b") as handle:
        handle.write(b"x")
    await _rerun(manifest)
    assert path.read_bytes() == good
    # An older copy put back with its mtime (cp -p, a backup restore) after the ledger changed: another inode.
    conn = sqlite3.connect(out / "ledger.sqlite")
    with conn:
        conn.execute("UPDATE jobs SET note='after the backup' WHERE id='clip-00'")
    conn.close()
    await _rerun(manifest)
    assert results(out)["clip-00"]["note"] == "after the backup"
    shutil.copy2(saved, path)
    await _rerun(manifest)
    assert results(out)["clip-00"]["note"] == "after the backup"
    # Removed: written again.
    path.unlink()
    await _rerun(manifest)
    assert results(out)["clip-00"]["note"] == "after the backup"


async def test_the_stamp_is_trusted_only_for_the_exact_file_recorded(tmp_path):
    """The fast check's stated limit (as batchrun.filecheck's): an edit that keeps size and inode and puts
    the mtime back is not seen. It shows that a no-op re-run does not read results.jsonl at all."""
    manifest, out = await _done_dir(tmp_path)
    path = out / "results.jsonl"
    await _rerun(manifest)
    st = path.stat()
    data = path.read_bytes()
    with open(path, "r+b") as handle:
        handle.write(b"X")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    await _rerun(manifest)
    assert path.read_bytes() == b"X" + data[1:]
    # A touch (new mtime) is enough for the next run to compare and repair it.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    await _rerun(manifest)
    assert path.read_bytes() == data


async def test_a_run_that_changes_the_ledger_leaves_results_jsonl_current_for_the_next(tmp_path):
    manifest, out = await _done_dir(tmp_path, 2)
    path = out / "results.jsonl"
    manifest = write_manifest(tmp_path, jobs(4))  # two more jobs
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.posts_total == 2
    assert sorted(results(out)) == ["clip-00", "clip-01", "clip-02", "clip-03"]
    before = _stamp(path)
    await _rerun(manifest)
    assert _stamp(path) == before
    ledger = Ledger.open(out, create=False, readonly=True)
    try:
        assert [line["id"] for line in _lines(path)] == [row.id for row in ledger.rows()]
        assert _lines(path) == [job_record(row) for row in ledger.rows()]
    finally:
        ledger.close()


def test_results_format_names_the_fields_job_record_writes():
    """RESULTS_FORMAT is part of the stamp: a batchrun writing other lines must not trust an older file.
    When this fails, change RESULTS_FORMAT along with the fields listed here."""
    fields = ["id", "state", "model", "request_id", "request_ids", "submissions", "input_sha256", "outputs",
              "cost_usd", "cost_source", "simulated", "cost_flag", "estimated_cost_usd", "error", "refusal",
              "remote_status", "submitted_at", "started_at", "finished_at", "downloaded_at", "take", "take_of",
              "decision", "rating", "note", "media", "media_flags"]
    from batchrun.ledger import JobRow

    row = JobRow(id="a", state="pending", model="m", input={"prompt": "p"}, input_sha256="0" * 64, request_id=None,
                 submissions=0, remote_status=None, estimated_cost_usd=None, cost_usd=None, error_kind=None,
                 error_message=None, output_urls=[], first_seen_at="t", submitted_at=None, started_at=None,
                 finished_at=None, downloaded_at=None)
    assert (RESULTS_FORMAT, list(job_record(row))) == ("1", fields)


async def test_rows_read_in_bulk_equal_rows_read_one_by_one(tmp_path):
    """The bulk read leaves the input's JSON encoded until it is used: every field reads the same."""
    manifest, out = await _done_dir(tmp_path)
    ledger = Ledger.open(out, create=False, readonly=True)
    try:
        bulk = list(ledger.rows())
        assert [row.input for row in ledger.rows()] == [ledger.get(row.id).input for row in bulk]
        assert bulk == [ledger.get(row.id) for row in bulk]
        assert bulk[0].output_urls and bulk[0].input["prompt"]
    finally:
        ledger.close()
