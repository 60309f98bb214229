"""status, cancel and export as a user runs them, and re-runs after the manifest or the server changed."""

from __future__ import annotations

import asyncio
import csv
import io
import json

from helpers import FakeClock, job, jobs, results, run, write_manifest
from helpers import cli as _main

from batchrun.sandbox import Faults, Sandbox

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8


async def _leave_jobs_in_flight(tmp_path, sandbox, clock, n=3, concurrency=3):
    """A run that detaches (max_wait) while its jobs are still queued or rendering remotely."""
    manifest = write_manifest(tmp_path, jobs(n), concurrency=concurrency, poll_min_interval=1, max_wait=5)
    outcome, _ = await run(manifest, sandbox, clock=clock)
    assert outcome.exit_code == 1
    return manifest


async def test_status_shows_counts_attention_and_spend(tmp_path):
    manifest = write_manifest(tmp_path, [job("good"), job("bad", "a storm [fail]"), job("other")])
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 1
    code, out, _ = await _main(["status", str(manifest)])
    assert code == 0
    assert "3 jobs in the ledger" in out
    assert "  done         2" in out and "  failed       1" in out
    assert "spent: $0.84" in out
    assert "bad  failed: content policy violation (sandbox)" in out

    code, out, _ = await _main(["status", str(tmp_path / "out"), "--json"])
    data = json.loads(out)
    assert data["counts"] == {"done": 2, "failed": 1} and data["total"] == 3
    rid = data["attention"][0]["request_id"]
    assert data["attention"] == [{"id": "bad", "state": "failed", "request_id": rid, "request_ids": [rid],
                                  "error": {"kind": "remote", "message": "content policy violation (sandbox)"}}]
    assert data["spent_usd"] == 0.84


async def test_status_lists_jobs_removed_from_the_manifest_and_a_rerun_leaves_them_alone(tmp_path):
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        manifest = write_manifest(tmp_path, jobs(3))
        assert (await run(manifest, sandbox))[0].exit_code == 0
        # The user drops clip-01 and adds clip-03.
        manifest = write_manifest(tmp_path, [job("clip-00"), job("clip-02"), job("clip-03")])
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert "1 to submit, 0 to resume, 0 to download, 2 already done" in said
        assert sandbox.posts_total == 4
    rows = results(tmp_path / "out")
    assert set(rows) == {"clip-00", "clip-01", "clip-02", "clip-03"}  # the dropped job keeps its result
    assert rows["clip-01"]["state"] == "done" and (tmp_path / "out" / "clip-01.mp4").read_bytes() == VIDEO
    code, out, _ = await _main(["status", str(manifest)])
    assert "in the ledger but no longer in the manifest (1): clip-01" in out


async def test_status_is_safe_while_a_run_is_going(tmp_path):
    clock = FakeClock()
    async with Sandbox(capacity=3, render_seconds=50, video_bytes=VIDEO, clock=clock) as sandbox:
        manifest = write_manifest(tmp_path, jobs(3), poll_min_interval=1)
        running = asyncio.create_task(run(manifest, sandbox, clock=clock))
        while sandbox.jobs_created < 3:
            await asyncio.sleep(0.01)
        code, out, _ = await _main(["status", str(manifest), "--json"])
        assert code == 0
        assert json.loads(out)["counts"].get("pending", 0) == 0
        outcome, _ = await running
    assert outcome.exit_code == 0


