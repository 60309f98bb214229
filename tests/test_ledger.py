"""The ledger on its own: state transitions, the submissions counter, file mode, and refusals."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3

import pytest
from helpers import old_ledger

from batchrun.cli import main
from batchrun.errors import LedgerError
from batchrun.ledger import LEDGER_NAME, Ledger, Output

INPUT = {"prompt": "waves", "start_image_url": "https://example.com/a.png", "duration": 5}


def _add(ledger: Ledger, *ids: str) -> None:
    ledger.add_pending((i, "kling/kling-3.0/standard/image-to-video", INPUT, f"sha-{i}", 0.42) for i in ids)


def test_state_transitions_and_submissions_counter(tmp_path):
    ledger = Ledger.open(tmp_path)
    try:
        _add(ledger, "a", "b")
        a = ledger.get("a")
        assert (a.state, a.submissions, a.request_id) == ("pending", 0, None)
        assert a.input == INPUT and a.input_sha256 == "sha-a" and a.estimated_cost_usd == 0.42
        assert ledger.counts() == {"pending": 2}

        ledger.mark_submitting(["a"])
        a = ledger.get("a")
        assert (a.state, a.submissions, a.request_id) == ("submitting", 1, None)
        assert a.submitted_at

        ledger.mark_submitted("a", "req-1")
        a = ledger.get("a")
        assert (a.state, a.request_id, a.remote_status) == ("queued", "req-1", "in_queue")

        ledger.record_remote("a", "in_progress", "running", started=True)
        a = ledger.get("a")
        assert (a.state, a.remote_status) == ("running", "in_progress")
        started = a.started_at
        assert started
        ledger.record_remote("a", "in_progress", "running", started=True)
        assert ledger.get("a").started_at == started  # the first time it was seen running is kept

        ledger.set_state("a", "downloading", output_urls=["https://x/v.mp4"], cost_usd=0.4, finished_at="t")
        a = ledger.get("a")
        assert (a.state, a.output_urls, a.cost_usd) == ("downloading", ["https://x/v.mp4"], 0.4)
        ledger.mark_done("a", [Output(0, "a.mp4", 10, "f" * 64)])
        a = ledger.get("a")
        assert a.state == "done" and a.outputs == (Output(0, "a.mp4", 10, "f" * 64),) and a.downloaded_at
        assert ledger.cost_of("a") == 0.4
        assert a.request_id == "req-1" and a.submissions == 1

        # A POST refused before reaching a job (e.g. 429) returns the job to pending; the POST was sent.
        ledger.mark_submitting(["b"])
        ledger.mark_not_sent("b", "transient", "HTTP 429", reached_server=True)
        b = ledger.get("b")
        assert (b.state, b.submissions, b.error) == ("pending", 1, {"kind": "transient", "message": "HTTP 429"})
        # One that never left this machine is not counted.
        ledger.mark_submitting(["b"])
        ledger.mark_not_sent("b", "transient", "could not connect", reached_server=False)
        assert ledger.get("b").submissions == 1
        ledger.mark_submitting(["b"])
        ledger.set_state("b", "unknown", error=("unknown", "502"))
        b = ledger.get("b")
        assert (b.state, b.submissions, b.request_id) == ("unknown", 2, None)
        # Resubmitting counts again and clears what the earlier attempt left.
        ledger.mark_submitting(["b"])
        ledger.mark_submitted("b", "req-2")
        b = ledger.get("b")
        assert (b.state, b.submissions, b.request_id, b.error) == ("queued", 3, "req-2", None)

        assert ledger.counts() == {"done": 1, "queued": 1}
        assert ledger.state_of("a") == "done"
        assert ledger.spent_usd() == pytest.approx(0.4 + 0.42)
    finally:
        ledger.close()

    # Everything is durable: a fresh open sees the same.
    again = Ledger.open(tmp_path)
    try:
        assert again.get("a").state == "done" and again.get("a").outputs[0].path == "a.mp4"
        assert again.get("b").request_id == "req-2"
        assert again.counts() == {"done": 1, "queued": 1}
    finally:
        again.close()


def test_add_pending_never_touches_a_job_that_was_sent(tmp_path):
    ledger = Ledger.open(tmp_path)
    try:
        _add(ledger, "a")
        ledger.mark_submitting(["a"])
        ledger.mark_submitted("a", "req-1")
        ledger.add_pending([("a", "m", {"prompt": "other"}, "sha-other", 9.0)])
        a = ledger.get("a")
        assert (a.state, a.input_sha256, a.request_id, a.input) == ("queued", "sha-a", "req-1", INPUT)
    finally:
        ledger.close()


def test_ledger_files_are_private(tmp_path):
    old = os.umask(0)
    try:
        ledger = Ledger.open(tmp_path)
        try:
            _add(ledger, "a")
            # While it is open in WAL mode, its companions hold the same data: private too.
            for name in (LEDGER_NAME, f"{LEDGER_NAME}-wal", f"{LEDGER_NAME}-shm"):
                assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600, name
        finally:
            ledger.close()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / LEDGER_NAME).st_mode & 0o777 == 0o600


def test_a_ledger_from_a_newer_batchrun_is_refused_and_left_alone(tmp_path):
    ledger = Ledger.open(tmp_path)
    _add(ledger, "a")
    ledger.close()
    conn = sqlite3.connect(tmp_path / LEDGER_NAME)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    before = (tmp_path / LEDGER_NAME).read_bytes()
    with pytest.raises(LedgerError, match="newer batchrun"):
        Ledger.open(tmp_path)
    with pytest.raises(LedgerError, match="newer batchrun"):
        Ledger.open(tmp_path, readonly=True)
    assert (tmp_path / LEDGER_NAME).read_bytes() == before


def test_a_corrupted_ledger_is_refused_and_not_overwritten(tmp_path):
    garbage = os.urandom(8192)
    (tmp_path / LEDGER_NAME).write_bytes(garbage)
    with pytest.raises(LedgerError, match="left it untouched|left untouched"):
        Ledger.open(tmp_path)
    assert (tmp_path / LEDGER_NAME).read_bytes() == garbage
    assert not (tmp_path / f"{LEDGER_NAME}-wal").exists()


def test_no_ledger_without_create(tmp_path):
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger.open(tmp_path, create=False)
    assert not (tmp_path / LEDGER_NAME).exists()


def test_a_ledger_of_an_older_schema_is_migrated_in_place(tmp_path):
    from batchrun.ledger import SCHEMA_VERSION

    conn = old_ledger(tmp_path, 1)
    conn.commit()
    conn.close()
    ledger = Ledger.open(tmp_path)
    try:
        assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # Migration 9 dropped the first schema's index of jobs by state (pages rewritten on every change).
        assert ledger.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'jobs_state'"
                                   ).fetchall() == []
        ledger.save_preflight([{"url": "https://x/a.png", "ok": True, "problem": None, "content_type": "image/png",
                                "bytes": 10, "width": 400, "height": 400}])
        assert [row["url"] for row in ledger.preflight_cache()] == ["https://x/a.png"]
    finally:
        ledger.close()


def test_a_truncated_ledger_stops_the_run_with_exit_2_and_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    ledger = Ledger.open(tmp_path / "out")
    _add(ledger, "a")
    for i in range(200):
        _add(ledger, f"filler-{i}")
    ledger.close()
    path = tmp_path / "out" / LEDGER_NAME
    truncated = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(truncated)
    for name in (f"{LEDGER_NAME}-wal", f"{LEDGER_NAME}-shm"):
        (tmp_path / "out" / name).unlink(missing_ok=True)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\noutput: out\njobs:\n  - id: a\n    prompt: p\n"
                        "    start_image_url: https://example.com/a.png\n")
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    out, err = io.StringIO(), io.StringIO()
    code = main(["run", "--no-preflight", str(manifest), "--base-url", "http://127.0.0.1:9"], stdout=out, stderr=err)
    assert code == 2
    assert "is not a usable batchrun ledger" in err.getvalue() and "Traceback" not in err.getvalue()
    assert path.read_bytes() == truncated


def test_rows_stream_each_job_with_its_own_outputs_and_requests_in_ledger_order(tmp_path):
    # Jobs recorded in an order unlike their ids', some with several outputs or requests, some with none:
    # the streamed read (outputs and requests read beside the jobs, in their order) gives each job exactly
    # what a read of that one job gives.
    ledger = Ledger.open(tmp_path)
    try:
        ids = ["m", "c", "x", "a", "q", "b"]
        for job_id in ids:
            _add(ledger, job_id)
        for n, job_id in enumerate(["x", "a", "b", "m"]):
            ledger.mark_submitting([job_id])
            ledger.mark_submitted(job_id, f"req-{job_id}-1")
            if n % 2 == 0:  # a second request for the same job: its history keeps both, in order
                ledger.set_state(job_id, "unknown", error=("unknown", "502"))
                ledger.mark_submitting([job_id])
                ledger.mark_submitted(job_id, f"req-{job_id}-2")
        ledger.set_state("a", "downloading", output_urls=["https://x/1.mp4", "https://x/2.mp4"])
        ledger.mark_done("a", [Output(0, "a-1.mp4", 10, "a" * 64), Output(1, "a-2.mp4", 11, "b" * 64)])
        ledger.set_state("m", "downloading", output_urls=["https://x/m.mp4"])
        ledger.mark_done("m", [Output(0, "m.mp4", 12, "c" * 64)])
        streamed = list(ledger.rows())
        assert [row.id for row in streamed] == ids
        for row in streamed:
            one = ledger.get(row.id)
            assert (row.outputs, row.request_ids, row.state, row.input) == (
                one.outputs, one.request_ids, one.state, one.input), row.id
        by_id = {row.id: row for row in streamed}
        assert [o.path for o in by_id["a"].outputs] == ["a-1.mp4", "a-2.mp4"]
        assert by_id["x"].request_ids == ("req-x-1", "req-x-2") and by_id["a"].request_ids == ("req-a-1",)
        assert by_id["c"].outputs == () and by_id["c"].request_ids == ()
    finally:
        ledger.close()


def test_a_ledger_sqlite_cannot_open_is_not_called_damaged(tmp_path):
    # Moving a ledger aside "to start over" pays again for every job it records: said only of a damaged file.
    (tmp_path / "out").mkdir()
    ledger = Ledger.open(tmp_path / "out")
    _add(ledger, "a")
    ledger.close()
    (tmp_path / "out" / f"{LEDGER_NAME}-shm").unlink(missing_ok=True)
    (tmp_path / "out" / f"{LEDGER_NAME}-wal").mkdir()  # SQLite cannot open its write-ahead log: CANTOPEN
    with pytest.raises(LedgerError) as caught:
        Ledger.open(tmp_path / "out", create=False)
    said = str(caught.value)
    assert "Do not move it aside" in said and "start over" not in said
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / LEDGER_NAME).write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError, match="Move it aside to start over"):
        Ledger.open(garbage, create=False)


@pytest.mark.parametrize(("column", "value", "what"), [
    ("input_json", "{bad", "valid JSON"),
    ("input_json", "[1, 2]", "a JSON object"),
    ("output_urls", '{"url": 1}', "a JSON list of URLs"),
    ("output_urls", "[3]", "a JSON list of URLs"),
    ("output_urls", "[", "valid JSON"),
])
async def test_a_json_field_changed_outside_batchrun_is_named_and_nothing_is_written(tmp_path, monkeypatch, column,
                                                                                      value, what):
    """A ledger edited by hand: a command that needs the job's field (export shows both; a run resubmits
    nothing, but reads the input it paid for) says which job and field, in one message with exit 2, and
    leaves the ledger as it found it; one that does not need it goes on. Never a traceback."""
    from helpers import TOKEN, cli, finished_run, ledger_rows

    from batchrun.sandbox import Sandbox

    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    manifest, out = await finished_run(tmp_path, 3)
    conn = sqlite3.connect(out / LEDGER_NAME)
    conn.execute(f"UPDATE jobs SET {column}=? WHERE id='clip-02'", (value,))
    conn.commit()
    conn.close()
    before = ledger_rows(out)
    message = f"the ledger's {column} of job 'clip-02' is not {what}"
    async with Sandbox() as sandbox:
        named = []
        for argv in (["status", str(out)], ["report", str(out)], ["export", str(out)],
                     ["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight", "--no-progress"]):
            code, said, err = await cli(argv)
            assert code == 0 or (code == 2 and message in err), (argv, said, err)
            assert "Traceback" not in err + said
            named += [argv[0]] if code == 2 else []
        assert sandbox.posts_total == 0
    assert column != "input_json" or {"export", "run"} <= set(named), named
    assert ledger_rows(out) == before
    ledger = Ledger.open(out)  # what reads the field (a run collecting the job reads its output URLs)
    try:
        with pytest.raises(LedgerError, match=f"the ledger's {column} of job 'clip-02' is not {what}"):
            ledger.get("clip-02")
        assert ledger.get("clip-01").input["prompt"]  # the other jobs read as ever
    finally:
        ledger.close()


async def test_media_facts_changed_outside_batchrun_are_only_unknown(tmp_path):
    """The facts read from a video are derived data: a value that is not a JSON object leaves them unknown
    (no flag, no traceback); every command goes on."""
    from helpers import cli, finished_run

    manifest, out = await finished_run(tmp_path, 2)
    conn = sqlite3.connect(out / LEDGER_NAME)
    conn.execute("UPDATE jobs SET media_json='[oops' WHERE id='clip-01'")
    conn.execute("UPDATE jobs SET media_json='42' WHERE id='clip-02'")
    conn.commit()
    conn.close()
    for argv in (["status", str(out)], ["status", str(manifest)], ["report", str(out)], ["export", str(out)]):
        code, said, err = await cli(argv)
        assert code == 0, (argv, said, err)
        assert "Traceback" not in said + err


@pytest.mark.parametrize("name", ["shots #2", "what?", "100%41 sure", "a b/é ?x=1#y"])
async def test_the_ledger_lives_in_the_output_dir_whatever_its_name(tmp_path, monkeypatch, name):
    """SQLite reads `?`, `#` and `%XX` in a URI: an output dir named `shots #2` once opened a ledger
    beside it (`shots `), shared by every dir of that prefix, and the dir moved elsewhere paid again for
    its done jobs. The ledger is inside the dir, and a move keeps every job done: nothing is sent again."""
    from helpers import TOKEN, cli, jobs, write_manifest

    from batchrun.sandbox import Sandbox

    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    manifest = write_manifest(tmp_path, jobs(2))
    out = tmp_path / "first" / name / "out"
    async with Sandbox() as sandbox:
        argv = ["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight", "--no-progress"]
        code, said, err = await cli([*argv, "--output", str(out)])
        assert code == 0, (said, err)
        assert {p.parent for p in tmp_path.rglob(f"{LEDGER_NAME}*")} == {out}  # nothing beside the dir
        moved = tmp_path / "moved" / name / "out"
        moved.parent.mkdir(parents=True)
        out.rename(moved)
        code, said, err = await cli([*argv, "--output", str(moved)])
        assert code == 0, (said, err)
        assert sandbox.posts_total == 2  # the first run's two, none again
    code, said, err = await cli(["status", str(moved)])
    assert code == 0 and "done" in said, (said, err)
    # Neither run nor status left a file where the name was cut (`shots `, `what`) or anywhere else.
    assert not [p for p in (tmp_path / "first").rglob("*") if not p.is_dir()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.yaml", "first", "moved"]


@pytest.mark.parametrize("name", ["shots #2", "what?x"])
async def test_a_ledger_an_older_batchrun_put_beside_a_dir_with_such_a_name_is_found_not_paid_again(
        tmp_path, monkeypatch, name):
    """batchrun 0.1 kept the ledger of an output dir whose path held `?`, `#` or `%` beside it, cut where
    SQLite's URI reading cut it, and left an empty ledger.sqlite inside. A run of the same manifest now
    finds it and refuses to start over (exit 2, nothing sent) with the move that fixes it; once moved,
    every job is done and nothing is sent again."""
    import shutil

    from helpers import TOKEN, cli, jobs, write_manifest

    from batchrun.ledger import misplaced_location
    from batchrun.sandbox import Sandbox

    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    manifest = write_manifest(tmp_path, jobs(2))
    out = tmp_path / name / "out"
    async with Sandbox() as sandbox:
        argv = ["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight", "--no-progress",
                "--output", str(out)]
        code, said, err = await cli(argv)
        assert code == 0, (said, err)
        # What 0.1 left: the ledger where the path was cut, an empty one inside.
        old = misplaced_location(out / LEDGER_NAME)
        assert old is not None and old.parent.exists()
        shutil.move(out / LEDGER_NAME, old)
        (out / LEDGER_NAME).write_bytes(b"")
        code, said, err = await cli(argv)
        assert code == 2 and str(old) in err and "pay again" in err, (said, err)
        assert sandbox.posts_total == 2
        shutil.move(old, out / LEDGER_NAME)  # the move the message gives
        code, said, err = await cli(argv)
        assert code == 0, (said, err)
        assert sandbox.posts_total == 2  # every job done: nothing sent again
    # A read-only command on an empty ledger says so, with no traceback and no file left anywhere else.
    (out / LEDGER_NAME).rename(tmp_path / "kept.sqlite")
    for suffix in ("-wal", "-shm"):
        (out / f"{LEDGER_NAME}{suffix}").unlink(missing_ok=True)
    (out / LEDGER_NAME).write_bytes(b"")
    for command in ("status", "report", "export"):
        code, said, err = await cli([command, str(out)])
        assert code == 2 and "holds no ledger yet" in err and "Traceback" not in said + err, (command, said, err)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
async def test_a_run_does_not_start_over_where_results_name_paid_jobs_but_the_ledger_is_gone(tmp_path, monkeypatch,
                                                                                            how):
    """The ledger deleted or emptied by hand while results.jsonl still names jobs the API accepted: a run
    refuses to start over (exit 2, nothing sent) and says how to put it back or start over knowingly."""
    import shutil

    from helpers import TOKEN, cli, jobs, write_manifest

    from batchrun.sandbox import Sandbox

    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        argv = ["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight", "--no-progress"]
        code, said, err = await cli(argv)
        assert code == 0, (said, err)
        shutil.move(out / LEDGER_NAME, tmp_path / "backup.sqlite")
        for suffix in ("-wal", "-shm"):
            (out / f"{LEDGER_NAME}{suffix}").unlink(missing_ok=True)
        if how == "emptied":
            (out / LEDGER_NAME).write_bytes(b"")
        code, said, err = await cli(argv)
        assert code == 2 and "names 3 jobs the API accepted" in err and "move results.jsonl aside" in err, (said, err)
        assert sandbox.posts_total == 3
        shutil.move(out / "results.jsonl", tmp_path / "results-before.jsonl")  # starting over, knowingly
        code, said, err = await cli(argv)
        assert code == 0 and sandbox.posts_total == 6, (said, err)


async def test_fifos_planted_where_those_checks_look_never_block_a_first_run(tmp_path, monkeypatch):
    """The checks for a deleted or misplaced ledger read results.jsonl and the place batchrun 0.1 cut the
    path at: a FIFO at either is not read (it would block until someone writes to it)."""
    from helpers import TOKEN, cli, jobs, write_manifest

    from batchrun.sandbox import Sandbox

    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    manifest = write_manifest(tmp_path, jobs(1))
    out = tmp_path / "shots #2" / "out"
    out.mkdir(parents=True)
    os.mkfifo(tmp_path / "shots ")
    os.mkfifo(out / "results.jsonl")
    async with Sandbox() as sandbox:
        code, said, err = await asyncio.wait_for(cli(["run", str(manifest), "--base-url", sandbox.base_url,
                                                      "--no-preflight", "--no-progress", "--output", str(out)]), 60)
        assert code == 0, (said, err)
        assert sandbox.posts_total == 1
