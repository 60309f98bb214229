"""The output directory under hostile conditions: symlinked, read-only, a file, contended, a long history."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from helpers import cli as _main
from helpers import jobs, run, write_manifest

from batchrun.cli import main
from batchrun.errors import OutputDirLocked
from batchrun.lock import OutputDirLock
from batchrun.run import RUN_LOG_MAX_BYTES
from batchrun.sandbox import Sandbox


async def test_a_symlinked_output_dir_is_followed(tmp_path):
    real = tmp_path / "big-disk" / "spring"
    real.mkdir(parents=True)
    (tmp_path / "out").symlink_to(real, target_is_directory=True)
    manifest = write_manifest(tmp_path, jobs(2))
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    assert sorted(p.name for p in real.glob("*.mp4")) == ["clip-00.mp4", "clip-01.mp4"]
    assert (tmp_path / "out").is_symlink()


async def test_an_output_path_that_is_a_file_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    (tmp_path / "out").write_text("not a folder")
    manifest = write_manifest(tmp_path, jobs(1))
    async with Sandbox() as sandbox:
        code, _, err = await _main(["run", "--no-preflight",
                                    str(manifest), "--base-url", sandbox.base_url, "--no-progress"])
        assert sandbox.posts_total == 0
    assert code == 2
    assert "exists and is not a directory" in err and "Traceback" not in err
    assert (tmp_path / "out").read_text() == "not a folder"


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs remounted ro); root ignores mode bits, so nothing else works."""
    target = tmp_path / "ro"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): read-only file system not tested")
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
    yield target
    subprocess.run(["umount", str(target)], check=False)


async def test_a_read_only_output_dir_is_refused_before_anything_is_sent(tmp_path, read_only_dir, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    manifest = write_manifest(tmp_path, jobs(1), output=str(read_only_dir))
    async with Sandbox() as sandbox:
        code, _, err = await _main(["run", "--no-preflight",
                                    str(manifest), "--base-url", sandbox.base_url, "--no-progress"])
        assert sandbox.posts_total == 0
    assert code == 2
    assert "Read-only file system" in err and "Traceback" not in err


def test_two_runs_started_together_one_waits_out_with_75(tmp_path):
    """Two real processes racing for one output dir: exactly one runs, the other exits 75 at once."""
    server = subprocess.Popen([sys.executable, "-m", "batchrun", "sandbox", "--port", "0", "--render-seconds", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        base_url = server.stdout.readline().split(" at ")[1].strip()
        manifest = write_manifest(tmp_path, jobs(2), poll_min_interval=0.2)
        env = {**os.environ, "RUNCOMFY_API_TOKEN": "t"}
        argv = [sys.executable, "-m", "batchrun", "run", "--no-preflight",
                str(manifest), "--base-url", base_url, "--no-progress"]
        procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outcomes = sorted((p.wait(timeout=60), p.stderr.read()) for p in procs)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert [code for code, _ in outcomes] == [0, 75]
    assert "is in use by process" in outcomes[1][1]


@pytest.mark.parametrize("left_by_earlier_run", ["", "4194999\n"])
def test_the_holder_is_named_even_when_it_has_locked_but_not_yet_written_its_pid(tmp_path, left_by_earlier_run):
    """The race CI once lost: the loser read run.lock between the winner's flock and its write, when the
    file was empty (a first run) or still named an earlier run's process, long gone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").write_text(left_by_earlier_run)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "time.sleep(0.2)\n"
         "os.pwrite(fd, f'{os.getpid():<20}\\n'.encode(), 0)\n"
         "time.sleep(30)\n",
         str(out / "run.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirLocked) as caught:
            OutputDirLock(out).acquire()
        assert caught.value.pid == holder.pid
        assert f"is in use by process {holder.pid}" in str(caught.value)
    finally:
        holder.kill()
        holder.wait()
    with OutputDirLock(out):  # the killed holder's lock is gone with it
        pass


async def test_run_log_is_rotated_instead_of_growing_forever(tmp_path):
    manifest = write_manifest(tmp_path, jobs(1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.log").write_text("x" * (RUN_LOG_MAX_BYTES + 1))
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    assert (out / "run.log.1").stat().st_size > RUN_LOG_MAX_BYTES
    assert (out / "run.log").stat().st_size < 100_000
    assert "clip-00: done" in (out / "run.log").read_text()


async def test_every_run_refreshes_the_report(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2))
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'src="clip-00.mp4"' in html and 'src="clip-01.mp4"' in html


def test_status_export_and_report_on_a_folder_without_a_ledger_exit_2(tmp_path):
    for command in ("status", "export", "report"):
        out, err = io.StringIO(), io.StringIO()
        assert main([command, str(tmp_path)], stdout=out, stderr=err) == 2
        assert "nothing has run with this output directory" in err.getvalue()
    assert not (tmp_path / "ledger.sqlite").exists()
