"""The per-job hot path of a run (issue 13): the ledger's group commit, downloads made durable in
batches, and provenance files written in batches, each with the promise it must keep."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from crash_harness import make_harness
from helpers import jobs, mp4, run, write_manifest

from batchrun.download import _Durability, download
from batchrun.ledger import LEDGER_NAME, Ledger, LedgerWriteError, Output
from batchrun.provenance import ProvenanceWriter
from batchrun.results import provenance_intact
from batchrun.sandbox import Sandbox

INPUT = {"prompt": "waves", "start_image_url": "https://example.com/a.png", "duration": 5}
MODEL = "kling/kling-3.0/standard/image-to-video"


def _add(ledger: Ledger, *ids: str) -> None:
    ledger.add_pending((i, MODEL, INPUT, f"sha-{i}", 0.42) for i in ids)


def _on_disk(folder: Path) -> dict[str, tuple[str, str | None]]:
    """What another process reading the ledger sees: id -> (state, request_id)."""
    conn = sqlite3.connect(f"file:{folder / LEDGER_NAME}?mode=ro", uri=True)
    try:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, state, request_id FROM jobs")}
    finally:
        conn.close()


async def test_writes_of_one_turn_share_one_commit_and_an_intent_is_on_disk_before_its_wait_ends(tmp_path):
    ledger = Ledger.open(tmp_path)
    ids = [f"j{i}" for i in range(6)]
    _add(ledger, *ids)
    with ledger.group_commits():
        before = ledger.commits
        waits = [ledger.mark_submitting_soon(job_id) for job_id in ids]  # six jobs about to POST, one turn
        assert {_on_disk(tmp_path)[i][0] for i in ids} == {"pending"}  # nothing committed yet
        await asyncio.gather(*waits)
        assert ledger.commits == before + 1  # one (FULL) commit carried all six intents
        assert {_on_disk(tmp_path)[i][0] for i in ids} == {"submitting"}

        # The POST answers of one turn share the commit at the end of the turn.
        for i, job_id in enumerate(ids):
            ledger.mark_submitted(job_id, f"req-{i}")
        assert {_on_disk(tmp_path)[i][0] for i in ids} == {"submitting"}  # not before the end of the turn
        await asyncio.sleep(0)
        assert ledger.commits == before + 2  # one commit carried all six request ids
        assert all(_on_disk(tmp_path)[job_id] == ("queued", f"req-{i}") for i, job_id in enumerate(ids))

        # Writes with no intent after them get a commit of their own within ride_seconds.
        ledger.set_state("j0", "downloading", output_urls=["https://x/v.mp4"])
        ledger.mark_done("j0", [Output(0, "j0.mp4", 10, "f" * 64)])
        ledger.record_remote("j1", "in_progress", "running", started=True)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert _on_disk(tmp_path)["j0"][0] == "queued"  # still waiting for a commit to ride
        await asyncio.sleep(ledger.ride_seconds * 3)
        assert ledger.commits == before + 3
        assert _on_disk(tmp_path)["j0"][0] == "done" and _on_disk(tmp_path)["j1"][0] == "running"

        # ... and ride an intent's commit when one comes first.
        _add(ledger, "k")
        ledger.set_error("j2", "remote", "slow storage")
        committed = ledger.commits
        await ledger.mark_submitting_soon("k")
        assert ledger.commits == committed + 1
        rows = _on_disk(tmp_path)
        assert rows["k"][0] == "submitting" and rows["j2"] == ("queued", "req-2")
    ledger.close()
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    assert conn.execute("SELECT error_kind FROM jobs WHERE id='j2'").fetchone() == ("remote",)
    conn.close()


def _submissions(folder: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{folder / LEDGER_NAME}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT id, submissions FROM jobs"))
    finally:
        conn.close()


async def test_an_intent_rides_the_request_ids_commit_and_a_withdrawn_one_leaves_no_trace(tmp_path):
    ledger = Ledger.open(tmp_path)
    _add(ledger, "a", "b", "c")
    ledger.mark_submitting(["b"])  # b's POST is under way
    with ledger.group_commits():
        before = ledger.commits
        wait_a = ledger.mark_submitting_soon("a")
        ledger.mark_submitted("b", "req-b")  # b's answer arrives while a waits for a commit to ride
        await wait_a
        assert ledger.commits == before + 1  # one commit (FULL, as it carries an intent) holds both
        assert _on_disk(tmp_path)["a"] == ("submitting", None) and _on_disk(tmp_path)["b"] == ("queued", "req-b")

        # c's job stops waiting before its intent's commit: the intent is dropped, as if never made.
        wait_c = ledger.mark_submitting_soon("c")
        assert ledger.counts()["submitting"] == 2
        ledger.withdraw_intent("c", wait_c)
        wait_c.cancel()
        assert ledger.state_of("c") == "pending" and ledger.counts()["submitting"] == 1
        await asyncio.sleep(ledger.ride_seconds * 3)
        assert ledger.commits == before + 1  # nothing was left to commit
        assert _on_disk(tmp_path)["c"] == ("pending", None) and _submissions(tmp_path)["c"] == 0

        # Its next intent is committed, then the run stops before the POST: back to pending, uncounted.
        await ledger.mark_submitting_soon("c")
        assert _on_disk(tmp_path)["c"] == ("submitting", None) and _submissions(tmp_path)["c"] == 1
        ledger.withdraw_intent("c", None)
        await asyncio.sleep(0)
        assert _on_disk(tmp_path)["c"] == ("pending", None) and _submissions(tmp_path)["c"] == 0
        assert ledger.state_of("c") == "pending"
    ledger.close()


def _row(folder: Path, job_id: str) -> dict:
    conn = sqlite3.connect(f"file:{folder / LEDGER_NAME}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())
    finally:
        conn.close()


async def test_a_committed_intent_withdrawn_gives_a_resubmitted_job_back_what_it_was(tmp_path):
    """A job resubmitted on request (`unknown`) or retried (`failed`), stopped after its intent's commit
    and before its POST: it is again what it was, so no later run takes it for a job never sent (and
    pays for it again without being asked) and `adopt` can still attach what its first POST made."""
    ledger = Ledger.open(tmp_path)
    _add(ledger, "u", "f")
    ledger.mark_submitting(["u", "f"])
    ledger.set_state("u", "unknown", error=("unknown", "submit: no answer (the connection dropped)"))
    ledger.mark_submitted("f", "req-f")
    ledger.set_state("f", "failed", error=("remote", "content policy"), remote_status="failed")
    before = {job_id: _row(tmp_path, job_id) for job_id in ("u", "f")}
    with ledger.group_commits():
        for job_id in ("u", "f"):
            await ledger.mark_submitting_soon(job_id)
            assert _row(tmp_path, job_id)["state"] == "submitting"
            ledger.withdraw_intent(job_id, None)
        await asyncio.sleep(0)
    for job_id in ("u", "f"):
        after = _row(tmp_path, job_id)
        assert {k: v for k, v in after.items() if k != "updated_at"} == \
            {k: v for k, v in before[job_id].items() if k != "updated_at"}
        assert ledger.state_of(job_id) == before[job_id]["state"]
    ledger.close()


async def test_a_commit_a_change_outside_batchrun_breaks_stops_the_run_with_a_message(tmp_path):
    """A job's row deleted with the sqlite3 shell while the run works on it: the commit carrying its
    outputs breaks a constraint. The run is told (and stops) as for any write that fails: no traceback."""
    ledger = Ledger.open(tmp_path)
    _add(ledger, "a", "b")
    failures: list[LedgerWriteError] = []
    ledger.on_write_error = failures.append
    other = sqlite3.connect(tmp_path / LEDGER_NAME, isolation_level=None)
    other.execute("DELETE FROM jobs WHERE id='a'")
    other.close()
    with ledger.group_commits():
        ledger.mark_done("a", [Output(0, "a.mp4", 10, "f" * 64)])
        await asyncio.sleep(ledger.ride_seconds * 3)
    assert len(failures) == 1 and "FOREIGN KEY" in str(failures[0])
    with pytest.raises(LedgerWriteError, match="cannot write the ledger .*FOREIGN KEY"):  # not grouped: raised
        ledger.mark_done("a", [Output(0, "a.mp4", 10, "f" * 64)])
    assert ledger.state_of("b") == "pending"
    ledger.close()


async def test_an_intent_waits_no_longer_than_it_was_given_and_a_sooner_commit_takes_it(tmp_path):
    """A run gives its intents a fifth of its shortest poll interval (20 ms at most): a POST's delay well
    below what polling resolves. Any commit due sooner carries the intents already waiting."""
    ledger = Ledger.open(tmp_path)
    _add(ledger, "a", "b", "c")
    with ledger.group_commits():
        before = ledger.commits
        slow = ledger.mark_submitting_soon("a", within=0.5)
        await asyncio.sleep(0.05)
        assert not slow.done() and _on_disk(tmp_path)["a"][0] == "pending"
        await ledger.mark_submitting_soon("b", within=0.0)  # due at the end of this turn: takes a along
        assert slow.done() and ledger.commits == before + 1
        assert _on_disk(tmp_path)["a"][0] == _on_disk(tmp_path)["b"][0] == "submitting"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await ledger.mark_submitting_soon("c", within=0.05)
        assert 0.04 <= loop.time() - started < 2 and ledger.commits == before + 2


async def test_a_commit_that_fails_is_raised_or_stops_the_run_and_memory_follows_the_disk(tmp_path, caplog):
    ledger = Ledger.open(tmp_path)
    _add(ledger, "a", "b")
    ledger.mark_submitting(["a", "b"])
    failures: list[LedgerWriteError] = []
    ledger.on_write_error = failures.append
    ledger.conn.execute("PRAGMA busy_timeout=50")
    blocker = sqlite3.connect(tmp_path / LEDGER_NAME, isolation_level=None)
    with ledger.group_commits():
        ledger.mark_submitted("a", "req-a")
        await asyncio.sleep(0)
        assert _on_disk(tmp_path)["a"] == ("queued", "req-a")
        ledger.set_state("a", "downloading", output_urls=["https://x/a.mp4"])  # queued, to ride
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the ledger: no commit can be made
        ledger.mark_submitted("b", "req-b")  # queued for the commit at the end of this turn, which fails
        await asyncio.sleep(0)
        assert len(failures) == 1  # no caller waits for it: the run is told, and stops
        # The job was accepted, so paid for: its request id is named where a person can see it.
        assert any("b: accepted as request req-b, but the ledger could not record it" in r.getMessage()
                   for r in caplog.records)
        assert ledger.state_of("a") == "queued"  # the queued write it carried is gone: memory agrees with disk
        ledger.set_state("a", "downloading", output_urls=["https://x/a.mp4"])
        await asyncio.sleep(ledger.ride_seconds * 3)  # a ride's commit fails too: the run is told again
        blocker.execute("ROLLBACK")
    blocker.close()
    assert len(failures) == 2
    assert ledger.state_of("a") == "queued" and ledger.state_of("b") == "submitting"
    assert _on_disk(tmp_path)["a"] == ("queued", "req-a") and _on_disk(tmp_path)["b"] == ("submitting", None)
    ledger.close()


async def test_downloads_finishing_together_are_made_durable_in_shared_trips(tmp_path):
    bodies = {f"/v{i}.mp4": mp4(os.urandom(50_000)) for i in range(6)}
    arrived = asyncio.Event()
    seen = []

    async def handler(request):
        seen.append(request.path)
        if len(seen) == len(bodies):
            arrived.set()
        await arrived.wait()  # every body is sent at the same moment
        return web.Response(body=bodies[request.path], content_type="video/mp4")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            got = await asyncio.gather(*(download(session, f"http://127.0.0.1:{port}{path}", tmp_path / path[1:],
                                                  kind="video") for path in bodies))
    finally:
        await runner.cleanup()
    durability = _Durability.of(asyncio.get_running_loop())
    assert durability.files == 6 and durability.trips < 6
    for result, (path, body) in zip(got, bodies.items(), strict=True):
        st = os.stat(tmp_path / path[1:])
        assert result.path.read_bytes() == body and result.sha256 == hashlib.sha256(body).hexdigest()
        assert (result.inode, result.mtime_ns) == (st.st_ino, st.st_mtime_ns)  # for a later check by stat
    assert not list(tmp_path.glob("*.part*"))


async def test_provenance_files_are_written_in_batches_and_all_by_close(tmp_path):
    ledger = Ledger.open(tmp_path)
    ids = [f"j{i}" for i in range(5)]
    _add(ledger, *ids)
    ledger.mark_submitting(ids)
    writer = ProvenanceWriter(ledger, tmp_path, batch=2)
    with ledger.group_commits():
        for job_id in ids:
            ledger.mark_submitted(job_id, f"req-{job_id}")
            ledger.mark_done(job_id, [Output(0, f"{job_id}.mp4", 10, "f" * 64)])
            writer.add(job_id)
        writer.close()
    assert writer.batches == 3  # 2 + 2 as they came, the last one at close
    for row in ledger.get_many(ids):
        assert provenance_intact(tmp_path, row)
        assert json.loads((tmp_path / f"{row.id}.json").read_text())["request_id"] == f"req-{row.id}"
    ledger.close()


async def test_every_done_job_has_its_provenance_file_when_a_run_ends(tmp_path):
    manifest = write_manifest(tmp_path, jobs(12), concurrency=4)
    async with Sandbox(video_bytes=mp4(b"x" * 5000)) as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    out = tmp_path / "out"
    ledger = Ledger.open(out)
    rows = ledger.all()
    ledger.close()
    assert len(rows) == 12 and all(row.state == "done" and provenance_intact(out, row) for row in rows)


@pytest.fixture
def harness(tmp_path):
    h = make_harness(tmp_path)
    yield h
    h.sandbox.close()


def test_a_killed_runs_next_run_writes_the_missing_provenance_files(harness):
    # Killed once its jobs are done in the ledger and before their <id>.json files are written.
    assert harness.run(crash_at="provenance_batch") == -9
    rows = harness.ledger_rows()
    done = [job_id for job_id, row in rows.items() if row["state"] == "done"]
    assert done and not [job_id for job_id in done if (harness.output / f"{job_id}.json").exists()]
    assert harness.run() == 0
    created = harness.check_final(set())
    assert set(created.values()) == {1}  # nothing was submitted again
    for job_id in rows:
        record = json.loads((harness.output / f"{job_id}.json").read_text())
        assert record["id"] == job_id and record["request_id"] == harness.ledger_rows()[job_id]["request_id"]
