"""The asyncio heart of a run: submit, poll and collect the jobs a `plan.Plan` names, under caps.

Invariants:
- at most `concurrency` jobs are in flight remotely (a slot is taken before a submit or a resumed
  poll and given back once the job has finished remotely); downloads run outside the slots;
- tasks exist only for jobs being worked on (bounded), never one per manifest job;
- a job is submitted only after its intent is durable in the ledger, and a POST is repeated only
  when it certainly created nothing (`retry.submit_is_retryable`);
- a finished job is never resubmitted to replace a download: expired URLs are refreshed through
  the result call;
- an auth or balance error stops all submitting at once; jobs already accepted are still collected.

The API client, the download session, the clock, `sleep` and `rand` are parameters, so tests drive
a real run against the sandbox without waiting for real.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from batchrun import download as dl
from batchrun.api import Client, Result, Status
from batchrun.crashpoints import crashpoint
from batchrun.errors import (
    ApiError,
    AuthError,
    DiskFull,
    DownloadError,
    DownloadInterrupted,
    OutputUrlExpired,
    RequestNotFound,
    SubmitOutcomeUnknown,
    TransientApiError,
)
from batchrun.ledger import JobRow, Ledger, LedgerWriteError, Output, utc_now
from batchrun.localfiles import LocalFileError
from batchrun.manifest import Job, Manifest
from batchrun.plan import Plan, RunOptions
from batchrun.polling import PollPlanner
from batchrun.results import write_provenance
from batchrun.retry import RetryPolicy, next_delay, submit_is_retryable, with_retries

log = logging.getLogger("batchrun.run")

VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".gif", ".png", ".jpg", ".jpeg", ".webp"}
MAX_URL_REFRESHES = 3


def _seconds_since(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return max(0.0, (datetime.now(timezone.utc) - then).total_seconds())


def _utc_iso(text: str | None) -> str:
    """The API's timestamp as ISO 8601 UTC like the ledger's own (`...Z`); now if it is missing or unreadable."""
    try:
        when = datetime.fromisoformat((text or "").strip().replace("Z", "+00:00"))
    except ValueError:
        return utc_now()
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _server_duration(result: Result) -> float | None:
    try:
        start = datetime.fromisoformat((result.created_at or "").replace("Z", "+00:00"))
        end = datetime.fromisoformat((result.finished_at or "").replace("Z", "+00:00"))
    except ValueError:
        return None
    seconds = (end - start).total_seconds()
    return seconds if seconds >= 0 else None


class _IntentBatch:
    """Makes the intents of jobs about to be POSTed durable together, with one FULL commit.

    Jobs that reach their POST in the same turn of the event loop share the fsync; each still waits
    for its own intent to be on disk before sending. A job whose wait is cancelled may have its
    intent recorded without a POST: the next run then holds it as `unknown`, the safe side.
    """

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._waiting: list[tuple[str, asyncio.Future]] = []

    async def commit(self, job_id: str) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._waiting.append((job_id, done))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush)
        await done

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            self.ledger.mark_submitting([job_id for job_id, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting job
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)


class Scheduler:
    """Runs a `Plan` to completion (or until stopped). Create one per run."""

    def __init__(
        self,
        manifest: Manifest,
        ledger: Ledger,
        client: Client,
        download_session: aiohttp.ClientSession,
        *,
        options: RunOptions = RunOptions(),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        retry_policy: RetryPolicy | None = None,
        on_change: Callable[[], None] | None = None,
    ):
        self.manifest = manifest
        self.settings = manifest.settings
        self.ledger = ledger
        self.client = client
        self.session = download_session
        self.options = options
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self.policy = retry_policy or RetryPolicy(max_attempts=self.settings.max_attempts)
        self.on_change = on_change or (lambda: None)
        self.planner = PollPlanner(self.settings.poll_min_interval, self.settings.poll_max_interval)
        self._result_polls = True  # cleared if the API refuses result calls for unfinished jobs
        self.calls: Counter[str] = Counter()  # API and download calls made, for the run's record
        # Why submitting stopped, if it did: "interrupted", "auth", "budget", "deadline", "disk_full".
        self.stop_reason: str | None = None
        self.auth_error: str | None = None
        self.fatal_error: str | None = None
        self.aborted = False
        self.interrupted = False
        self._slots = asyncio.Semaphore(self.settings.concurrency)
        self._intents = _IntentBatch(ledger)
        self._downloads = asyncio.Semaphore(options.download_concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._started = clock()
        self.committed_usd = ledger.spent_usd()

    # -- control -------------------------------------------------------------------------------
    def stop_submitting(self, reason: str) -> None:
        if reason == "interrupted":
            self.interrupted = True  # even when submitting had already stopped for another reason
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("no further jobs will be submitted (%s)", reason)

    def abort(self) -> None:
        """Leave now: every task is cancelled; the ledger already holds what each job reached."""
        self.stop_submitting("interrupted")
        self._cancel_all()

    def _halt(self, reason: str, message: str) -> None:
        """Stop the whole run because it can no longer record or store what happens (disk full)."""
        if self.fatal_error is None:
            self.fatal_error = message
            log.error("stopping: %s", message)
        self.stop_submitting(reason)
        self._cancel_all()

    def _cancel_all(self) -> None:
        self.aborted = True  # and no new task starts, not even for a job resumed from the ledger
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    # -- the run ---------------------------------------------------------------------------------
    async def run(self, plan: Plan) -> None:
        # Jobs already paid for come first: their slots and downloads matter more than new ones.
        work: list[tuple[str, Job, JobRow | None]] = (
            [("collect", job, row) for job, row in plan.collect]
            + [("poll", job, row) for job, row in plan.poll]
            + [("submit", job, None) for job in plan.submit]
        )
        # Bounds the number of tasks: remote slots + downloads + a little slack to keep slots busy.
        room = asyncio.Semaphore(self.settings.concurrency + self.options.download_concurrency + 4)
        try:
            for action, job, row in work:
                if self.aborted or (action == "submit" and self._submitting_stopped()):
                    break
                await room.acquire()
                if action != "collect":
                    await self._slots.acquire()
                if self.aborted or (action == "submit" and self._submitting_stopped()):
                    if action != "collect":
                        self._slots.release()
                    room.release()
                    break
                task = asyncio.create_task(self._drive(action, job, row))
                self._tasks.add(task)
                task.add_done_callback(lambda t: (self._tasks.discard(t), room.release()))
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        except asyncio.CancelledError:
            self.abort()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            raise

    def _submitting_stopped(self) -> bool:
        left = self._time_left()
        if left is not None and left <= 0:
            self.stop_submitting("deadline")
        return self.stop_reason is not None

    def _time_left(self) -> float | None:
        """Seconds until `max_wait` is reached, or None without one."""
        if self.settings.max_wait is None:
            return None
        return self.settings.max_wait - (self.clock() - self._started)

    async def _drive(self, action: str, job: Job, row: JobRow | None) -> None:
        try:
            if action == "collect":
                await self._collect(job, row.request_id if row else None, None, row.cost_usd if row else None)
                return
            try:
                if action == "submit":
                    request_id = await self._submit(job)
                    if request_id is None:
                        return
                    age0 = 0.0
                else:
                    request_id, age0 = row.request_id, _seconds_since(row.submitted_at)
                result = await self._wait_remote(job, request_id, age0)
            finally:
                self._slots.release()
            if result is not None:
                await self._collect(job, request_id, result)
        except asyncio.CancelledError:
            raise
        except LedgerWriteError as exc:
            self._halt("disk_full", f"{exc}; every job keeps the state last recorded")
        except Exception as exc:  # no task may die silently: record it on the job and go on
            log.exception("%s: unexpected error", job.id)
            self._record_error(job.id, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            self.on_change()

    def _record_error(self, job_id: str, kind: str, message: str) -> None:
        # Download errors quote what a storage host said: made as safe as the API's own text.
        self.ledger.set_error(job_id, kind, self.client.scrub(message))

    # -- submit ----------------------------------------------------------------------------------
    async def _submit(self, job: Job) -> str | None:
        try:
            # Local images become data: URIs only now, so the ledger never holds megabytes of base64.
            payload = await asyncio.to_thread(job.api_input) if job.local_files else job.api_input()
        except LocalFileError as exc:
            self.ledger.set_state(job.id, "failed", error=("local_file", f"{exc}; nothing was sent"))
            log.warning("%s: failed: %s", job.id, exc)
            return None
        estimate = self.manifest.estimate_cost(job)
        budget = self.settings.budget_usd
        if budget is not None and self.committed_usd + estimate > budget + 1e-9:
            self.stop_submitting("budget")
            log.info("%s: not submitted: $%.2f committed + $%.2f would exceed the $%.2f budget",
                     job.id, self.committed_usd, estimate, budget)
            return None
        # Reserved before the next await: jobs submitted concurrently must see each other's spend,
        # or every slot would pass the budget check at once. Given back if nothing was created.
        self.committed_usd += estimate
        attempt = 0
        while True:
            if self.interrupted or self.stop_reason in ("auth", "disk_full", "interrupted"):
                self.committed_usd -= estimate
                return None
            await self._intents.commit(job.id)
            crashpoint("after_intent")
            self.calls["submit"] += 1
            try:
                submitted = await self.client.submit(self.manifest.model.model_id, payload)
            except SubmitOutcomeUnknown as exc:
                self.ledger.set_state(job.id, "unknown", error=("unknown", str(exc)))
                log.warning("%s: unknown: %s", job.id, exc)
                return None  # it may have been created: its estimate stays counted against the budget
            except AuthError as exc:
                self.ledger.mark_not_sent(job.id, "auth", str(exc), reached_server=True)
                self.committed_usd -= estimate
                self._auth_failed(exc)
                return None
            except TransientApiError as exc:
                delay = next_delay(exc, attempt, self.policy, self.rand, retryable=submit_is_retryable)
                self.ledger.mark_not_sent(job.id, exc.kind, str(exc), reached_server=exc.connected)
                if delay is None:
                    if not submit_is_retryable(exc):
                        # Defensive: the client reports such failures as SubmitOutcomeUnknown.
                        self.ledger.set_state(job.id, "unknown", error=("unknown", str(exc)))
                    else:
                        self.committed_usd -= estimate
                    log.warning("%s: not submitted: %s", job.id, exc)
                    return None
                log.info("%s: submit refused (%s); retrying in %.1fs", job.id, exc, delay)
                await self.sleep(delay)
                attempt += 1
                continue
            except ApiError as exc:  # rejected input, unknown model: nothing was created
                self.ledger.mark_not_sent(job.id, exc.kind, str(exc), reached_server=True)
                self.ledger.set_state(job.id, "failed", error=(exc.kind, str(exc)))
                self.committed_usd -= estimate
                log.warning("%s: failed: %s", job.id, exc)
                return None
            crashpoint("after_post")
            try:
                self.ledger.mark_submitted(job.id, submitted.request_id)
            except LedgerWriteError:
                # The job exists and is paid for: say its request id where a person can see it.
                log.error("%s: accepted as request %s, but the ledger could not record it", job.id,
                          submitted.request_id)
                raise
            log.info("%s: submitted as %s", job.id, submitted.request_id)
            if submitted.problem is not None:  # the job exists (recorded above); the error still counts
                log.warning("%s: accepted as %s with an error: %s", job.id, submitted.request_id, submitted.problem)
                if isinstance(submitted.problem, AuthError):
                    self._auth_failed(submitted.problem)
            self.on_change()
            return submitted.request_id

    def _auth_failed(self, exc: ApiError) -> None:
        if self.auth_error is None:
            self.auth_error = str(exc)
            log.error("stopping: %s", exc)
        self.stop_submitting("auth")

    # -- poll --------------------------------------------------------------------------------------
    async def _api(self, kind: str, call: Callable[[], Awaitable[Any]]) -> Any:
        async def counted():
            self.calls[kind] += 1
            return await call()

        return await with_retries(counted, policy=self.policy, sleep=self.sleep, rand=self.rand)

    async def _wait_remote(self, job: Job, request_id: str, age0: float) -> Result | None:
        """Poll until the job has finished remotely; returns its result, or None to leave it for later."""
        submitted = self.clock() - age0
        polls, last_running_age, state = 0, 0.0, "queued"
        while True:
            age = self.clock() - submitted
            if age >= self.settings.job_timeout and polls > 0:
                return await self._timed_out(job, request_id, state)
            left = self._time_left()
            if left is not None and left <= 0:  # max_wait: leave the job recorded for the next run
                self.stop_submitting("deadline")
                return None
            delay = self.planner.next_delay(age, polls)
            if left is not None:
                delay = min(delay, left)
            await self.sleep(max(0.0, min(delay, self.settings.job_timeout - age + 0.001) if polls else delay))
            answer = await self._poll(job, request_id, self.clock() - submitted)
            if answer is None:
                return None
            polls += 1
            age = self.clock() - submitted
            if answer.state in ("queued", "running"):
                if answer.state != state or polls == 1:
                    self.ledger.record_remote(job.id, answer.raw_status, answer.state,
                                              started=answer.state == "running")
                    self.on_change()
                state, last_running_age = answer.state, age
                continue
            if isinstance(answer, Result):
                result = answer
            else:
                result = await self._remote(job, request_id, "result", lambda: self.client.result(request_id))
                if result is None:
                    return None
                if result.state in ("queued", "running"):  # status and result disagree: keep polling
                    continue
            duration = _server_duration(result)
            self.planner.observe(duration if duration is not None else (last_running_age + age) / 2)
            return result

    async def _poll(self, job: Job, request_id: str, age: float) -> Status | Result | None:
        """Ask where a job stands. Once it has probably finished, ask with the result call: the API
        answers it with the current status while the job is unfinished, and a finished job then costs
        one call instead of status + result."""
        if self._result_polls and self.planner.likely_done(age):
            try:
                return await self._remote(job, request_id, "result", lambda: self.client.result(request_id),
                                          raise_refusal=True)
            except ApiError as exc:
                # Not what the API documents, but such an answer must not fail or strand a paid job:
                # the status call decides, for this job and every later one.
                self._result_polls = False
                log.info("the API refused a result call for a job that may be unfinished (%s); polling with "
                         "status from now on", exc)
        return await self._remote(job, request_id, "status", lambda: self.client.status(request_id))

    async def _remote(self, job: Job, request_id: str, kind: str, call: Callable[[], Awaitable[Any]], *,
                      raise_refusal: bool = False) -> Any:
        """A status or result call, retried; after a final failure, records why on the job and returns None
        (the job keeps its state and request id, so a later run asks again). With `raise_refusal`, an
        answer refusing the call (not a transient or auth error) is raised instead of recorded."""
        try:
            return await self._api(kind, call)
        except AuthError as exc:
            self._auth_failed(exc)
        except ApiError as exc:
            if raise_refusal and not isinstance(exc, TransientApiError):
                raise
            if isinstance(exc, RequestNotFound):
                self._remote_gone(job, request_id, exc)
            else:
                self._record_error(job.id, exc.kind, f"the {kind} call failed: {exc}; the next run asks again")
        return None

    def _remote_gone(self, job: Job, request_id: str, exc: ApiError) -> None:
        message = (f"the API no longer knows request {request_id} ({exc}); it may have expired. "
                   "Use --retry-failed to submit the job again")
        if self.ledger.cost_of(job.id) is None:
            self.committed_usd -= self.manifest.estimate_cost(job)  # no longer counted: see Ledger.spent_usd
        self.ledger.set_state(job.id, "failed", error=("not_found", message))
        log.warning("%s: failed: %s", job.id, message)

    async def _timed_out(self, job: Job, request_id: str, state: str) -> None:
        minutes = self.settings.job_timeout / 60
        if state == "queued":
            try:
                outcome = await self._api("cancel", lambda: self.client.cancel(request_id))
            except ApiError as exc:
                outcome = None
                log.warning("%s: cancelling after the timeout failed: %s", job.id, exc)
            if outcome is not None and outcome.cancelled:
                self.ledger.set_state(job.id, "cancelled",
                                      error=("timeout", f"still queued after {minutes:g} min; cancelled"))
                self.committed_usd -= self.manifest.estimate_cost(job)
                log.warning("%s: cancelled: still queued after %g min", job.id, minutes)
                return None
        self.ledger.set_state(job.id, state, error=("timeout", f"not finished after {minutes:g} min; request "
                                                    f"{request_id} is kept and the next run collects it"))
        log.warning("%s: timed out after %g min; left for the next run", job.id, minutes)
        return None

    # -- collect -----------------------------------------------------------------------------------
    async def _collect(self, job: Job, request_id: str | None, result: Result | None,
                       recorded_cost: float | None = None) -> None:
        """Record a finished job's outcome and download its outputs. `recorded_cost` is what the ledger
        already holds for a job collected again (its files were damaged), counted in `committed_usd`."""
        if request_id is None:
            self.ledger.set_state(job.id, "failed", error=("internal", "no request id recorded"))
            return
        if result is None:
            result = await self._remote(job, request_id, "result", lambda: self.client.result(request_id))
            if result is None:
                return
            if result.state in ("queued", "running"):
                self.ledger.record_remote(job.id, result.raw_status, result.state, started=True)
                return
        finished = {"finished_at": _utc_iso(result.finished_at), "remote_status": result.raw_status}
        # What `committed_usd` holds for this job so far: its recorded cost (a done job collected
        # again), else its estimate. Replaced below by what the result says, as `Ledger.spent_usd` counts it.
        held = recorded_cost if recorded_cost is not None else self.manifest.estimate_cost(job)
        if result.state == "cancelled":
            self.ledger.set_state(job.id, "cancelled", error=("cancelled", "cancelled remotely"), **finished)
            self.committed_usd -= held
            return
        if result.state == "failed" or not result.output_urls:
            message = result.error or "the job finished without any output"
            self.ledger.set_state(job.id, "failed", error=("remote", message), cost_usd=result.cost_usd,
                                  cost_flag=result.cost_flag, **finished)
            self.committed_usd += (result.cost_usd or 0.0) - held
            log.warning("%s: failed remotely: %s", job.id, message)
            return
        cost = result.cost_usd if result.cost_usd is not None else self.manifest.estimate_cost(job)
        self.committed_usd += cost - held
        if result.cost_flag:  # recorded, never counted: the estimate stands in for it
            log.warning("%s: the API reported a %s; counting the estimate $%.2f", job.id, result.cost_flag, cost)
        self.ledger.set_state(job.id, "downloading", clear_error=True, output_urls=result.output_urls,
                              cost_usd=result.cost_usd, cost_flag=result.cost_flag, **finished)
        self.on_change()
        async with self._downloads:
            outputs = await self._download_all(job, request_id, result.output_urls)
            if outputs is not None:
                self.ledger.mark_done(job.id, outputs)
                await asyncio.to_thread(write_provenance, self.manifest.output_dir, self.ledger.get(job.id))
                log.info("%s: done", job.id)

    def _output_name(self, job: Job, index: int, url: str) -> str:
        suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
        suffix = suffix if suffix in VIDEO_SUFFIXES else ".mp4"
        return f"{job.id}{suffix}" if index == 0 else f"{job.id}-{index + 1}{suffix}"

    async def _download_all(self, job: Job, request_id: str, urls: list[str]) -> list[Output] | None:
        """Every output on disk and verified, or None (the error is recorded) to leave it for later."""
        output_dir = self.manifest.output_dir
        max_bytes = int(self.settings.max_video_mb * 1024 * 1024)
        outputs: list[Output] = []
        refreshes, part_size = 0, 0
        index = 0
        while index < len(urls):
            name = self._output_name(job, index, urls[index])
            url = urls[index]
            try:
                got = await with_retries(
                    lambda url=url, name=name: self._count_download(url, output_dir / name, max_bytes),
                    policy=self.policy, sleep=self.sleep, rand=self.rand,
                    retryable=lambda e: isinstance(e, (DownloadInterrupted, TransientApiError)),
                )
            except OutputUrlExpired as exc:
                # Short-lived URLs on a slow link expire mid-download again and again; as long as each
                # URL moved the .part forward, keep refreshing.
                part = dl.part_path(output_dir / name)
                size = part.stat().st_size if part.exists() else 0
                refreshes = 1 if size > part_size else refreshes + 1
                part_size = size
                if refreshes > MAX_URL_REFRESHES:
                    self._record_error(job.id, exc.kind, f"{exc}; the next run tries again")
                    return None
                log.info("%s: output URL refused (%s); fetching a fresh one", job.id, exc)
                try:
                    fresh = await self._api("result", lambda: self.client.result(request_id))
                except ApiError as api_exc:
                    self._record_error(job.id, api_exc.kind, f"refreshing the output URL failed: {api_exc}")
                    return None
                if len(fresh.output_urls) == len(urls):
                    urls = fresh.output_urls
                    self.ledger.set_state(job.id, "downloading", output_urls=urls)
                continue
            except DiskFull as exc:
                self._halt("disk_full", f"disk full while downloading {job.id}: {exc}")
                return None
            except DownloadError as exc:
                self._record_error(job.id, exc.kind, f"{exc}; the next run tries the download again")
                log.warning("%s: download failed: %s", job.id, exc)
                return None
            outputs.append(Output(index, name, got.bytes, got.sha256))
            index, refreshes, part_size = index + 1, 0, 0
        return outputs

    async def _count_download(self, url: str, dest: Path, max_bytes: int):
        self.calls["download"] += 1
        return await dl.download(self.session, url, dest, max_bytes=max_bytes)