async def test_cancel_cancels_queued_jobs_and_reports_those_already_rendering(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    clock = FakeClock()
    async with Sandbox(capacity=1, render_seconds=1000, video_bytes=VIDEO, clock=clock) as sandbox:
        manifest = await _leave_jobs_in_flight(tmp_path, sandbox, clock)
        code, out, err = await _main(["cancel", str(manifest), "--base-url", sandbox.base_url])
        assert code == 1, err  # one job was already rendering
        assert out.count("cancelled: ") == 2
        assert "not cancellable (already in progress): clip-00" in out
        assert out.rstrip().endswith("2 jobs cancelled, 1 could not be, 0 errors")
        assert sandbox.calls["cancel"] == 3
        statuses = sorted(j.status for j in sandbox.jobs.values())
        assert statuses == ["cancelled", "cancelled", "in_progress"]
    code, out, _ = await _main(["status", str(manifest), "--json"])
    assert json.loads(out)["counts"] == {"cancelled": 2, "running": 1} or \
        json.loads(out)["counts"] == {"cancelled": 2, "queued": 1}


async def test_cancel_with_nothing_queued_exits_0(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        manifest = write_manifest(tmp_path, jobs(1))
        assert (await run(manifest, sandbox))[0].exit_code == 0
        code, out, _ = await _main(["cancel", str(tmp_path / "out"), "--base-url", sandbox.base_url])
    assert code == 0 and "0 jobs cancelled, 0 could not be, 0 errors" in out


async def test_export_jsonl_and_csv_hold_one_line_per_job(tmp_path):
    manifest = write_manifest(tmp_path, [job("a"), job("b, with comma"[:1] + "-comma"), job("c", "x [fail]")])
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        await run(manifest, sandbox)
    code, out, _ = await _main(["export", str(manifest)])
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in lines] == ["a", "b-comma", "c"]
    assert lines == [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]

    code, out, _ = await _main(["export", str(tmp_path / "out"), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["id"] for r in rows] == ["a", "b-comma", "c"]
    assert rows[0]["state"] == "done" and rows[0]["outputs"] == "a.mp4" and rows[0]["cost_usd"] == "0.42"
    assert rows[2]["state"] == "failed" and rows[2]["error_message"] == "content policy violation (sandbox)"


async def test_a_request_id_the_server_no_longer_knows_fails_the_job_after_the_grace_window(tmp_path):
    """The API forgets request ids after a while (404001). The job fails with that reason once the answer
    has held across the grace window (not on the first 404, not polled forever); --retry-failed asks the
    request again, and only because it is still unknown submits the job again, keeping the old id."""
    clock = FakeClock()
    async with Sandbox(capacity=3, render_seconds=1000, video_bytes=VIDEO, clock=clock) as first:
        manifest = await _leave_jobs_in_flight(tmp_path, first, clock, n=1, concurrency=1)
    old_id = results(tmp_path / "out")["clip-00"]["request_id"]
    manifest = write_manifest(tmp_path, jobs(1), concurrency=1, poll_min_interval=1)
    async with Sandbox(video_bytes=VIDEO, clock=clock, seed=1) as forgetful:  # never heard of the request
        started = clock.now()
        outcome, _ = await run(manifest, forgetful, clock=clock)
        assert outcome.exit_code == 1
        row = results(tmp_path / "out")["clip-00"]
        assert row["state"] == "failed" and row["error"]["kind"] == "not_found"
        assert "no longer knows request" in row["error"]["message"]
        # Asked again with backoff across the default 300 s window, a dozen calls or so, then believed.
        assert 3 <= forgetful.calls["status"] <= 20 and clock.now() - started >= 290
        assert forgetful.posts_total == 0
        assert row["cost_usd"] is None and "spent in this output dir: $0.00" in outcome.lines[0]

        from batchrun.plan import RunOptions

        statuses = forgetful.calls["status"]
        again, said = await run(manifest, forgetful, clock=clock, options=RunOptions(retry_failed=True))
        assert again.exit_code == 0, said
        assert forgetful.calls["status"] > statuses + 1  # the old request was asked about first
        row = results(tmp_path / "out")["clip-00"]
        assert row["submissions"] == 2 and forgetful.jobs_created == 1
        assert row["request_ids"] == [old_id, row["request_id"]]


async def test_a_job_whose_post_was_refused_can_be_edited_before_the_next_run(tmp_path):
    """A POST the server refused (here: no balance) created nothing: editing that job is fine."""
    async with Sandbox(video_bytes=VIDEO, faults=Faults(no_balance_after=0)) as broke:
        manifest = write_manifest(tmp_path, [job("edit-me")])
        outcome, _ = await run(manifest, broke)
        assert outcome.exit_code == 3
    manifest = write_manifest(tmp_path, [job("edit-me", "a different prompt")])
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, said = await run(manifest, sandbox)
    assert outcome.exit_code == 0, said
