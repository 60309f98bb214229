"""The floor for bench_run.py: the bare script of `baseline_client.py` keeping batchrun's promises in
the leanest way we know, and nothing else. Usage: floor_client.py BASE_URL JOBS CONCURRENCY OUTDIR

What a tool that never pays twice and never loses a paid result must do per job, beyond the calls:
- the intent is durable before its POST: intents of the jobs posting in the same event-loop turn share
  one SQLite commit with `synchronous=FULL` (one WAL fsync), made on the loop's thread before any of
  those POSTs;
- the request id is committed as soon as its answer arrives (answers of one turn share a commit);
- the video is downloaded to a `.part` file and hashed as it arrives, checked to be a video (magic
  bytes), then fsynced and renamed into place, its directory fsynced: the files finished in one turn
  share one worker-thread trip and one directory fsync;
- `done` with the file's sha256 and size rides a group commit at most 20 ms later, after the file is in
  place;
- the job's `<id>.json` provenance file is written (not fsynced: it is derived from the ledger), 256 at
  a time on the loop's thread.

No retries, no polling schedule, no logging, no media probing, no report, no results.jsonl: those are
batchrun's features, not its promises. The figure it gives, against the bare script in the same run,
is what the promises cost at best; batchrun's figure against it is what batchrun adds on top.
"""

import asyncio
import hashlib
import json
import os
import sqlite3
import sys
from pathlib import Path

import aiohttp

MODEL = "kling/kling-3.0/standard/image-to-video"
IMAGE = "https://example.com/bench/start.png"
HEADERS = {"Authorization": "Bearer bench"}
VIDEO_MAGIC = b"ftyp"


class Ledger:
    """One SQLite file in WAL mode; writes of one loop turn share a commit."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, state TEXT, input TEXT, "
                          "request_id TEXT, sha256 TEXT, bytes INTEGER)")
        self.writes: list[tuple[str, tuple]] = []
        self.waiters: list[asyncio.Future] = []
        self.durable = False  # whether the next commit must be FULL (an intent is in it)
        self.scheduled = False

    async def write(self, sql: str, args: tuple, *, now: bool, durable: bool = False) -> None:
        """Queue a write; `now`: wait for its commit at the end of this loop turn (else within 20 ms)."""
        self.writes.append((sql, args))
        self.durable |= durable
        loop = asyncio.get_running_loop()
        if now:
            future = loop.create_future()
            self.waiters.append(future)
        if not self.scheduled or now:
            self.scheduled = True
            if now:
                loop.call_soon(self.commit)
            else:
                loop.call_later(0.02, self.commit)
        if now:
            await future

    def commit(self) -> None:
        if not self.writes:
            return
        self.scheduled = False
        writes, waiters, self.writes, self.waiters = self.writes, self.waiters, [], []
        if self.durable:
            self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("BEGIN")
        for sql, args in writes:
            self.conn.execute(sql, args)
        self.conn.execute("COMMIT")
        if self.durable:
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.durable = False
        for future in waiters:
            if not future.done():
                future.set_result(None)


class Files:
    """fsync + rename + one directory fsync for the files finished in one loop turn, on a worker thread."""

    def __init__(self, out: Path):
        self.out = out
        self.pending: list[tuple[int, Path, Path, asyncio.Future]] = []

    async def settle(self, fd: int, part: Path, final: Path) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self.pending:
            loop.call_soon(self.flush)
        self.pending.append((fd, part, final, future))
        await future

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, self._sync, [(fd, part, final) for fd, part, final, _ in batch])
        work.add_done_callback(lambda _: [f.set_result(None) for *_, f in batch])

    def _sync(self, batch) -> None:
        for fd, part, final in batch:
            os.fsync(fd)
            os.close(fd)
            os.rename(part, final)
        dir_fd = os.open(self.out, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Provenance:
    def __init__(self, out: Path):
        self.out = out
        self.pending: list[dict] = []

    def add(self, record: dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= 256:
            self.flush()

    def flush(self) -> None:
        for record in self.pending:
            fd = os.open(self.out / f"{record['id']}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                os.write(fd, (json.dumps(record, indent=2) + "\n").encode())
            finally:
                os.close(fd)
        self.pending = []


async def one(session, base, i, out: Path, slots: asyncio.Semaphore, ledger: Ledger, files: Files,
              provenance: Provenance):
    job_id = f"job-{i}"
    body = {"prompt": f"bench job {i}", "start_image_url": IMAGE, "duration": 5, "generate_audio": False}
    async with slots:
        await ledger.write("INSERT INTO jobs (id, state, input) VALUES (?, 'submitting', ?)",
                           (job_id, json.dumps(body)), now=True, durable=True)
        async with session.post(f"{base}/v1/models/{MODEL}", json=body, headers=HEADERS) as resp:
            request_id = (await resp.json())["request_id"]
        await ledger.write("UPDATE jobs SET state = 'submitted', request_id = ? WHERE id = ?",
                           (request_id, job_id), now=True)
        while True:
            async with session.get(f"{base}/v1/requests/{request_id}/status", headers=HEADERS) as resp:
                if (await resp.json())["status"] in ("completed", "failed", "cancelled"):
                    break
            await asyncio.sleep(0.05)
        async with session.get(f"{base}/v1/requests/{request_id}/result?include_cost=true",
                               headers=HEADERS) as resp:
            url = (await resp.json())["output"]["video"]
    part, final = out / f"{job_id}.mp4.part", out / f"{job_id}.mp4"
    digest, size = hashlib.sha256(), 0
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    async with session.get(url) as resp:
        async for chunk in resp.content.iter_chunked(256 * 1024):
            if size == 0 and chunk[4:8] != VIDEO_MAGIC:
                raise SystemExit(f"{job_id}: not a video")
            digest.update(chunk)
            size += len(chunk)
            os.write(fd, chunk)
    await files.settle(fd, part, final)
    sha = digest.hexdigest()
    await ledger.write("UPDATE jobs SET state = 'done', sha256 = ?, bytes = ? WHERE id = ?",
                       (sha, size, job_id), now=False)
    provenance.add({"id": job_id, "request_id": request_id, "input": body, "sha256": sha, "bytes": size})


async def main(base: str, jobs: int, concurrency: int, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    ledger, files, provenance = Ledger(out / "ledger.sqlite"), Files(out), Provenance(out)
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        pending = set()
        for i in range(jobs):
            pending.add(asyncio.create_task(one(session, base, i, out, slots, ledger, files, provenance)))
            if len(pending) >= concurrency * 2:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
    ledger.commit()
    provenance.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])))
