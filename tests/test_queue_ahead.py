"""`queue_ahead: N` and polling that follows the provider's queue, in whole runs against the sandbox.

The sandbox's own counters say what the provider saw: its peak of jobs in flight (rendering or queued),
the jobs it created, and the status/result calls it answered for a job while that job was still queued.
Time is simulated (a `FakeClock` for counts, a `ScaledClock` where jobs must wait together).
"""

from __future__ import annotations

import io

import pytest
from helpers import TOKEN, FakeClock, ScaledClock, assert_done, jobs, manifest_problems, results, run, write_manifest

from batchrun.manifest import load_manifest
from batchrun.plan import RunOptions
from batchrun.run import run_manifest
from batchrun.sandbox import Faults, Sandbox

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16


@pytest.mark.parametrize(("queue_ahead", "peak"), [(0, 3), (2, 5)])
async def test_queue_ahead_keeps_that_many_jobs_waiting_at_the_provider_and_never_more(tmp_path, queue_ahead, peak):
    """The provider renders 3 at once, like `concurrency`. With `queue_ahead: 2` it holds exactly 5 of the
    batch at its peak (3 rendering, 2 queued); without, never more than 3."""
    settings = {"queue_ahead": queue_ahead} if queue_ahead else {}
    manifest = write_manifest(tmp_path, jobs(12), concurrency=3, poll_min_interval=0.5, **settings)
    clock = FakeClock()
    async with Sandbox(capacity=3, render_seconds=5.0, video_bytes=VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        assert sandbox.peak_in_flight == peak
        assert sandbox.jobs_created == 12 and sandbox.posts_total == 12
        for row in results(tmp_path / "out").values():
            assert_done(tmp_path / "out", row, VIDEO)


async def test_jobs_queued_ahead_count_against_the_budget_before_they_are_sent(tmp_path):
    """$0.42 a job, a $1.70 budget: four fit. Queueing ahead does not send a fifth, however many slots
    it opens: each job is reserved against the budget before its POST."""
    manifest = write_manifest(tmp_path, jobs(8), concurrency=1, queue_ahead=5, budget_usd=1.7,
                              poll_min_interval=0.5)
    clock = FakeClock()
    async with Sandbox(capacity=1, render_seconds=5.0, video_bytes=VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code != 0, said
        assert sandbox.jobs_created == 4
        assert sandbox.peak_in_flight == 4
        rows = results(tmp_path / "out")
        assert sorted(r["state"] for r in rows.values()) == ["done"] * 4 + ["pending"] * 4
        assert any("budget" in line for line in outcome.lines)


async def _scaled_run(manifest, sandbox, clock) -> None:
    outcome = await run_manifest(load_manifest(manifest), base_url=sandbox.base_url, token=TOKEN,
                                 options=RunOptions(preflight=False), stream=io.StringIO(), progress=False,
                                 handle_signals=False, clock=clock.now, sleep=clock.sleep)
    assert outcome.exit_code == 0, outcome.lines


async def test_jobs_queued_ahead_are_not_polled_while_they_wait(tmp_path):
    """Renders of 40-60 s, polls allowed every 1-5 s. The jobs queued ahead are woken when one of ours is
    seen finished, not polled every few seconds while they wait: the provider answers few calls about a
    job still in its queue, and each job costs few calls in all."""
    n = 16
    manifest = write_manifest(tmp_path, jobs(n), concurrency=3, queue_ahead=2, poll_min_interval=1,
                              poll_max_interval=5)
    clock = ScaledClock(speed=200)
    async with Sandbox(capacity=3, render_seconds=(40.0, 60.0), seed=5, video_bytes=VIDEO, clock=clock) as sandbox:
        await _scaled_run(manifest, sandbox, clock)
        assert sandbox.peak_in_flight == 5
        queued_polls = sandbox.polls_by_state["in_queue"]
        # A job waits most of a render in the queue: polled every 5 s, that would be ~8 calls per job.
        assert queued_polls <= n, sandbox.polls_by_state
        calls = sandbox.calls["status"] + sandbox.calls["result"]
        assert calls <= 5 * n, sandbox.polls_by_state
    for row in results(tmp_path / "out").values():
        assert_done(tmp_path / "out", row, VIDEO)


async def test_before_any_render_is_seen_jobs_queued_ahead_wait_for_it_instead_of_polling(tmp_path):
    """A whole round queued ahead (3 rendering, 3 queued), renders of 40 s, polls allowed every 1-5 s. Until
    the first render is seen finished the run knows nothing of render times; the queued jobs wait for that
    (they are woken by it) and check at most once meanwhile (after the longest backoff), instead of backing
    off from 5 s (three calls each about a job still in the provider's queue)."""
    manifest = write_manifest(tmp_path, jobs(6), concurrency=3, queue_ahead=3, poll_min_interval=1,
                              poll_max_interval=5)
    clock = ScaledClock(speed=200)
    async with Sandbox(capacity=3, render_seconds=40.0, video_bytes=VIDEO, clock=clock) as sandbox:
        await _scaled_run(manifest, sandbox, clock)
        assert sandbox.peak_in_flight == 6
        assert sandbox.polls_by_state["in_queue"] <= 3, sandbox.polls_by_state
    for row in results(tmp_path / "out").values():
        assert_done(tmp_path / "out", row, VIDEO)


async def test_jobs_the_api_says_are_queued_behind_others_are_not_polled_until_their_turn(tmp_path):
    """The provider renders only 2 at once while the manifest allows 4 (another client shares the
    account): the API answers that 2 of them are queued, with their place. They are not polled again
    every few seconds while renders of ~50 s go on ahead of them."""
    n = 12
    manifest = write_manifest(tmp_path, jobs(n), concurrency=4, poll_min_interval=1, poll_max_interval=5)
    clock = ScaledClock(speed=200)
    async with Sandbox(capacity=2, render_seconds=(45.0, 55.0), seed=2, video_bytes=VIDEO, clock=clock) as sandbox:
        await _scaled_run(manifest, sandbox, clock)
        assert sandbox.peak_in_flight == 4
        assert sandbox.polls_by_state["in_queue"] <= n, sandbox.polls_by_state
    for row in results(tmp_path / "out").values():
        assert_done(tmp_path / "out", row, VIDEO)


@pytest.mark.parametrize("faults", [Faults(stamps="seconds"), Faults(stamps="none")])
async def test_coarse_or_missing_server_stamps_still_finish_every_job_with_few_calls(tmp_path, faults):
    """Whole-second stamps on renders of 9-11 s (or no stamps at all): what the client saw itself carries
    the learning; a spread the stamps show as zero is not believed, so polling does not hammer."""
    n = 16
    manifest = write_manifest(tmp_path, jobs(n), concurrency=4, queue_ahead=1, poll_min_interval=0.05,
                              poll_max_interval=5)
    clock = ScaledClock(speed=50)
    async with Sandbox(capacity=4, render_seconds=(9.0, 11.0), seed=4, video_bytes=VIDEO, clock=clock,
                       faults=faults) as sandbox:
        await _scaled_run(manifest, sandbox, clock)
        calls = sandbox.calls["status"] + sandbox.calls["result"]
        assert calls <= 5 * n, sandbox.polls_by_state
    for row in results(tmp_path / "out").values():
        assert_done(tmp_path / "out", row, VIDEO)


@pytest.mark.parametrize(("value", "message"), [
    ("-1", "queue_ahead: must be at least 0, got -1"),
    ("2.5", "queue_ahead: must be a whole number, got 2.5"),
    ("lots", "queue_ahead: must be a whole number, got 'lots'"),
    ("1001", "queue_ahead: must be at most 1000, got 1001"),
])
def test_a_bad_queue_ahead_is_one_clear_error_with_its_line(tmp_path, value, message):
    problems = manifest_problems(tmp_path, f"""\
        version: 1
        queue_ahead: {value}
        jobs:
          - prompt: a
            start_image_url: https://example.com/a.png
        """)
    assert problems == [f"2:14: {message}"]


def test_queue_ahead_defaults_to_off(tmp_path):
    manifest = write_manifest(tmp_path, jobs(1))
    assert load_manifest(manifest).settings.queue_ahead == 0
