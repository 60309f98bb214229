"""The floor for bench_run.py: the bare script of `baseline_client.py` keeping batchrun's promises in
the leanest way we know, and nothing else. Usage: floor_client.py BASE_URL JOBS CONCURRENCY OUTDIR [MANIFEST]

What a tool that never pays twice and never loses a paid result must do per job, beyond the calls:
- the intent is durable before its POST: it rides the next commit, at most `INTENT_WAIT` later (as
  batchrun's does in these benches: a fifth of their 0.05 s poll interval), which is then FULL (one
  WAL fsync), made on the loop's thread; the POST waits for it;
- the request id is committed at the end of the loop turn its answer arrives in (answers of one turn
  share a commit, and intents waiting then ride it);
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

With MANIFEST ("the product floor"), it also does, as leanly, what SPEC.md and the issues require of
every run beyond the promises, and nothing more:
- reads the YAML manifest (pyyaml's C loader) and validates each job's input against the model's
  JSON schema (jsonschema, one compiled validator) before sending anything (SPEC: "validates it
  against each model's schema");
- reads each new video's media facts with PyAV once the run's jobs are done (issue 12: duration,
  resolution, frame rate, audio, stored in the ledger in one commit), in one child process that
  imports only PyAV and reads every path in one go: a file crafted to crash FFmpeg may kill that
  child, not the run holding the ledger;
- writes results.jsonl (SPEC), one line per job, in one go at the end.
Still no retries, polling schedule, log, poster frames, report, checks of local files or prices.
"""

import asyncio
import hashlib
import json
import os
import sqlite3
import sys
from pathlib import Path

import aiohttp

# The media reader: one isolated child (-I -S: nothing from the working directory, no site), given
# the parent's sys.path, reading the paths on stdin and answering one JSON line each, in one write.
MEDIA_CHILD = r"""
import sys
sys.path[:] = sys.argv[1:]
import json, av
out = []
for path in sys.stdin.read().split("\n"):
    facts = None
    try:
        with av.open(path) as container:
            video = next((s for s in container.streams if s.type == "video"), None)
            facts = {"duration_s": container.duration / 1e6 if container.duration else None,
                     "width": video.codec_context.width if video else None,
                     "height": video.codec_context.height if video else None,
                     "fps": float(video.average_rate) if video and video.average_rate else None,
                     "has_audio": any(s.type == "audio" for s in container.streams)}
    except Exception:
        pass
    out.append(json.dumps([path, facts]))
sys.stdout.write("\n".join(out) + "\n")
"""


def load_inputs(manifest: Path, model_data: Path) -> list[tuple[str, dict]]:
    """Each job's (id, input), defaults applied, each validated against the model's schema."""
    import jsonschema
    import yaml

    with open(manifest, encoding="utf-8") as stream:
        doc = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = json.loads(model_data.read_text())["input_schema"]
    validator = jsonschema.validators.validator_for(schema)(schema)
    inputs = []
    for job in doc["jobs"]:
        body = {**doc.get("defaults", {}), **{k: v for k, v in job.items() if k != "id"}}
        errors = list(validator.iter_errors(body))
        if errors:
            raise SystemExit(f"{manifest}: job {job['id']}: {errors[0].message}")
        inputs.append((str(job["id"]), body))
    return inputs


def read_media(paths: list[Path]) -> list[tuple[str, dict | None]]:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "RUNCOMFY_API_TOKEN"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", MEDIA_CHILD, *sys.path],
                          input="\n".join(map(str, paths)).encode(), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, env=env, check=False)
    return [tuple(json.loads(line)) for line in done.stdout.decode().splitlines()]


INTENT_WAIT = 0.01
MODEL = "kling/kling-3.0/standard/image-to-video"
IMAGE = "https://example.com/bench/start.png"
HEADERS = {"Authorization": "Bearer bench"}
VIDEO_MAGIC = b"ftyp"


class Ledger:
    """One SQLite file in WAL mode; writes share commits (see the module doc)."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, state TEXT, input TEXT, "
                          "request_id TEXT, sha256 TEXT, bytes INTEGER)")
        self.writes: list[tuple[str, tuple]] = []
        self.waiters: list[asyncio.Future] = []
        self.durable = False  # whether the next commit must be FULL (an intent is in it)
        self.due = float("inf")  # the loop time of the next commit scheduled

    async def write(self, sql: str, args: tuple, *, now: bool, durable: bool = False) -> None:
        """Queue a write and wait for its commit: `durable` (an intent) within INTENT_WAIT, else `now` at the
        end of this loop turn; or, neither, do not wait (it rides a commit within 20 ms)."""
        self.writes.append((sql, args))
        self.durable |= durable
        loop = asyncio.get_running_loop()
        future = None
        if now or durable:
            future = loop.create_future()
            self.waiters.append(future)
        within = INTENT_WAIT if durable else 0.0 if now else 0.02
        if loop.time() + within < self.due:
            self.due = loop.time() + within
            loop.call_soon(self.commit) if within == 0 else loop.call_later(within, self.commit)
        if future is not None:
            await future

    def commit(self) -> None:
        self.due = float("inf")  # (a callback left from an earlier schedule only commits sooner)
        if not self.writes:
            return
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
              provenance: Provenance, job: tuple[str, dict] | None = None):
    job_id = f"job-{i}"
    body = {"prompt": f"bench job {i}", "start_image_url": IMAGE, "duration": 5, "generate_audio": False}
    if job is not None:
        job_id, body = job
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


async def main(base: str, jobs: int, concurrency: int, out: Path, manifest: Path | None = None):
    inputs = None
    if manifest is not None:
        models = Path(__file__).resolve().parents[1] / "batchrun" / "models"
        inputs = load_inputs(manifest, models / "kling-3.0-standard-image-to-video.json")[:jobs]
    out.mkdir(parents=True, exist_ok=True)
    ledger, files, provenance = Ledger(out / "ledger.sqlite"), Files(out), Provenance(out)
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        pending = set()
        for i in range(jobs):
            job = inputs[i] if inputs is not None else None
            pending.add(asyncio.create_task(one(session, base, i, out, slots, ledger, files, provenance, job)))
            if len(pending) >= concurrency * 2:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
    ledger.commit()
    provenance.flush()
    if inputs is not None:
        ids = [job_id for job_id, _ in inputs]
        facts = dict(read_media([out / f"{job_id}.mp4" for job_id in ids]))
        ledger.conn.execute("ALTER TABLE jobs ADD COLUMN media TEXT")
        ledger.conn.execute("BEGIN")
        ledger.conn.executemany("UPDATE jobs SET media = ? WHERE id = ?",
                                [(json.dumps(facts.get(str(out / f"{job_id}.mp4"))), job_id) for job_id in ids])
        ledger.conn.execute("COMMIT")
        rows = ledger.conn.execute("SELECT id, state, request_id, input, sha256, bytes, media FROM jobs")
        with open(out / "results.jsonl", "w", encoding="utf-8") as results:
            results.writelines(json.dumps({"id": r[0], "state": r[1], "request_id": r[2], "input": json.loads(r[3]),
                                           "outputs": [{"path": f"{r[0]}.mp4", "sha256": r[4], "bytes": r[5]}],
                                           "media": json.loads(r[6])}) + "\n" for r in rows)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]),
                     Path(sys.argv[5]) if len(sys.argv) > 5 else None))
