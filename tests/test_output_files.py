"""Nothing is written outside the output dir and nothing paid is overwritten: planted links, files
another job owns, the user's umask. Every run is a real run against a sandbox on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys

import pytest
from helpers import cli as _main
from helpers import job, jobs, results, write_manifest
from proc_helpers import env

from batchrun.run import RUN_LOG_MAX_BYTES
from batchrun.sandbox import Faults, Sandbox

VIDEO = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8
VICTIM = b"export PATH=/usr/bin  # the user's own file\n"


async def _run(manifest, sandbox, *flags: str) -> tuple[int, str, str]:
    return await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-progress", "--no-preflight",
                        *flags])


@pytest.fixture
def victim(tmp_path, monkeypatch):
    """A file of the user's beside the output dir, and a token so that `run` starts."""
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM)
    (tmp_path / "out").mkdir()
    return path


# Appended or opened in place: a link there stops the run before anything is sent.
@pytest.mark.parametrize("name", ["run.log", "run.lock", "ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"])
async def test_a_link_where_batchrun_appends_stops_the_run_and_the_target_is_untouched(tmp_path, victim, name):
    manifest = write_manifest(tmp_path, jobs(1))
    (tmp_path / "out" / name).symlink_to("../victim.txt")
    async with Sandbox() as sandbox:
        code, _, err = await _run(manifest, sandbox)
        assert sandbox.posts_total == 0
    assert code == 2, err
    assert name in err and ("symbolic link" in err or "not a regular file" in err), err
    assert "Traceback" not in err
    assert victim.read_bytes() == VICTIM
    assert (tmp_path / "out" / name).is_symlink()


# Replaced whole by a rename: the link itself is replaced, never written through.
@pytest.mark.parametrize("name", ["results.jsonl", "report.html", "clip-00.json", "clip-00.mp4"])
async def test_a_link_where_batchrun_replaces_a_file_is_replaced_not_followed(tmp_path, victim, name):
    manifest = write_manifest(tmp_path, jobs(1))
    (tmp_path / "out" / name).symlink_to("../victim.txt")
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        code, _, err = await _run(manifest, sandbox)
    assert code == 0, err
    assert victim.read_bytes() == VICTIM
    path = tmp_path / "out" / name
    assert not path.is_symlink() and path.is_file()
    if name != "clip-00.mp4":  # a video is renamed into place by the downloader, silently
        assert f"{name} was a symbolic link; replaced it" in err
    assert results(tmp_path / "out")["clip-00"]["state"] == "done"


async def test_a_link_at_a_part_file_is_refused_and_the_next_run_downloads_once_it_is_gone(tmp_path, victim):
    manifest = write_manifest(tmp_path, jobs(1))
    part = tmp_path / "out" / "clip-00.mp4.part"
    part.symlink_to("../victim.txt")
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        code, out, err = await _run(manifest, sandbox)
        assert code == 1
        assert "clip-00.mp4.part is a symlink; refusing to write through it" in out + err
        assert victim.read_bytes() == VICTIM
        part.unlink()
        code, _, err = await _run(manifest, sandbox)
        assert code == 0, err
        assert sandbox.posts_total == 1  # collected from the result, never paid again
    assert (tmp_path / "out" / "clip-00.mp4").read_bytes() == VIDEO


async def test_rotating_run_log_moves_links_and_never_writes_through_them(tmp_path, victim):
    manifest = write_manifest(tmp_path, jobs(1))
    out = tmp_path / "out"
    (out / "run.log").write_text("x" * (RUN_LOG_MAX_BYTES + 1))
    for name in ("run.log.1", "run.log.2"):
        (out / name).symlink_to("../victim.txt")
    async with Sandbox() as sandbox:
        code, _, err = await _run(manifest, sandbox)
    assert code == 0, err
    assert victim.read_bytes() == VICTIM
    assert (out / "run.log.1").stat().st_size > RUN_LOG_MAX_BYTES and not (out / "run.log.1").is_symlink()
    assert "clip-00: done" in (out / "run.log").read_text()


async def test_run_log_that_is_a_fifo_is_refused_without_hanging(tmp_path, victim):
    os.mkfifo(tmp_path / "out" / "run.log")
    manifest = write_manifest(tmp_path, jobs(1))
    async with Sandbox() as sandbox:
        code, _, err = await asyncio.wait_for(_run(manifest, sandbox), 20)
        assert sandbox.posts_total == 0
    assert code == 2 and "run.log is not a regular file" in err and "Traceback" not in err, err


