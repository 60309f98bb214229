"""`batchrun cancel` while a run is going in the same output dir: the run is a real process, the
sandbox serves it over loopback from this test's event loop on a fake clock (renders move only when
the test says so)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from helpers import FakeClock, jobs, results, run, write_manifest
from helpers import cli as _main

from batchrun.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCOMFY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


async def _until(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_cancel_stops_a_live_run_submitting_then_cancels_its_queued_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    clock = FakeClock()
    async with Sandbox(capacity=1, render_seconds=100, video_bytes=VIDEO, clock=clock) as sandbox:
        manifest = write_manifest(tmp_path, jobs(5), concurrency=2, poll_min_interval=0.05, poll_max_interval=0.2)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "batchrun", "run", str(manifest), "--no-progress", "--no-preflight",
            env=_env(RUNCOMFY_BASE_URL=sandbox.base_url, RUNCOMFY_API_TOKEN="t"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            # clip-00 renders, clip-01 waits in the queue, three more wait for a slot of the run.
            await _until(lambda: sandbox.jobs_created == 2, 30, "two jobs submitted")
            code, said, err = await _main(["cancel", str(manifest), "--base-url", sandbox.base_url])
            assert code == 1, err  # clip-00 is rendering and cannot be cancelled
            assert f"a run (pid {proc.pid}) was going in {tmp_path / 'out'}: it has stopped submitting" in said
            assert "cancelled: clip-01" in said
            assert "not cancellable (already in progress): clip-00" in said
            clock.advance(200)  # clip-00 finishes; the run collects it and ends
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.communicate()
        assert sandbox.posts_total == 2  # nothing was submitted after the cancel
    assert proc.returncode == 1, stderr
    assert "'batchrun cancel' asked this run to stop submitting" in stderr.decode()
    assert "stopped submitting: 'batchrun cancel' asked" in stdout.decode()
    rows = results(tmp_path / "out")
    assert rows["clip-00"]["state"] == "done" and rows["clip-01"]["state"] == "cancelled"
    assert all(rows[f"clip-0{i}"]["state"] == "pending" and rows[f"clip-0{i}"]["submissions"] == 0
               and rows[f"clip-0{i}"]["error"]["kind"] == "cancel" for i in (2, 3, 4))
    assert not (tmp_path / "out" / "cancel.request").exists()


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid():<20}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(120)
"""


async def test_cancel_says_plainly_when_the_live_run_has_not_stopped_submitting(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        manifest = write_manifest(tmp_path, jobs(2))
        assert (await run(manifest, sandbox))[0].exit_code == 0
        # A process holding the output dir's lock that never answers (a run stuck in a long POST, say).
        holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER, str(out / "run.lock"),
                                                      stdout=asyncio.subprocess.PIPE)
        try:
            assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"
            code, said, err = await _main(["cancel", str(manifest), "--base-url", sandbox.base_url, "--wait", "0.3"])
            assert code == 1, err
            assert f"a run (pid {holder.pid}) is still submitting in {out}: it was asked to stop" in said
            assert (out / "cancel.request").exists()  # it stops as soon as it looks
        finally:
            holder.kill()
            await holder.wait()
        # The request was for that run: the next run clears it and is not stopped by it.
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert not any("batchrun cancel" in line for line in outcome.lines)
        assert not (out / "cancel.request").exists()
