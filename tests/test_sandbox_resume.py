"""An interrupted `--sandbox` run resumed in a new process meets a new sandbox that knows none of its
request ids: no job may be matched to another job's result, and no two jobs may share a request id."""

from __future__ import annotations

import signal

from helpers import jobs, ledger_rows, results, write_manifest
from proc_helpers import batchrun, start, wait_for


def _request_ids(out) -> dict[str, str]:
    try:
        return {job_id: row["request_id"] for job_id, row in ledger_rows(out).items() if row["request_id"]}
    except Exception:  # noqa: BLE001 - the ledger may not exist yet
        return {}


def _interrupted_sandbox_run(tmp_path, sig: int) -> tuple[object, str]:
    """A `--sandbox` run of 4 jobs, given `sig` once two are in flight: (process, what it printed)."""
    manifest = write_manifest(tmp_path, jobs(4), concurrency=2, poll_min_interval=0.1, poll_max_interval=0.3,
                              requests_per_second=100)
    first = start("run", str(manifest), "--sandbox", "--no-progress", cwd=tmp_path)
    try:
        wait_for(lambda: len(_request_ids(tmp_path / "out")) >= 2, 15, "two jobs in flight")
        first.send_signal(sig)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    return first, stdout + stderr


def test_a_resumed_sandbox_run_never_takes_another_jobs_result(tmp_path):
    out = tmp_path / "out"
    first, said = _interrupted_sandbox_run(tmp_path, signal.SIGTERM)  # leave now: both stay in flight, recorded
    assert first.returncode == 130, said
    manifest = tmp_path / "batch.yaml"
    old = _request_ids(out)
    assert len(old) == 2

    again = batchrun("run", str(manifest), "--sandbox", "--no-progress", cwd=tmp_path)
    assert again.returncode == 1, again.stderr
    assert "Traceback" not in again.stderr
    rows = results(out)
    ids = [row["request_id"] for row in rows.values()]
    assert len(set(ids)) == 4, ids  # every job its own request
    for job_id, request_id in old.items():
        # The new sandbox never heard of it: the existing rule for a vanished request applies.
        assert rows[job_id]["request_id"] == request_id
        assert rows[job_id]["state"] == "failed", rows[job_id]
        assert "no longer knows request" in rows[job_id]["error"]["message"]
        assert rows[job_id]["outputs"] == []
        assert not (out / f"{job_id}.mp4").exists()
    for job_id in rows.keys() - old.keys():
        assert rows[job_id]["state"] == "done" and rows[job_id]["submissions"] == 1


def test_an_interrupted_sandbox_run_says_its_jobs_in_flight_cannot_be_resumed_by_another_sandbox(tmp_path):
    """The closing lines of an interrupted --sandbox run never promise that the next run picks its jobs up."""
    first, said = _interrupted_sandbox_run(tmp_path, signal.SIGINT)
    assert first.returncode == 130, said
    assert "this --sandbox ends with the process" in said and "'batchrun sandbox' in another terminal" in said