async def test_run_log_with_another_hard_link_gets_a_copy_of_its_own(tmp_path, victim):
    """A planted hard link, or a backup tool's snapshot of the folder: the other name keeps its bytes."""
    log = tmp_path / "out" / "run.log"
    os.link(victim, log)
    manifest = write_manifest(tmp_path, jobs(1))
    async with Sandbox() as sandbox:
        code, _, err = await _run(manifest, sandbox)
    assert code == 0, err
    assert "run.log had 2 hard links" in err
    assert victim.read_bytes() == VICTIM and victim.stat().st_nlink == 1
    assert log.read_bytes().startswith(VICTIM) and b"clip-00: done" in log.read_bytes()


# -- no job takes a file name another job in the ledger owns -----------------------------------------


async def test_a_later_job_named_like_an_earlier_jobs_second_output_is_refused(tmp_path, victim):
    """`x` finished with x.mp4 and x-2.mp4; a later manifest drops `x` and adds `x-2`."""
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, faults=Faults(videos_per_job=2)) as sandbox:
        manifest = write_manifest(tmp_path, [job("x")])
        code, _, err = await _run(manifest, sandbox)
        assert code == 0, err
        assert [o["path"] for o in results(out)["x"]["outputs"]] == ["x.mp4", "x-2.mp4"]
        later = write_manifest(tmp_path, [job("x-2"), job("other")], name="later.yaml")
        code, plan_out, _ = await _main(["plan", str(later), "--output", str(out)])
        assert code == 0
        assert "x-2" in plan_out and "output #2 of job 'x'" in plan_out
        code, stdout, err = await _run(later, sandbox, "--output", str(out))
        assert code == 1, err
        assert sandbox.posts_total == 2  # x and other; x-2 never sent
    assert "refused" in stdout + err and "x-2.mp4 has the name kept for output #2 of job 'x'" in stdout + err
    assert (out / "x-2.mp4").read_bytes() == VIDEO
    code, shown, _ = await _main(["status", str(later), "--output", str(out), "--json"])
    assert code == 0
    assert [item["id"] for item in json.loads(shown)["refused"]] == ["x-2"]  # where users look, too
    rows = results(out)
    assert rows["x"]["state"] == "done" and rows["other"]["state"] == "done"
    assert rows["x-2"]["submissions"] == 0


@pytest.mark.parametrize("earlier, later, why", [
    ("y-2", "y", "its output #2 would be named y-2.mp4, which job 'y-2'"),
    ("Cliff", "cliff", "those of job 'Cliff' in this output dir on case-insensitive disks"),
    ("z", "Z-3", "output #3 of job 'z'"),
])
async def test_no_new_job_may_take_names_a_sent_job_owns(tmp_path, victim, earlier, later, why):
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        code, _, err = await _run(write_manifest(tmp_path, [job(earlier)]), sandbox)
        assert code == 0, err
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".mp4", ".json")}
        code, stdout, err = await _run(write_manifest(tmp_path, [job(later)]), sandbox)
        assert code == 1, err
        assert sandbox.posts_total == 1
    assert why in stdout + err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before


async def test_a_job_never_sent_owns_no_names(tmp_path, victim):
    """A ledger job that was only ever pending (its run stopped before sending it) blocks nobody."""
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        code, _, err = await _run(write_manifest(tmp_path, [job("w-2")]), sandbox,
                                  "--budget", "0")
        assert results(out)["w-2"]["submissions"] == 0, err
        code, _, err = await _run(write_manifest(tmp_path, [job("w")]), sandbox)
        assert code == 0, err


# -- the user's umask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, expected", [(0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_users_umask(tmp_path, umask, expected):
    manifest = write_manifest(tmp_path, jobs(1))
    done = subprocess.run([sys.executable, "-m", "batchrun", "run", str(manifest), "--sandbox", "--no-progress"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=60, umask=umask)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    for name in ("results.jsonl", "report.html", "clip-00.json", "clip-00.mp4", "run.log"):
        assert stat.S_IMODE((out / name).stat().st_mode) == expected, name
    assert stat.S_IMODE((out / "ledger.sqlite").stat().st_mode) == 0o600  # private whatever the umask
