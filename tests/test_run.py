"""Whole runs, in process: `run_manifest` against a real sandbox on loopback, time simulated.

Each test asserts what a user sees: exit codes, files and their bytes, results.jsonl, the ledger,
and what the sandbox (the "server") says it received and created.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from email.utils import formatdate

import pytest
from aiohttp import web
from helpers import (
    IMAGE,
    TOKEN,
    FakeClock,
    assert_done,
    assert_spend_consistent,
    job,
    jobs,
    ledger_rows,
    model_input,
    results,
    run,
    sha256,
    write_manifest,
)

from batchrun.ledger import Ledger
from batchrun.manifest import load_manifest
from batchrun.plan import RunOptions
from batchrun.run import run_manifest
from batchrun.sandbox import Faults, Sandbox

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40  # ~10 KB, distinct from the sample


# -- the happy path ----------------------------------------------------------------------------


async def test_happy_path_every_file_checked(tmp_path):
    manifest = write_manifest(tmp_path, [job("cliff"), job("harbor", duration=10), job("audio", generate_audio=True)])
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0, said
        assert outcome.counts == {"done": 3}
        assert_spend_consistent(outcome, out)
        rows = results(out)
        assert list(rows) == ["cliff", "harbor", "audio"]
        for row in rows.values():
            assert_done(out, row, VIDEO)
            assert row["submissions"] == 1
            assert sandbox.jobs[row["request_id"]].input == model_input(manifest, row["id"])
            assert sandbox.jobs_for(model_input(manifest, row["id"])) == 1
        # The API's own cost figures: 5 s and 10 s without audio, 5 s with audio.
        assert rows["cliff"]["cost_usd"] == 0.42
        assert rows["harbor"]["cost_usd"] == 0.84
        assert rows["audio"]["cost_usd"] == 0.63
        assert abs(outcome.spent_usd - 1.89) < 1e-9
        assert sandbox.posts_total == 3 and sandbox.jobs_created == 3
        # Exactly the files SPEC names, nothing half-written left behind.
        names = {p.name for p in out.iterdir()}
        expected = {"ledger.sqlite", "results.jsonl", "run.log", "run.lock", "report.html"}
        expected |= {f"{i}.mp4" for i in rows} | {f"{i}.json" for i in rows}
        assert expected <= names
        assert not [n for n in names if n.endswith((".part", ".tmp"))]
        assert names - expected <= {"ledger.sqlite-wal", "ledger.sqlite-shm"}
        ledger = ledger_rows(out)
        assert {r["state"] for r in ledger.values()} == {"done"}
        log = (out / "run.log").read_text(encoding="utf-8")
        assert "cliff: submitted as " + rows["cliff"]["request_id"] in log
        assert "3 jobs: done=3" in log


# -- re-running --------------------------------------------------------------------------------


async def test_rerun_skips_done_jobs_and_redownloads_damaged_files_without_resubmitting(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        first, _ = await run(manifest, sandbox)
        assert first.exit_code == 0
        request_ids = {i: r["request_id"] for i, r in results(out).items()}
        posts, results_calls = sandbox.posts_total, sandbox.calls["result"]

        again, said = await run(manifest, sandbox)
        assert again.exit_code == 0
        assert "0 to submit" in said and "3 already done" in said
        assert sandbox.posts_total == posts
        assert sandbox.calls["result"] == results_calls
        assert sandbox.calls["download"] == 3

        (out / "clip-00.mp4").unlink()
        damaged = bytearray(VIDEO)
        damaged[100] ^= 0xFF
        (out / "clip-01.mp4").write_bytes(bytes(damaged))
        (out / "clip-02.mp4").write_bytes(VIDEO[:-10])  # truncated

        repaired, said = await run(manifest, sandbox)
        assert repaired.exit_code == 0, said
        assert sandbox.posts_total == posts and sandbox.jobs_created == 3
        rows = results(out)
        for job_id, row in rows.items():
            assert_done(out, row, VIDEO)
            assert row["request_id"] == request_ids[job_id]
            assert row["submissions"] == 1
        assert sandbox.calls["download"] == 6


async def test_spend_stays_consistent_when_the_api_cost_differs_from_the_estimate(tmp_path):
    # A manifest price far above the API's ($1.00 vs $0.42 for 5 s): the API's figure wins once known.
    manifest = write_manifest(tmp_path, jobs(2), price={"usd_per_second": 0.2, "usd_per_second_with_audio": 0.3})
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        first, _ = await run(manifest, sandbox)
        assert first.exit_code == 0
        assert abs(first.spent_usd - 0.84) < 1e-9
        assert [r["cost_usd"] for r in results(out).values()] == [0.42, 0.42]
        (out / "clip-00.mp4").unlink()
        again, said = await run(manifest, sandbox)
        assert again.exit_code == 0, said
        assert_done(out, results(out)["clip-00"], VIDEO)
        assert abs(again.spent_usd - 0.84) < 1e-9
        assert_spend_consistent(again, out)
        assert "spent in this output dir: $0.84" in again.lines[0]
        assert sandbox.posts_total == 2


# -- sandbox fault knobs -----------------------------------------------------------------------


async def test_rate_limits_with_retry_after_seconds_are_honoured(tmp_path):
    manifest = write_manifest(tmp_path, jobs(4), concurrency=2)
    clock = FakeClock()
    faults = Faults(rate_limit_every=3, retry_after="7")
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock, rand=lambda: 0.0)
        assert outcome.exit_code == 0, said
        rows = results(tmp_path / "out")
        for row in rows.values():
            assert_done(tmp_path / "out", row, VIDEO)
        # Every 429 was waited out for as long as the server asked (backoff alone is 0 with rand=0).
        api_calls = sum(sandbox.calls[k] for k in ("submit", "status", "result", "cancel"))
        assert api_calls >= 12
        assert clock.sleeps.count(7.0) == api_calls // 3
        assert sandbox.jobs_created == 4
        for job_id in rows:
            assert sandbox.jobs_for(model_input(manifest, job_id)) == 1


async def test_rate_limits_with_retry_after_http_date_are_honoured(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3), concurrency=1)
    clock = FakeClock()
    faults = Faults(rate_limit_every=2, retry_after=formatdate(time.time() + 30, usegmt=True))
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock, rand=lambda: 0.0)
        assert outcome.exit_code == 0, said
        for row in results(tmp_path / "out").values():
            assert_done(tmp_path / "out", row, VIDEO)
        waits = [s for s in clock.sleeps if s > 20]
        assert waits and all(s <= 31 for s in waits)
        assert sandbox.jobs_created == 3


@pytest.mark.parametrize(("faults", "kind", "seed"), [
    (Faults(error_5xx_rate=0.3), "5xx", 3),
    (Faults(http200_error_rate=0.5), "http200_error", 5),
])
async def test_server_errors_and_http_200_error_bodies_are_retried(tmp_path, faults, kind, seed):
    manifest = write_manifest(tmp_path, jobs(8))
    clock = FakeClock()
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=clock, seed=seed) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        for row in results(tmp_path / "out").values():
            assert_done(tmp_path / "out", row, VIDEO)
            assert row["submissions"] == 1
        assert sandbox.jobs_created == 8
        assert sandbox.faults_served[kind] >= 2


async def test_once_durations_are_learned_a_finished_job_costs_one_poll(tmp_path):
    """Jobs of a steady 10 s: after the first, each is asked once, with the result call, when it is due."""
    manifest = write_manifest(tmp_path, jobs(6), concurrency=1, poll_min_interval=1, poll_max_interval=30)
    clock = FakeClock()
    async with Sandbox(render_seconds=10, video_bytes=VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        for row in results(tmp_path / "out").values():
            assert_done(tmp_path / "out", row, VIDEO)
        # The first job, with nothing learned yet, is probed after 1, 1.25, 1.56, 1.95, 2.44 and 3.05 s
        # (11.3 s in all) and then fetched; every later job is asked once, with the result call, at 10 s.
        assert sandbox.calls["status"] == 6
        assert sandbox.calls["result"] == 6


@pytest.mark.parametrize("refusal", [404, 409, 400])
async def test_an_api_refusing_result_for_unfinished_jobs_falls_back_to_status(tmp_path, refusal):
    """The docs say result answers the current status while a job runs. If an API refuses it instead,
    no paid job may be failed for it: the run goes back to status polls and collects everything."""
    manifest = write_manifest(tmp_path, jobs(8), concurrency=2, poll_min_interval=0.5)
    clock = FakeClock()
    renders = iter([10, 10, 10, 10, 30, 30, 30, 30])
    faults = Faults(result_refused_until_finished=refusal)
    async with Sandbox(render_seconds=lambda _rng: next(renders), video_bytes=VIDEO, clock=clock,
                       faults=faults) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        rows = results(tmp_path / "out")
        for row in rows.values():
            assert_done(tmp_path / "out", row, VIDEO)
            assert row["submissions"] == 1
        # Refused at most once per job in flight (2) at that moment; after that the run asks status.
        assert 1 <= sandbox.faults_served["result_refused"] <= 2
        assert sandbox.posts_total == sandbox.jobs_created == 8


async def test_cut_downloads_resume_and_expired_urls_are_refreshed_without_resubmitting(tmp_path):
    """A cut download is retried after a backoff, by which time its URL has expired: the run asks the
    result call for a fresh URL and resumes the .part; nothing is ever submitted twice."""
    # One download at a time, so that mostly a download's own backoff moves the shared fake clock.
    manifest = write_manifest(tmp_path, jobs(6), concurrency=1)
    clock = FakeClock()
    faults = Faults(cut_download_rate=0.4, cut_after_bytes=3000, url_ttl=0.5)
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=clock, seed=0) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock, rand=lambda: 1.0,
                                  options=RunOptions(download_concurrency=1))
        assert outcome.exit_code == 0, said
        rows = results(tmp_path / "out")
        for row in rows.values():
            assert_done(tmp_path / "out", row, VIDEO)
            assert row["submissions"] == 1
        assert sandbox.posts_total == 6 and sandbox.jobs_created == 6
        # Some downloads were cut and repeated, and some URLs were minted more than once.
        assert sandbox.calls["download"] > 6
        refreshed = [j for j in sandbox.jobs.values() if j.urls_minted > 1]
        assert refreshed
        assert "fetching a fresh one" in (tmp_path / "out" / "run.log").read_text(encoding="utf-8")


async def test_cut_downloads_are_resumed(tmp_path):
    manifest = write_manifest(tmp_path, jobs(6))
    clock = FakeClock()
    faults = Faults(cut_download_rate=0.5, cut_after_bytes=4096)
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=clock, seed=2) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        for row in results(tmp_path / "out").values():
            assert_done(tmp_path / "out", row, VIDEO)
        assert sandbox.calls["download"] > 6
        assert all(j.urls_minted == 1 for j in sandbox.jobs.values())  # no URL expiry involved
        assert sandbox.jobs_created == 6


async def test_a_download_that_failed_for_good_is_finished_by_the_next_run(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2), max_attempts=2)
    out = tmp_path / "out"
    clock = FakeClock()
    faults = Faults(cut_download_rate=1.0, cut_after_bytes=2048)
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=clock) as sandbox:
        first, said = await run(manifest, sandbox, clock=clock)
        assert first.exit_code == 1
        rows = results(out)
        for row in rows.values():
            assert row["state"] == "downloading" and row["request_id"] and row["outputs"] == []
            assert "next run tries the download again" in row["error"]["message"]
            assert not (out / f"{row['id']}.mp4").exists()
            # Two attempts of 2048 bytes each, the second resumed with Range; kept for the next run.
            assert (out / f"{row['id']}.mp4.part").stat().st_size == 4096
        downloads = sandbox.calls["download"]

        sandbox.faults = Faults()  # the storage host recovers
        again, said = await run(manifest, sandbox, clock=clock)
        assert again.exit_code == 0, said
        assert "2 to download" in said
        for row in results(out).values():
            assert_done(out, row, VIDEO)
            assert row["submissions"] == 1
        assert sandbox.posts_total == 2 and sandbox.jobs_created == 2
        assert sandbox.calls["download"] == downloads + 2


async def test_failed_jobs_are_reported_and_not_retried_without_the_flag(tmp_path):
    manifest = write_manifest(tmp_path, [job("good"), job("bad", prompt="a storm [fail] at sea")])
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 1
        rows = results(out)
        assert_done(out, rows["good"], VIDEO)
        bad = rows["bad"]
        assert bad["state"] == "failed"
        assert bad["request_id"] and bad["submissions"] == 1
        assert bad["error"]["message"] == "content policy violation (sandbox)"
        assert bad["outputs"] == []
        assert not (out / "bad.mp4").exists()
        assert any("bad: failed" in line and "content policy violation" in line for line in outcome.lines)
        assert outcome.counts == {"done": 1, "failed": 1}
        # The failed job cost nothing (the API says $0): the spend reported is the good job's alone.
        assert bad["cost_usd"] == 0.0
        assert abs(outcome.spent_usd - 0.42) < 1e-9
        assert_spend_consistent(outcome, out)

        again, said = await run(manifest, sandbox)
        assert again.exit_code == 1
        assert "1 held" in said
        assert sandbox.posts_total == 2

        retried, _ = await run(manifest, sandbox, options=RunOptions(retry_failed=True))
        assert retried.exit_code == 1
        assert sandbox.jobs_for(model_input(manifest, "bad")) == 2
        assert results(out)["bad"]["submissions"] == 2
        assert sandbox.jobs_for(model_input(manifest, "good")) == 1


async def test_odd_statuses_count_as_running(tmp_path):
    # Polls at most 1 s apart, so that every job is asked while it renders: before anything is learned,
    # only the first job probes, and the fake clock adds the others' waits up one after the other.
    manifest = write_manifest(tmp_path, jobs(3), poll_min_interval=0.5, poll_max_interval=1)
    clock = FakeClock()
    faults = Faults(odd_statuses=True)
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=clock, render_seconds=10) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        rows = results(tmp_path / "out")
        for row in rows.values():
            assert_done(tmp_path / "out", row, VIDEO)
            assert row["remote_status"] == "completed"
            assert row["started_at"]
        assert sandbox.jobs_created == 3


# -- a lost submit answer ----------------------------------------------------------------------


async def test_lost_submit_answer_is_unknown_and_only_resubmitted_when_asked(tmp_path):
    manifest = write_manifest(tmp_path, [job("lost"), job("fine")], concurrency=1)
    out = tmp_path / "out"
    lost_input = model_input(manifest, "lost")
    async with Sandbox(video_bytes=VIDEO, faults=Faults(lose_submit_answer=1)) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 1
        rows = results(out)
        assert rows["lost"]["state"] == "unknown"
        assert rows["lost"]["request_id"] is None
        assert rows["lost"]["submissions"] == 1
        assert rows["lost"]["error"]["kind"] == "unknown"
        assert_done(out, rows["fine"], VIDEO)
        assert sandbox.jobs_for(lost_input) == 1  # the server did create it
        assert sandbox.posts_for(lost_input) == 1  # and it was never POSTed again
        assert any("lost: unknown" in line for line in outcome.lines)
        assert_spend_consistent(outcome, out)

        again, said = await run(manifest, sandbox)
        assert again.exit_code == 1
        assert "--resubmit-unknown" in said
        assert "'batchrun adopt MANIFEST lost REQUEST_ID' collects it" in said  # the way that pays nothing again
        assert sandbox.posts_for(lost_input) == 1
        assert results(out)["lost"]["state"] == "unknown"

        resubmitted, said = await run(manifest, sandbox, options=RunOptions(resubmit_unknown=True))
        assert resubmitted.exit_code == 0, said
        rows = results(out)
        assert_done(out, rows["lost"], VIDEO)
        assert rows["lost"]["submissions"] == 2
        assert sandbox.jobs_for(lost_input) == 2
        assert sandbox.jobs_for(model_input(manifest, "fine")) == 1


async def test_a_resubmit_refused_keeps_the_job_unknown_so_no_later_run_pays_for_it_again(tmp_path):
    """`--resubmit-unknown`, and the API refuses that POST (429) until max_wait: it created nothing, but
    the job's first POST may have. It stays `unknown` with its error: a plain run holds it, and `adopt`
    can still attach the job the first POST made. (It went `pending`, and the next run paid again.)"""
    manifest = write_manifest(tmp_path, [job("lost")], concurrency=1, max_wait=5)
    out = tmp_path / "out"
    lost_input = model_input(manifest, "lost")
    clock = FakeClock()
    async with Sandbox(video_bytes=VIDEO, faults=Faults(lose_submit_answer=1), clock=clock) as sandbox:
        await run(manifest, sandbox, clock=clock)
        before = results(out)["lost"]
        assert before["state"] == "unknown" and sandbox.jobs_for(lost_input) == 1

        sandbox.faults.rate_limit_every, sandbox.faults.retry_after = 1, "1000"
        refused, said = await run(manifest, sandbox, clock=clock, options=RunOptions(resubmit_unknown=True))
        row = results(out)["lost"]
        assert sandbox.posts_for(lost_input) == 2 and sandbox.jobs_for(lost_input) == 1
        assert row["state"] == "unknown" and row["error"] == before["error"], said
        assert row["submissions"] == 2  # the refused POST was sent: it counts

        sandbox.faults.rate_limit_every = 0
        again, said = await run(manifest, sandbox, clock=clock)
        assert sandbox.posts_for(lost_input) == 2  # held, not paid for again
        assert results(out)["lost"]["state"] == "unknown"
        assert "'batchrun adopt MANIFEST lost REQUEST_ID' collects it" in said


async def test_a_resubmit_rejected_as_invalid_keeps_the_job_unknown(tmp_path):
    """`--resubmit-unknown`, and an API that now rejects the input (422): nothing new was created, but the
    first POST may have made a job. The job stays `unknown` (not `failed`): adopt still collects it."""
    manifest = write_manifest(tmp_path, [job("lost")], concurrency=1)
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, faults=Faults(lose_submit_answer=1)) as sandbox:
        await run(manifest, sandbox)
    before = results(out)["lost"]
    assert before["state"] == "unknown"

    posts = []

    async def reject(request: web.Request) -> web.Response:
        posts.append(request.path)
        return web.json_response({"error_code": 422001, "error_message": "validation error: prompt"}, status=422)

    async def balance(request: web.Request) -> web.Response:
        return web.json_response({"balance_usd": 100.0, "balance_microdollars": 100_000_000, "currency": "USD"})

    app = web.Application()
    app.router.add_post("/v1/models/{path:.*}", reject)
    app.router.add_get("/prod/v2/balance", balance)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        outcome = await run_manifest(load_manifest(manifest), base_url=base, token=TOKEN,
                                     options=RunOptions(preflight=False, resubmit_unknown=True),
                                     stream=io.StringIO(), progress=False)
    finally:
        await runner.cleanup()
    assert len(posts) == 1 and outcome.exit_code != 0
    row = results(out)["lost"]
    assert row["state"] == "unknown" and row["error"] == before["error"]


# -- the concurrency cap -----------------------------------------------------------------------


async def test_concurrency_cap_holds_and_is_used(tmp_path):
    manifest = write_manifest(tmp_path, jobs(12), concurrency=3, poll_min_interval=0.5)
    clock = FakeClock()
    async with Sandbox(capacity=10, render_seconds=5.0, video_bytes=VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        assert sandbox.peak_in_flight == 3
        assert sandbox.jobs_created == 12
        for row in results(tmp_path / "out").values():
            assert_done(tmp_path / "out", row, VIDEO)


async def test_concurrency_cap_holds_with_uneven_render_times(tmp_path):
    manifest = write_manifest(tmp_path, jobs(10), concurrency=2, poll_min_interval=0.5)
    clock = FakeClock()
    async with Sandbox(capacity=8, render_seconds=lambda rng: rng.uniform(1, 20), clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        assert sandbox.peak_in_flight == 2
        assert sandbox.jobs_created == 10


# -- auth and balance --------------------------------------------------------------------------


async def test_wrong_token_stops_submitting_with_exit_3(tmp_path):
    manifest = write_manifest(tmp_path, jobs(6), concurrency=2)
    async with Sandbox(token="right") as sandbox:
        outcome, said = await run(manifest, sandbox, token="wrong")
        assert outcome.exit_code == 3
        assert sandbox.jobs_created == 0
        assert sandbox.posts_total <= 2
        rows = results(tmp_path / "out")
        assert {r["state"] for r in rows.values()} == {"pending"}
        assert all(r["request_id"] is None for r in rows.values())
        assert any("stopped by the API" in line for line in outcome.lines)


async def test_no_balance_stops_submitting_and_collects_what_was_accepted(tmp_path):
    manifest = write_manifest(tmp_path, jobs(6), concurrency=2, poll_min_interval=0.5)
    clock = FakeClock()
    faults = Faults(no_balance_after=2)
    async with Sandbox(video_bytes=VIDEO, faults=faults, render_seconds=3, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 3
        rows = results(tmp_path / "out")
        done = [r for r in rows.values() if r["state"] == "done"]
        assert len(done) == 2
        for row in done:
            assert_done(tmp_path / "out", row, VIDEO)
        rest = [r for r in rows.values() if r["state"] != "done"]
        assert {r["state"] for r in rest} == {"pending"}
        assert all(r["request_id"] is None for r in rest)
        assert sandbox.jobs_created == 2
        assert sandbox.posts_total <= 4  # at most one refused POST per slot
        assert outcome.counts == {"done": 2, "pending": 4}
        assert_spend_consistent(outcome, tmp_path / "out")


# -- the budget --------------------------------------------------------------------------------


async def test_budget_stops_posts_at_the_cap(tmp_path):
    # Each job is estimated at $0.42 (5 s without audio): a $1.00 budget covers two of them.
    manifest = write_manifest(tmp_path, jobs(6), concurrency=4, budget_usd=1.0)
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 1
        assert sandbox.posts_total == 2
        rows = results(out)
        assert sum(r["state"] == "done" for r in rows.values()) == 2
        pending = [r for r in rows.values() if r["state"] == "pending"]
        assert len(pending) == 4
        assert all(r["submissions"] == 0 and r["request_id"] is None for r in pending)
        assert outcome.spent_usd <= 1.0
        assert any("budget reached" in line and "over $1.00" in line for line in outcome.lines)
        assert_spend_consistent(outcome, out)

        # The spend is remembered: the next run in this output dir submits nothing more.
        again, _ = await run(manifest, sandbox)
        assert again.exit_code == 1
        assert sandbox.posts_total == 2


# -- misc contract points ----------------------------------------------------------------------


async def test_changed_input_after_submission_is_refused(tmp_path):
    manifest = write_manifest(tmp_path, [job("a"), job("b")])
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        first, _ = await run(manifest, sandbox)
        assert first.exit_code == 0
        manifest = write_manifest(tmp_path, [job("a"), job("b", prompt="something else entirely")])
        second, said = await run(manifest, sandbox)
        assert second.exit_code == 1
        assert "input changed after it was submitted" in said
        assert sandbox.posts_total == 2


async def test_output_files_are_private_where_it_matters(tmp_path):
    manifest = write_manifest(tmp_path, jobs(1))
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
    mode = os.stat(tmp_path / "out" / "ledger.sqlite").st_mode & 0o777
    assert mode == 0o600
    record = json.loads((tmp_path / "out" / "clip-00.json").read_text(encoding="utf-8"))
    assert record["input"] == {"duration": 5, "generate_audio": False, "start_image_url": IMAGE,
                               "prompt": "waves crash below (clip-00)"}
    assert record["outputs"][0]["sha256"] == sha256(VIDEO)


# -- leaving early -----------------------------------------------------------------------------


async def test_max_wait_leaves_jobs_in_flight_for_the_next_run(tmp_path):
    manifest = write_manifest(tmp_path, jobs(4), concurrency=2, poll_min_interval=1, poll_max_interval=5,
                              max_wait=30)
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(capacity=4, render_seconds=1000, video_bytes=VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1
        assert any("max_wait reached" in line for line in outcome.lines)
        assert clock.now() < 1000 + 100  # it left long before the renders ended
        rows = results(out)
        in_flight = [r for r in rows.values() if r["submissions"]]
        assert len(in_flight) == 2 and sandbox.posts_total == 2
        assert all(r["state"] in ("queued", "running") and r["request_id"] for r in in_flight)
        assert sorted(r["state"] for r in rows.values() if not r["submissions"]) == ["pending", "pending"]

        manifest = write_manifest(tmp_path, jobs(4), concurrency=2, poll_min_interval=1, poll_max_interval=5)
        again, said = await run(manifest, sandbox, clock=clock)
        assert again.exit_code == 0, said
        assert "2 to submit, 2 to resume" in said
        for row in results(out).values():
            assert_done(out, row, VIDEO)
            assert row["submissions"] == 1
        assert sandbox.posts_total == 4 and sandbox.jobs_created == 4


async def test_sigterm_leaves_now_even_with_resumed_jobs_waiting_for_a_slot(tmp_path):
    """SIGTERM means leave now: jobs resumed from the ledger that have not been polled yet must not
    be started after it, and every job stays recorded with its request id."""
    out = tmp_path / "out"
    clock = FakeClock()
    settings = {"poll_min_interval": 1, "poll_max_interval": 5}
    async with Sandbox(capacity=8, render_seconds=1000, video_bytes=VIDEO, clock=clock) as sandbox:
        manifest = write_manifest(tmp_path, jobs(6), concurrency=6, max_wait=5, **settings)
        first, _ = await run(manifest, sandbox, clock=clock)
        assert first.exit_code == 1
        request_ids = {i: r["request_id"] for i, r in results(out).items()}
        assert all(request_ids.values()) and sandbox.posts_total == 6

        manifest = write_manifest(tmp_path, jobs(6), concurrency=1, **settings)
        polled = sandbox.calls["status"]

        async def terminate_once_polling() -> None:
            while sandbox.calls["status"] == polled:
                await asyncio.sleep(0.005)
            os.kill(os.getpid(), signal.SIGTERM)

        killer = asyncio.create_task(terminate_once_polling())
        outcome, said = await run(manifest, sandbox, clock=clock, handle_signals=True)
        await killer
        assert outcome.exit_code == 130
        rows = results(out)
        assert {i: r["request_id"] for i, r in rows.items()} == request_ids
        assert sum(r["state"] in ("queued", "running") for r in rows.values()) >= 5
        assert sandbox.posts_total == 6
        assert any("interrupted" in line for line in outcome.lines)


async def test_ctrl_c_after_the_budget_was_reached_still_exits_130(tmp_path):
    manifest = write_manifest(tmp_path, jobs(4), concurrency=4, budget_usd=1.0, poll_min_interval=1)
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(render_seconds=100, video_bytes=VIDEO, clock=clock) as sandbox:

        async def interrupt_once_polling() -> None:
            while sandbox.calls["status"] < 2:
                await asyncio.sleep(0.005)
            os.kill(os.getpid(), signal.SIGINT)

        killer = asyncio.create_task(interrupt_once_polling())
        outcome, said = await run(manifest, sandbox, clock=clock, handle_signals=True)
        await killer
        assert "stopping: no new jobs" in said
        assert outcome.exit_code == 130
        rows = results(out)
        assert sorted(r["state"] for r in rows.values()) == ["done", "done", "pending", "pending"]
        assert sandbox.posts_total == 2


async def test_a_run_that_died_mid_submit_leaves_the_job_unknown(tmp_path):
    """The intent was committed, then the process died before the POST's answer: the job may exist."""
    manifest = write_manifest(tmp_path, [job("a"), job("b")])
    out = tmp_path / "out"
    out.mkdir()
    loaded = load_manifest(manifest)
    ledger = Ledger.open(out)
    ledger.add_pending((j.id, loaded.model.model_id, j.input, j.input_sha256, 0.42) for j in loaded.jobs)
    ledger.mark_submitting(["a"])
    ledger.close()
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 1
        rows = results(out)
        assert rows["a"]["state"] == "unknown" and rows["a"]["submissions"] == 1
        assert rows["a"]["error"]["kind"] == "unknown"
        assert_done(out, rows["b"], VIDEO)
        assert sandbox.posts_for(model_input(manifest, "a")) == 0
        again, _ = await run(manifest, sandbox, options=RunOptions(resubmit_unknown=True))
        assert again.exit_code == 0
        assert results(out)["a"]["submissions"] == 2
        assert sandbox.jobs_for(model_input(manifest, "a")) == 1


async def test_job_timeout_cancels_queued_jobs_and_keeps_running_ones(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2), concurrency=2, job_timeout=60, poll_min_interval=1,
                              poll_max_interval=10)
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(capacity=1, render_seconds=500, video_bytes=VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1
        rows = results(out)
        running, queued = rows["clip-00"], rows["clip-01"]
        assert running["state"] == "running" and running["error"]["kind"] == "timeout"
        assert running["request_id"] in running["error"]["message"]
        assert queued["state"] == "cancelled" and queued["error"]["kind"] == "timeout"
        assert sandbox.jobs[queued["request_id"]].status == "cancelled"
        assert abs(outcome.spent_usd - 0.42) < 1e-9  # the cancelled job is not counted
        assert_spend_consistent(outcome, out)

        clock.advance(1000)  # the render has finished meanwhile
        again, said = await run(manifest, sandbox, clock=clock)
        assert again.exit_code == 1  # the cancelled job needs --retry-failed
        assert_done(out, results(out)["clip-00"], VIDEO)
        assert results(out)["clip-00"]["submissions"] == 1
        assert sandbox.posts_total == 2
