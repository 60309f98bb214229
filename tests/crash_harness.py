"""Kill a real `batchrun run` with SIGKILL at named points or random moments, restart it, and check that
no job was paid twice and no result was lost. Used by tests/test_crash.py and bench/soak_crash.py.

The sandbox runs in a thread of this process (its counters are the truth about what the server
created); batchrun runs as a child process, exactly as cron would start it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from batchrun.manifest import load_manifest
from batchrun.sandbox import Sandbox

# 3 MiB: several chunks; it starts as an MP4 does, or batchrun would refuse it as not a video.
VIDEO = (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
         + hashlib.sha256(b"crash-harness").digest() * (3 * 1024 * 1024 // 32))[: 3 * 1024 * 1024]


class ThreadedSandbox:
    """A Sandbox serving from its own event loop in a background thread."""

    def __init__(self, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sandbox = Sandbox(**kwargs)
        self.base_url = self._call(self.sandbox.start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def read(self, fn):
        """Run `fn(sandbox)` on the sandbox's own thread, so counters are read consistently."""

        async def get():
            return fn(self.sandbox)

        return self._call(get())

    def close(self) -> None:
        self._call(self.sandbox.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def write_manifest(path: Path, jobs: int = 6, concurrency: int = 3) -> Path:
    lines = ["version: 1", f"concurrency: {concurrency}", "requests_per_second: 0", "poll_min_interval: 0.05",
             "poll_max_interval: 0.5", "max_attempts: 3", "defaults:",
             "  start_image_url: https://example.com/crash/start.png", "  duration: 5", "  generate_audio: false",
             "jobs:"]
    lines += [f"  - id: clip-{i}\n    prompt: crash test clip {i}" for i in range(jobs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _has_open(pid: int, name: str) -> bool:
    """Whether process `pid` has a file called `name` open (Linux's /proc)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/" + name):
                return True
        except OSError:
            continue
    return False


@dataclass
class Harness:
    manifest: Path
    output: Path
    sandbox: ThreadedSandbox
    kills: int = 0
    runs: list[int] = field(default_factory=list)  # exit codes of runs that were not killed

    def start(self, *extra: str, crash_at: str | None = None) -> subprocess.Popen:
        env = {**os.environ, "RUNCOMFY_API_TOKEN": "sk-harness-token"}
        env.pop("BATCHRUN_CRASH_AT", None)
        if crash_at:
            env["BATCHRUN_CRASH_AT"] = crash_at
        argv = [sys.executable, "-m", "batchrun", "run", "--no-preflight",
                str(self.manifest), "--base-url", self.sandbox.base_url,
                "--output", str(self.output), "--no-progress", *extra]
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def run(self, *extra: str, crash_at: str | None = None, timeout: float = 60) -> int:
        proc = self.start(*extra, crash_at=crash_at)
        _, stderr = proc.communicate(timeout=timeout)
        if proc.returncode == -signal.SIGKILL:
            self.kills += 1
        else:
            self.runs.append(proc.returncode)
        assert b"Traceback" not in stderr, stderr.decode(errors="replace")
        return proc.returncode

    def kill_after(self, seconds: float) -> int:
        """Kill a run `seconds` after it has opened the ledger, so a slow start-up (imports take seconds on a
        loaded machine) does not turn every kill into a kill before anything happened."""
        proc = self.start()
        deadline = time.monotonic() + 30
        while not _has_open(proc.pid, "ledger.sqlite") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            self.kills += 1
        else:
            self.runs.append(proc.returncode)
        return proc.returncode

    def random_kills(self, count: int, rng: random.Random, max_delay: float = 1.5) -> None:
        for _ in range(count):
            self.kill_after(rng.uniform(0.05, max_delay))

    # -- the invariants ------------------------------------------------------------------------------
    def jobs_created(self) -> dict[str, int]:
        manifest = load_manifest(self.manifest, output=self.output)
        counts = self.sandbox.read(lambda sb: {job.id: sb.jobs_for(job.input) for job in manifest.jobs})
        return counts

    def ledger_rows(self) -> dict[str, dict]:
        conn = sqlite3.connect(f"file:{self.output / 'ledger.sqlite'}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM jobs")}
            for r in conn.execute("SELECT * FROM outputs"):
                rows[r["job_id"]].setdefault("outputs", []).append(dict(r))
            return rows
        finally:
            conn.close()

    def check_final(self, resubmitted: set[str]) -> dict[str, int]:
        """Every job done with verified files; none created twice unless the test resubmitted it."""
        rows = self.ledger_rows()
        created = self.jobs_created()
        for job_id, n in created.items():
            allowed = 2 if job_id in resubmitted else 1
            assert n <= allowed, f"{job_id} was created {n} times on the server"
        for job_id, row in rows.items():
            assert row["state"] == "done", (job_id, row["state"], row["error_message"])
            for out in row["outputs"]:
                data = (self.output / out["path"]).read_bytes()
                assert len(data) == out["bytes"] and hashlib.sha256(data).hexdigest() == out["sha256"]
                assert data == VIDEO
        for path in self.output.glob("*.mp4"):
            assert path.read_bytes() == VIDEO, f"{path.name} is not a complete video"
        return created

    def unknown_jobs(self) -> set[str]:
        return {job_id for job_id, row in self.ledger_rows().items() if row["state"] in ("unknown", "submitting")}


def make_harness(tmp: Path, jobs: int = 6, concurrency: int = 3, render: float = 0.2) -> Harness:
    sandbox = ThreadedSandbox(capacity=concurrency, render_seconds=render, video_bytes=VIDEO, seed=int(time.time()))
    manifest = write_manifest(tmp / "crash.yaml", jobs, concurrency)
    return Harness(manifest, tmp / "out", sandbox)
