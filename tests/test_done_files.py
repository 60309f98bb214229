"""Done files are re-checked by the size, mtime and inode recorded at download, hashed only when those
differ (or with --verify), and a re-run that finds everything in place rewrites nothing. Real runs
against the sandbox on loopback; files are edited as a person or a tool would."""

from __future__ import annotations

import json
import os
import sqlite3

from helpers import cli, forge_keeping_stat, jobs, run, write_manifest

from batchrun.ledger import MIGRATIONS
from batchrun.plan import RunOptions
from batchrun.sandbox import Sandbox
from batchrun.sandbox.server import _sample_video

VIDEO = _sample_video()


def _outputs(out) -> dict[str, tuple]:
    conn = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return {r[0]: r[1:] for r in conn.execute("SELECT job_id, bytes, sha256, mtime_ns, inode FROM outputs")}
    finally:
        conn.close()


def _edit_in_place(path, *, keep_mtime: bool) -> None:
    """Change bytes in the middle of the file, same size, same inode; optionally put the mtime back."""
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(len(VIDEO) // 2)
        handle.write(b"\xffEDITED\xff")
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_mtime_ns == before.st_mtime_ns
    else:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == before.st_size and path.stat().st_ino == before.st_ino


async def _status(manifest, *flags: str) -> dict:
    code, out, err = await cli(["status", str(manifest), "--json", *flags])
    assert code == 0, err
    return json.loads(out)


async def test_a_download_records_the_files_stat_and_a_rerun_reads_no_file(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        for job_id, (size, _, mtime_ns, inode) in _outputs(out).items():
            st = (out / f"{job_id}.mp4").stat()
            assert (size, mtime_ns, inode) == (st.st_size, st.st_mtime_ns, st.st_ino)
        served = sandbox.downloads_served
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert sandbox.downloads_served == served and sandbox.posts_total == 3


async def test_an_edit_in_place_that_keeps_the_size_is_found_and_repaired(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        _edit_in_place(out / "clip-01.mp4", keep_mtime=False)
        report = await _status(manifest)
        assert report["damaged"] == [{"id": "clip-01", "path": "clip-01.mp4", "problem": "damaged"}]
        served = sandbox.downloads_served
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert sandbox.downloads_served == served + 1 and sandbox.posts_total == 2  # fetched again, not paid again
    assert (out / "clip-01.mp4").read_bytes() == VIDEO
    assert any("downloaded again the missing or damaged files of 1 job: clip-01" in line for line in outcome.lines)
    st = (out / "clip-01.mp4").stat()
    assert _outputs(out)["clip-01"][2:] == (st.st_mtime_ns, st.st_ino)


async def test_a_file_replaced_by_another_of_the_same_size_and_mtime_is_found(tmp_path):
    manifest = write_manifest(tmp_path, jobs(1))
    out = tmp_path / "out"
    video = out / "clip-00.mp4"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        before = video.stat()
        other = bytearray(VIDEO)
        other[-1] ^= 0xFF
        stranger = out / "stranger.mp4"
        stranger.write_bytes(bytes(other))
        os.utime(stranger, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(stranger, video)  # another inode under the name
        assert video.stat().st_mtime_ns == before.st_mtime_ns and video.stat().st_size == before.st_size
        assert (await _status(manifest))["damaged"][0]["path"] == "clip-00.mp4"
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.posts_total == 1
    assert video.read_bytes() == VIDEO


async def test_a_touched_file_is_hashed_once_kept_and_its_new_stat_recorded(tmp_path):
    manifest = write_manifest(tmp_path, jobs(1))
    out = tmp_path / "out"
    video = out / "clip-00.mp4"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        inode = video.stat().st_ino
        os.utime(video, ns=(1_000_000_000, 1_700_000_000_123_456_789))  # `touch -d`: same bytes
        served = sandbox.downloads_served
        assert (await _status(manifest))["damaged"] == []
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.downloads_served == served
    assert video.stat().st_ino == inode
    assert _outputs(out)["clip-00"][2:] == (1_700_000_000_123_456_789, inode)


async def test_verify_finds_an_edit_that_kept_size_inode_and_mtime_which_the_stat_misses(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        _edit_in_place(out / "clip-00.mp4", keep_mtime=True)
        # The documented limit of the fast check: such an edit is not seen without --verify.
        assert (await _status(manifest))["damaged"] == []
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and (out / "clip-00.mp4").read_bytes() != VIDEO
        report = await _status(manifest, "--verify")
        assert report["damaged"] == [{"id": "clip-00", "path": "clip-00.mp4", "problem": "damaged"}]
        served = sandbox.downloads_served
        outcome, _ = await run(manifest, sandbox, options=RunOptions(verify=True))
        assert outcome.exit_code == 0
        assert sandbox.downloads_served == served + 1 and sandbox.posts_total == 2
    assert (out / "clip-00.mp4").read_bytes() == VIDEO
    assert (out / "clip-01.mp4").read_bytes() == VIDEO


async def test_run_verify_flag_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    manifest = write_manifest(tmp_path, jobs(1))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        argv = ["run", str(manifest), "--base-url", sandbox.base_url, "--no-progress", "--no-preflight"]
        code, _, err = await cli(argv)
        assert code == 0, err
        _edit_in_place(out / "clip-00.mp4", keep_mtime=True)
        code, stdout, err = await cli(argv + ["--verify"])
        assert code == 0, err
        assert "downloaded again the missing or damaged files of 1 job: clip-00" in stdout
        assert sandbox.posts_total == 1
    assert (out / "clip-00.mp4").read_bytes() == VIDEO


def _as_schema_6(ledger_path) -> None:
    """Turn a ledger into what batchrun wrote before schema 7: outputs without mtime_ns and inode, no
    record of the provenance files."""
    conn = sqlite3.connect(ledger_path)
    try:
        conn.executescript("""
            BEGIN;
            ALTER TABLE outputs RENAME TO outputs_7;
            CREATE TABLE outputs (job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL, path TEXT NOT NULL,
                                  bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (job_id, idx));
            INSERT INTO outputs SELECT job_id, idx, path, bytes, sha256 FROM outputs_7;
            DROP TABLE outputs_7;
            DROP TABLE provenance_files;
            PRAGMA user_version=6;
            COMMIT;
        """)
    finally:
        conn.close()


async def test_a_ledger_from_before_the_stat_is_hashed_once_then_checked_by_stat(tmp_path):
    assert len(MIGRATIONS) == 9
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        _as_schema_6(out / "ledger.sqlite")
        # Read-only commands read the old ledger as it is (nothing recorded, every file hashed).
        _edit_in_place(out / "clip-02.mp4", keep_mtime=True)
        report = await _status(manifest)
        assert [d["path"] for d in report["damaged"]] == ["clip-02.mp4"]
        outcome, _ = await run(manifest, sandbox)  # migrates, hashes each file once, records the stat
        assert outcome.exit_code == 0 and sandbox.posts_total == 3
        assert (out / "clip-02.mp4").read_bytes() == VIDEO
        recorded = _outputs(out)
        for job_id in ("clip-00", "clip-01", "clip-02"):
            st = (out / f"{job_id}.mp4").stat()
            assert recorded[job_id][2:] == (st.st_mtime_ns, st.st_ino)
        # From now on the stat stands for the file: the fast check's limit shows it is no longer hashed.
        _edit_in_place(out / "clip-00.mp4", keep_mtime=True)
        assert (await _status(manifest))["damaged"] == []
        assert [d["path"] for d in (await _status(manifest, "--verify"))["damaged"]] == ["clip-00.mp4"]


async def test_a_noop_rerun_rewrites_neither_results_nor_provenance_files(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    names = ["results.jsonl", "clip-00.json", "clip-01.json", "clip-02.json"]
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        before = {name: (out / name).stat() for name in names}
        data = {name: (out / name).read_bytes() for name in names}
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        for name in names:
            st = (out / name).stat()
            assert (st.st_ino, st.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns), name
            assert (out / name).read_bytes() == data[name]
    # The deleted <id>.json is written again; the others and results.jsonl are left as they are.
    (out / "clip-01.json").unlink()
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    rewritten, first = json.loads((out / "clip-01.json").read_bytes()), json.loads(data["clip-01.json"])
    assert {k: rewritten[k] for k in ("id", "request_id", "outputs", "input")} == \
        {k: first[k] for k in ("id", "request_id", "outputs", "input")}
    for name in ("results.jsonl", "clip-00.json"):
        assert (out / name).stat().st_ino == before[name].st_ino, name


async def test_results_jsonl_is_rewritten_whole_when_it_differs_from_the_ledger(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3))
    out = tmp_path / "out"
    path = out / "results.jsonl"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        good = path.read_bytes()
        for damage in (good + b'{"id": "stray"}\n', good[: len(good) // 2], good.replace(b"clip-01", b"clip-XX", 1),
                       b""):
            path.write_bytes(damage)
            outcome, _ = await run(manifest, sandbox)
            assert outcome.exit_code == 0
            assert path.read_bytes() == good
        write_manifest(tmp_path, jobs(4))  # one job more: its line is added, the others kept
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
    lines = path.read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:3]) == good and json.loads(lines[3])["id"] == "clip-03"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


async def test_every_video_deleted_is_fetched_again_once_and_the_closing_lines_count_them(tmp_path):
    # Many jobs: the run end checks the repaired jobs a few hundred at a time (Ledger.get_many).
    manifest = write_manifest(tmp_path, jobs(230), concurrency=32)
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        for path in out.glob("clip-*.mp4"):
            path.unlink()
        (out / "clip-07.json").unlink()
        served = sandbox.downloads_served
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert sandbox.downloads_served == served + 230 and sandbox.posts_total == 230
    assert any(line.startswith("downloaded again the missing or damaged files of 230 jobs: clip-00, clip-01")
               for line in outcome.lines), outcome.lines
    assert not any("could not repair" in line for line in outcome.lines)
    assert all((out / f"clip-{i:02d}.mp4").read_bytes() == VIDEO for i in range(230))
    assert (out / "clip-07.json").is_file()


async def test_a_provenance_file_is_checked_by_its_recorded_stat_once_read_intact(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2))
    out = tmp_path / "out"
    path = out / "clip-00.json"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        await run(manifest, sandbox)  # reads each <id>.json once and records its stat
        good = path.read_bytes()
        record = json.loads(good)
        # An edit that changes the mtime is seen, and the next run rewrites the file.
        path.write_text(json.dumps({**record, "request_id": "someone-elses"}, indent=2))
        assert [d["path"] for d in (await _status(manifest))["damaged"]] == ["clip-00.json"]
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and json.loads(path.read_bytes())["request_id"] == record["request_id"]
        assert any("rewrote 1 provenance file that was missing or damaged: clip-00.json" in line
                   for line in outcome.lines)
        # Rewritten files are recorded: an edit keeping size, inode and mtime is then seen only with --verify.
        before = path.stat()
        data = path.read_bytes()
        forged = data.replace(record["request_id"].encode(), b"x" * len(record["request_id"]))
        assert len(forged) == len(data) and forged != data
        with open(path, "r+b") as handle:
            handle.write(forged)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (await _status(manifest))["damaged"] == []
        assert [d["path"] for d in (await _status(manifest, "--verify"))["damaged"]] == ["clip-00.json"]
        outcome, _ = await run(manifest, sandbox, options=RunOptions(verify=True))
        assert outcome.exit_code == 0
    assert json.loads(path.read_bytes())["request_id"] == record["request_id"]


async def test_each_jobs_recorded_provenance_stat_is_its_own_when_some_jobs_have_none(tmp_path):
    # The recorded stats of `<id>.json` files are read beside the ledger's rows, job by job: a job with no
    # recorded stat (a ledger that never recorded it) must not shift the others' onto the wrong job.
    manifest = write_manifest(tmp_path, jobs(5))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        await run(manifest, sandbox)  # reads each <id>.json once and records its stat
        conn = sqlite3.connect(out / "ledger.sqlite")
        with conn:
            conn.execute("DELETE FROM provenance_files WHERE job_id IN ('clip-00', 'clip-02')")
        conn.close()
        # clip-03's file edited in place, its size, inode and mtime kept: trusted by its own recorded stat.
        forge_keeping_stat(out / "clip-03.json")
        # clip-02's file, whose stat is not recorded, is read: its damage is seen.
        (out / "clip-02.json").write_text("{}")
        assert [d["path"] for d in (await _status(manifest))["damaged"]] == ["clip-02.json"]
        code, stdout, err = await cli(["plan", str(manifest), "--json", "--no-balance-check"])
        assert code == 0, err
        assert json.loads(stdout)["provenance_to_rewrite"] == ["clip-02.json"]
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert any("rewrote 1 provenance file that was missing or damaged: clip-02.json" in line
                   for line in outcome.lines)
        conn = sqlite3.connect(out / "ledger.sqlite")
        recorded = {r[0] for r in conn.execute("SELECT job_id FROM provenance_files")}
        conn.close()
        assert recorded == {f"clip-0{n}" for n in range(5)}  # clip-00 read intact, clip-02 rewritten
        assert [d["path"] for d in (await _status(manifest, "--verify"))["damaged"]] == ["clip-03.json"]


async def test_a_provenance_file_that_cannot_be_rewritten_is_said_so_and_the_run_is_not_ok(tmp_path, caplog):
    manifest = write_manifest(tmp_path, jobs(2))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        (out / "clip-01.json").unlink()
        (out / "clip-01.json").mkdir()  # something in the way that a rename cannot replace
        caplog.clear()
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 1
    assert "could not rewrite 1 provenance file" in caplog.text and "clip-01.json" in caplog.text
    assert "rewrote 1 provenance file" not in caplog.text
    # Once what was in the way is gone, the next run writes it and ends well.
    (out / "clip-01.json").rmdir()
    caplog.clear()
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0 and "rewrote 1 provenance file" in caplog.text
    assert json.loads((out / "clip-01.json").read_bytes())["id"] == "clip-01"


async def test_status_verify_tells_which_run_repairs_what_only_a_full_hash_found(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    manifest = write_manifest(tmp_path, jobs(1))
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        code, _, err = await cli(["run", str(manifest), "--base-url", sandbox.base_url, "--no-progress",
                                  "--no-preflight"])
        assert code == 0, err
    _edit_in_place(out / "clip-00.mp4", keep_mtime=True)
    code, stdout, _ = await cli(["status", str(out), "--verify"])
    assert "clip-00.mp4" in stdout and "run --verify' repairs them" in stdout
    (out / "clip-00.mp4").unlink()
    code, stdout, _ = await cli(["status", str(out)])
    assert "clip-00.mp4" in stdout and "the next run repairs them" in stdout
