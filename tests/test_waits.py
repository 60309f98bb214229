"""Waiting the way the server asks, together: Retry-After against max_wait and Ctrl-C, HTTP-dates on the
server's clock, a 429 on one submit pausing every submit, and an API that cannot be reached at all.

Whole runs against the sandbox over loopback. Time is simulated, except where the point is that a real
wait ends early (signals) or that concurrent jobs wait together (an account-wide limit).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import socket
import time

import pytest
from helpers import TOKEN, FakeClock, ScaledClock, assert_done, jobs, results, run, write_manifest

from batchrun.cli import main
from batchrun.manifest import load_manifest
from batchrun.plan import RunOptions
from batchrun.run import run_manifest
from batchrun.sandbox import Faults, Sandbox

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16


def _status_json(out_dir) -> dict:
    stdout = io.StringIO()
    assert main(["status", str(out_dir), "--json"], stdout=stdout, stderr=io.StringIO()) == 0
    return json.loads(stdout.getvalue())


# -- max_wait and Ctrl-C bound every wait ------------------------------------------------------


async def test_a_huge_retry_after_on_submits_does_not_outlast_max_wait(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3), max_wait=5)
    clock = FakeClock()
    faults = Faults(rate_limit_every=1, retry_after="1000000000")
    async with Sandbox(video_bytes=VIDEO, clock=clock, faults=faults) as sandbox:
        started = clock.now()
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1, said
        assert clock.now() - started <= 5  # not the 300 s cap, once or per retry
        assert any("max_wait reached" in line for line in outcome.lines)
        rows = results(tmp_path / "out")
        assert {r["state"] for r in rows.values()} == {"pending"}
        assert all(r["request_id"] is None for r in rows.values())
        assert "spent in this output dir: $0.00" in outcome.lines[0]
        assert sandbox.jobs_created == 0


async def test_a_huge_retry_after_on_polls_does_not_outlast_max_wait(tmp_path):
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(render_seconds=1000, video_bytes=VIDEO, clock=clock) as sandbox:
        first, _ = await run(write_manifest(tmp_path, jobs(2), max_wait=5, poll_min_interval=1), sandbox,
                             clock=clock)
        assert first.exit_code == 1
        ids = {job_id: r["request_id"] for job_id, r in results(out).items()}
        sandbox.faults = Faults(rate_limit_every=1, retry_after="1000000000")
        started, naps = clock.now(), len(clock.sleeps)
        again, said = await run(write_manifest(tmp_path, jobs(2), max_wait=5, poll_min_interval=1), sandbox,
                                clock=clock)
        assert again.exit_code == 1, said
        # No wait outlasts max_wait. A FakeClock adds up naps that overlap in real time (each job's, taken
        # concurrently), so the run's fake duration is bounded by max_wait per job, not by max_wait alone.
        assert max(clock.sleeps[naps:]) <= 5
        assert clock.now() - started <= 5 * 2
        rows = results(out)
        assert {job_id: r["request_id"] for job_id, r in rows.items()} == ids  # kept for the next run
        assert {r["state"] for r in rows.values()} <= {"queued", "running"}
        assert sandbox.posts_total == 2


@pytest.mark.parametrize(("signum", "pressed"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
async def test_a_signal_ends_a_submit_waiting_out_a_429_at_once_and_nothing_is_spent(tmp_path, signum, pressed):
    """Real time: a submit refused with Retry-After: 1000 (waited up to the 300 s cap) is left at the first
    Ctrl-C or a SIGTERM. The job was never created: closing line and status both say $0.00."""
    manifest = write_manifest(tmp_path, jobs(2), concurrency=2)
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, faults=Faults(rate_limit_every=1, retry_after="1000")) as sandbox:

        async def signal_once_refused() -> None:
            while sandbox.posts_total < 1:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signum)

        killer = asyncio.create_task(signal_once_refused())
        started = time.monotonic()
        outcome = await run_manifest(load_manifest(manifest), base_url=sandbox.base_url, token=TOKEN,
                                     options=RunOptions(preflight=False), stream=io.StringIO(), progress=False,
                                     handle_signals=True)
        await killer
        assert time.monotonic() - started < 10, pressed
        assert outcome.exit_code == 130
        assert sandbox.jobs_created == 0
        assert {r["state"] for r in results(out).values()} == {"pending"}
        assert "spent in this output dir: $0.00" in outcome.lines[0]
        assert outcome.spent_usd == 0
    assert _status_json(out)["spent_usd"] == 0


async def test_ctrl_c_while_submits_wait_for_the_rate_limit_sends_none_of_them_and_records_nothing(tmp_path):
    """Real time: 12 jobs at 2 API calls per second; Ctrl-C once the first POSTs went. The jobs still
    waiting for their place in the rate limit had recorded no intent: none is sent, each stays pending
    with no attempt counted (not `unknown`, which would ask the user to look for a job never made)."""
    manifest = write_manifest(tmp_path, jobs(12), concurrency=12, requests_per_second=2)
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, render_seconds=0.0) as sandbox:

        async def interrupt_after_two_posts() -> None:
            while sandbox.posts_total < 2:
                await asyncio.sleep(0.005)
            os.kill(os.getpid(), signal.SIGINT)

        killer = asyncio.create_task(interrupt_after_two_posts())
        outcome = await run_manifest(load_manifest(manifest), base_url=sandbox.base_url, token=TOKEN,
                                     options=RunOptions(preflight=False), stream=io.StringIO(), progress=False,
                                     handle_signals=True)
        await killer
        posted = sandbox.posts_total
    assert outcome.exit_code == 130
    assert posted <= 3  # at most one more passed the limit as the signal came
    rows = results(out)
    assert sum(row["submissions"] for row in rows.values()) == posted
    assert sorted(row["state"] for row in rows.values()) == ["done"] * posted + ["pending"] * (12 - posted)


async def test_max_wait_ends_the_waits_for_the_rate_limit_too(tmp_path):
    """Real time: 12 jobs at 2 API calls per second, max_wait 1.2 s. The jobs still waiting for their place
    in the rate limit at the deadline are not sent (they all were, seconds past it) and stay pending."""
    manifest = write_manifest(tmp_path, jobs(12), concurrency=12, requests_per_second=2, max_wait=1.2)
    async with Sandbox(video_bytes=VIDEO, render_seconds=0.0) as sandbox:
        outcome, said = await run(manifest, sandbox)
        posted = sandbox.posts_total
    assert posted <= 5, said  # 2 at once, then one every 0.5 s until the deadline
    assert any("max_wait reached" in line for line in outcome.lines)
    rows = results(tmp_path / "out")
    assert sum(row["submissions"] for row in rows.values()) == posted
    assert [row["state"] for row in rows.values()].count("pending") == 12 - posted


# -- Retry-After as an HTTP-date is read on the server's clock ------------------------------------


@pytest.mark.parametrize("offset", [3600.0, -3600.0])
async def test_an_http_date_retry_after_is_measured_against_the_answers_date(tmp_path, offset):
    """The server's clock is an hour ahead (or behind): a Retry-After date 2 s after its own Date header
    means 2 s, not the 300 s cap (nor 0)."""
    manifest = write_manifest(tmp_path, jobs(3), concurrency=1)
    clock = FakeClock()
    faults = Faults(rate_limit_every=3, retry_after_in=2, clock_offset=offset)
    async with Sandbox(video_bytes=VIDEO, clock=clock, faults=faults) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock, rand=lambda: 0.0)
        assert outcome.exit_code == 0, said
        for row in results(tmp_path / "out").values():
            assert_done(tmp_path / "out", row, VIDEO)
        refused = sandbox.faults_served["rate_limit"]
        assert refused >= 2
        waits = [s for s in clock.sleeps if s > 0]
        assert sum(abs(s - 2.0) < 1e-6 for s in waits) == refused, waits
        assert max(waits) < 2.5


# -- an account-wide limit on submits -------------------------------------------------------------


@pytest.mark.parametrize(("n", "concurrency", "limit", "most_refused", "seed"), [
    # The first window refuses the slots it has no place for; then about one refusal per window: the
    # job that trips the limit pauses all the others, which then go one at a time for a while.
    # Without that (each job waiting on its own): 16-18 and 26-39 refused POSTs for these cases.
    (12, 4, 2, 9, 1),
    (12, 4, 2, 9, 2),
    (10, 8, 1, 18, 1),
])
async def test_a_429_on_a_submit_pauses_every_submit_and_they_come_back_spread(tmp_path, n, concurrency, limit,
                                                                               most_refused, seed):
    """The account may create `limit` jobs per 10 s and answers 429 with Retry-After (whole seconds to
    the next window). Time runs 100x faster but concurrently, because the point is jobs waiting
    together: refused POSTs stay few instead of every waiting job tripping the limit again at the same
    instant, and no job is left pending."""
    manifest = write_manifest(tmp_path, jobs(n), concurrency=concurrency)
    out = tmp_path / "out"
    clock = ScaledClock(speed=100)
    faults = Faults(submit_limit=limit, submit_window=10)
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=clock) as sandbox:
        outcome = await run_manifest(load_manifest(manifest), base_url=sandbox.base_url, token=TOKEN,
                                     options=RunOptions(preflight=False), stream=io.StringIO(), progress=False,
                                     handle_signals=False, rand=random.Random(seed).random, clock=clock.now,
                                     sleep=clock.sleep)
        assert outcome.exit_code == 0, outcome.lines
        rows = results(out)
        assert not [r for r in rows.values() if r["state"] == "pending"]
        for row in rows.values():
            assert_done(out, row, VIDEO)
        assert sandbox.jobs_created == n
        refused = sandbox.faults_served["submit_limit"]
        assert sandbox.posts_total == n + refused
        assert 1 <= refused <= most_refused, refused


# -- the API cannot be reached at all -------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_an_unreachable_api_stops_the_run_at_once_naming_the_url(tmp_path):
    """Connection refused for every call: after a few failures in a row across jobs, the run stops with
    one message naming the URL. Jobs in flight keep their request ids; nothing is failed or spent."""
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(render_seconds=1000, video_bytes=VIDEO, clock=clock) as sandbox:
        first, _ = await run(write_manifest(tmp_path, jobs(2), concurrency=2, max_wait=5, poll_min_interval=1),
                             sandbox, clock=clock)
        assert first.exit_code == 1
    in_flight = {job_id: r["request_id"] for job_id, r in results(out).items()}
    spent_before = _status_json(out)["spent_usd"]
    assert spent_before == pytest.approx(0.84)

    base = f"http://127.0.0.1:{_closed_port()}"
    stream = io.StringIO()
    started = clock.now()
    manifest = write_manifest(tmp_path, jobs(12), concurrency=4)
    outcome = await run_manifest(load_manifest(manifest), base_url=base, token=TOKEN,
                                 options=RunOptions(preflight=False), stream=stream, progress=False,
                                 handle_signals=False, clock=clock.now, sleep=clock.sleep)
    # Exit 1: jobs are not done and a later run picks every one of them up (SPEC's "ended with jobs not
    # done"); not 2, which promises that nothing was sent, while jobs of earlier runs are in flight.
    assert outcome.exit_code == 1
    assert clock.now() - started < 60  # not minutes of backoff per job
    said = stream.getvalue() + "\n".join(outcome.lines)
    named = [line for line in outcome.lines if f"cannot reach the API at {base}" in line]
    assert len(named) == 1 and named[0].startswith("stopped: ")
    assert TOKEN not in said
    rows = results(out)
    assert {job_id: rows[job_id]["request_id"] for job_id in in_flight} == in_flight
    assert {rows[job_id]["state"] for job_id in in_flight} <= {"queued", "running"}
    rest = [r for job_id, r in rows.items() if job_id not in in_flight]
    assert len(rest) == 10 and {r["state"] for r in rest} == {"pending"}
    assert all(r["submissions"] == 0 and r["error"] is None or r["error"]["kind"] == "transient" for r in rest)
    assert "spent in this output dir: $0.84" in outcome.lines[0]  # the two jobs in flight, nothing more
    assert _status_json(out)["spent_usd"] == pytest.approx(0.84)
