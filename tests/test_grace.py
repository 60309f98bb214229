"""An early negative answer about a paid request is not final.

Queue APIs and object stores show a new request, or a finished job's outputs, a moment late. Whole runs
against the sandbox (its late-answer knobs), time simulated: each job is paid for once, by the server's
own count, and its video is downloaded.
"""

from __future__ import annotations

import io

import pytest
from helpers import (
    FakeClock,
    assert_done,
    assert_spend_consistent,
    jobs,
    model_input,
    old_ledger,
    results,
    run,
    write_manifest,
)

from batchrun.cli import main
from batchrun.ledger import Ledger
from batchrun.plan import RunOptions
from batchrun.sandbox import Faults, Sandbox

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16


@pytest.mark.parametrize(("faults", "kind"), [
    # The failing input: the first status call answers 404 404001, from the second on the job is known.
    (Faults(unknown_first_calls=1), "unknown_first_calls"),
    (Faults(unknown_first_calls=4), "unknown_first_calls"),
    # `completed` with no output and no error: the output is attached a moment later.
    (Faults(outputs_late_calls=2), "outputs_late_calls"),
    # A 404 on the result call just after completion.
    (Faults(result_404_after_completion=2), "result_404_after_completion"),
])
async def test_an_early_negative_answer_is_asked_again_and_the_job_collected(tmp_path, faults, kind):
    manifest = write_manifest(tmp_path, jobs(3), concurrency=3, poll_min_interval=1)
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(render_seconds=5, video_bytes=VIDEO, clock=clock, faults=faults) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        assert sandbox.faults_served[kind] >= 3  # every job met the fault
        rows = results(out)
        for job_id, row in rows.items():
            assert_done(out, row, VIDEO)
            assert row["submissions"] == 1 and row["request_ids"] == [row["request_id"]]
            assert sandbox.jobs_for(model_input(manifest, job_id)) == 1  # one paid job per job
        assert sandbox.posts_total == sandbox.jobs_created == 3
        assert_spend_consistent(outcome, out)
        assert abs(outcome.spent_usd - 1.26) < 1e-9


async def test_a_negative_answer_still_counts_the_money_until_it_is_believed(tmp_path):
    """While the grace window runs, the job is still queued in the ledger and its estimate is spent;
    a run leaving then (max_wait) leaves it for the next run, which collects it."""
    manifest = write_manifest(tmp_path, jobs(1), poll_min_interval=1, max_wait=20)
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(video_bytes=VIDEO, clock=clock, faults=Faults(unknown_first_calls=50)) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1, said
        row = results(out)["clip-00"]
        assert row["state"] == "queued" and row["request_id"]
        assert row["cost_usd"] == 0.42 and row["cost_source"] == "estimate"
        assert "spent in this output dir: $0.42" in outcome.lines[0]

        sandbox.faults = Faults()
        again, said = await run(write_manifest(tmp_path, jobs(1), poll_min_interval=1), sandbox, clock=clock)
        assert again.exit_code == 0, said
        assert_done(out, results(out)["clip-00"], VIDEO)
        assert sandbox.posts_total == 1


async def test_retry_failed_collects_a_request_that_turns_out_finished_instead_of_paying_again(tmp_path):
    """A job failed as "not found" (here: with no grace window at all) whose request is known after all:
    --retry-failed asks it first and downloads its video; nothing is POSTed again."""
    manifest = write_manifest(tmp_path, jobs(2), poll_min_interval=1, not_found_grace=0)
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(render_seconds=3, video_bytes=VIDEO, clock=clock,
                       faults=Faults(unknown_first_calls=3)) as sandbox:
        first, said = await run(manifest, sandbox, clock=clock)
        assert first.exit_code == 1, said
        rows = results(out)
        assert {r["state"] for r in rows.values()} == {"failed"}
        assert {r["error"]["kind"] for r in rows.values()} == {"not_found"}
        assert "--retry-failed" in rows["clip-00"]["error"]["message"]
        assert "spent in this output dir: $0.00" in first.lines[0]
        ids = {job_id: r["request_id"] for job_id, r in rows.items()}

        again, said = await run(manifest, sandbox, clock=clock, options=RunOptions(retry_failed=True))
        assert again.exit_code == 0, said
        assert "2 to ask again" in said
        for job_id, row in results(out).items():
            assert_done(out, row, VIDEO)
            assert row["request_id"] == ids[job_id] and row["request_ids"] == [ids[job_id]]
            assert row["submissions"] == 1
        assert sandbox.posts_total == sandbox.jobs_created == 2
        assert_spend_consistent(again, out)


async def test_retry_failed_resubmits_a_job_that_failed_remotely_and_keeps_its_old_request_id(tmp_path):
    manifest = write_manifest(tmp_path, [{"id": "bad", "prompt": "a storm [fail] at sea"}], poll_min_interval=1)
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(video_bytes=VIDEO, clock=clock) as sandbox:
        first, _ = await run(manifest, sandbox, clock=clock)
        assert first.exit_code == 1
        old = results(out)["bad"]["request_id"]
        again, _ = await run(manifest, sandbox, clock=clock, options=RunOptions(retry_failed=True))
        assert again.exit_code == 1
        row = results(out)["bad"]
        assert row["submissions"] == 2 and sandbox.jobs_created == 2
        assert row["request_ids"] == [old, row["request_id"]] and row["request_id"] != old
        status = io.StringIO()
        assert main(["status", str(out)], stdout=status, stderr=io.StringIO()) == 0
        assert f"(earlier requests: {old})" in status.getvalue()
        _ = main(["report", str(out)], stdout=io.StringIO(), stderr=io.StringIO())
        assert old in (out / "report.html").read_text(encoding="utf-8")


def test_an_older_ledger_keeps_its_request_ids_in_the_history_when_migrated(tmp_path):
    conn = old_ledger(tmp_path, 2)
    conn.execute("INSERT INTO jobs (id, state, model, input_json, input_sha256, request_id, submissions,"
                 " first_seen_at, submitted_at, updated_at) VALUES ('a', 'failed', 'm', '{}', 'x', 'r-old', 1,"
                 " 't', 't', 't')")
    conn.commit()
    conn.close()
    readonly = Ledger.open(tmp_path, readonly=True)  # not migrated: still readable
    try:
        assert readonly.get("a").request_ids == ("r-old",) and readonly.spend().total_usd == 0
    finally:
        readonly.close()
    ledger = Ledger.open(tmp_path)
    try:
        assert ledger.get("a").request_ids == ("r-old",)
        ledger.mark_submitting(["a"])
        ledger.mark_submitted("a", "r-new")
        row = ledger.get("a")
        assert row.request_id == "r-new" and row.request_ids == ("r-old", "r-new")
        assert [r.request_ids for r in ledger.all()] == [("r-old", "r-new")]
    finally:
        ledger.close()
