"""`status`, `plan` and a re-run settle done jobs from a short read of the ledger and a stat of each file
(batchrun.settled), and read in full only the jobs that need it. Each test makes a done job that this
quick pass must not settle, the way a person or a tool would (a second output deleted, a ledger field
edited with sqlite3, a recorded refusal, a video that differs from what was asked), and checks that
what users see is what the full check says: real runs against the sandbox on loopback."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from helpers import cli, forge_keeping_stat, job, jobs, old_ledger, run, write_manifest

from batchrun.sandbox import Faults, Sandbox
from batchrun.sandbox.server import _sample_video

VIDEO = _sample_video()
SHORT = "shorter than asked: 2 s, asked 5 s"  # the sandbox's sample is 2 s long, the jobs ask for 5
SILENT = "no audio track, though audio was asked (and paid) for"


async def _json(*argv: str) -> dict:
    code, out, err = await cli([*argv, "--json"])
    assert code == 0, err
    return json.loads(out)


def _edit_ledger(out, sql: str, *params) -> None:
    conn = sqlite3.connect(out / "ledger.sqlite")
    try:
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


async def test_a_deleted_second_output_is_found_and_fetched_again_once(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    async with Sandbox(faults=Faults(videos_per_job=2)) as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and (out / "clip-01-2.mp4").is_file()
        (out / "clip-01-2.mp4").unlink()
        report = await _json("status", str(manifest))
        assert report["damaged"] == [{"id": "clip-01", "path": "clip-01-2.mp4", "problem": "missing"}]
        plan = await _json("plan", str(manifest), "--no-balance-check")
        assert (plan["download"], plan["skip"], plan["submit"]) == (1, 2, 0)
        served = sandbox.downloads_served
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert sandbox.posts_total == 3 and sandbox.downloads_served == served + 2  # its two videos, unpaid
    assert (out / "clip-01-2.mp4").is_file()
    assert (await _json("status", str(manifest)))["damaged"] == []


async def test_a_ledger_field_edited_by_hand_makes_the_provenance_file_stale(tmp_path):
    # The file's stat is as recorded, but the ledger no longer says what the file says: it must be read.
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        stat_before = (out / "clip-02.json").stat()
        _edit_ledger(out, "UPDATE jobs SET request_id = 'fixed-by-hand' WHERE id = 'clip-02'")
        assert (await _json("status", str(manifest)))["damaged"] == [
            {"id": "clip-02", "path": "clip-02.json", "problem": "damaged"}]
        assert (await _json("status", str(out)))["damaged"] == [
            {"id": "clip-02", "path": "clip-02.json", "problem": "damaged"}]
        assert (await _json("plan", str(manifest), "--no-balance-check"))["provenance_to_rewrite"] == ["clip-02.json"]
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.posts_total == 3
    assert json.loads((out / "clip-02.json").read_bytes())["request_id"] == "fixed-by-hand"
    assert (out / "clip-02.json").stat().st_ino != stat_before.st_ino
    assert (await _json("status", str(manifest)))["damaged"] == []


async def test_media_flags_are_listed_in_ledger_order_whichever_jobs_are_checked_in_full(tmp_path):
    manifest = write_manifest(tmp_path, [job("a"), job("b", generate_audio=True), job("c"), job("d")])
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    # a and c need their full rows: a's provenance file is gone, c's video was touched (hashed: intact);
    # b and d are settled at a glance, b with what it asked read from the ledger's copy of its input.
    (out / "a.json").unlink()
    os.utime(out / "c.mp4", ns=(1_000_000_000, 1_700_000_000_000_000_000))
    expected = [{"id": "a", "flags": [SHORT]}, {"id": "b", "flags": [SHORT, SILENT]},
                {"id": "c", "flags": [SHORT]}, {"id": "d", "flags": [SHORT]}]
    by_manifest = await _json("status", str(manifest))
    assert by_manifest["media_flags"] == expected
    assert by_manifest["damaged"] == [{"id": "a", "path": "a.json", "problem": "missing"}]
    # Without the manifest, what each job asked is read from the ledger's copy of its input.
    by_dir = await _json("status", str(out))
    assert by_dir["media_flags"] == expected and by_dir["damaged"] == by_manifest["damaged"]
    code, said, _ = await cli(["status", str(out)])
    assert code == 0 and "videos that differ from what was paid for (4):" in said
    assert said.index("  a  ") < said.index("  b  ") < said.index("  c  ") < said.index("  d  ")


async def test_status_without_the_manifest_lists_the_refusal_the_last_run_recorded_for_a_done_job(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        changed = write_manifest(tmp_path, [*jobs(3)[:2], job("clip-02", "a new prompt")])
        outcome, _ = await run(changed, sandbox)
        assert outcome.exit_code == 1 and sandbox.posts_total == 3
    report = await _json("status", str(out))
    assert [item["id"] for item in report["refused"]] == ["clip-02"]
    assert [(item["id"], item["state"]) for item in report["attention"]] == [("clip-02", "done")]
    assert report["counts"] == {"done": 3} and report["damaged"] == []
    by_manifest = await _json("status", str(changed))
    assert [item["id"] for item in by_manifest["refused"]] == ["clip-02"]
    assert by_manifest["not_started"] == [] and by_manifest["not_in_manifest"] == []


async def test_an_output_added_to_a_done_job_by_hand_is_checked_too(tmp_path):
    # The recorded stat of clip-01.json still matches its file and names one output; the ledger now holds two.
    manifest = write_manifest(tmp_path, jobs(2))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        _edit_ledger(out, "INSERT INTO outputs (job_id, idx, path, bytes, sha256) SELECT job_id, 1, 'clip-01-2.mp4',"
                          " bytes, sha256 FROM outputs WHERE job_id = 'clip-01'")
        report = await _json("status", str(manifest))
        assert sorted((d["path"], d["problem"]) for d in report["damaged"]) == [
            ("clip-01-2.mp4", "missing"), ("clip-01.json", "damaged")]
        plan = await _json("plan", str(manifest), "--no-balance-check")
        assert (plan["download"], plan["skip"]) == (1, 1)


async def test_status_reads_a_ledger_from_before_recorded_stats_without_migrating_it(tmp_path):
    # Schema 2: no request history, no `simulated`, no decisions, no recorded stats: every job is checked in full.
    out = tmp_path / "out"
    out.mkdir()
    conn = old_ledger(out, 2)
    conn.executemany("INSERT INTO jobs (id, state, model, input_json, input_sha256, request_id, submissions, cost_usd,"
                     " first_seen_at, updated_at) VALUES (?, ?, 'm', '{}', 'x', ?, 1, ?, ?, 't')",
                     [("a", "done", "r-a", 0.5, "t1"), ("b", "failed", "r-b", None, "t2")])
    conn.execute("INSERT INTO outputs (job_id, idx, path, bytes, sha256) VALUES ('a', 0, 'a.mp4', 3, 'x')")
    conn.commit()
    conn.close()
    report = await _json("status", str(out))
    assert report["counts"] == {"done": 1, "failed": 1} and report["spent_usd"] == 0.5
    assert report["damaged"] == [{"id": "a", "path": "a.mp4", "problem": "missing"},
                                 {"id": "a", "path": "a.json", "problem": "missing"}]
    assert [item["id"] for item in report["attention"]] == ["b"]
    conn = sqlite3.connect(out / "ledger.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


@pytest.mark.parametrize("touched", [1, 6], ids=["few read in full", "most read in full"])
async def test_a_job_read_in_full_is_checked_against_its_own_recorded_provenance_stat(tmp_path, touched):
    # clip-03's video is touched (hashed: intact) and its `<id>.json` forged keeping size, inode and mtime: its
    # own recorded stat vouches for the file (the documented limit), so only --verify sees the forgery. Touching
    # more videos sends most jobs to the full check, which reads the ledger another way.
    manifest = write_manifest(tmp_path, jobs(8))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
    for n in [3, 0, 1, 5, 6, 7][:touched]:
        os.utime(out / f"clip-0{n}.mp4", ns=(1_000_000_000, 1_700_000_000_000_000_000 + n))
    forge_keeping_stat(out / "clip-03.json")
    assert (await _json("status", str(manifest)))["damaged"] == []
    assert (await _json("plan", str(manifest), "--no-balance-check"))["provenance_to_rewrite"] == []
    assert (await _json("status", str(manifest), "--verify"))["damaged"] == [
        {"id": "clip-03", "path": "clip-03.json", "problem": "damaged"}]
