"""The asyncio heart of a run: submit, poll and collect the jobs a `plan.Plan` names, under caps.

Invariants:
- at most `concurrency` + `queue_ahead` jobs are in flight remotely (a slot is taken before a submit or a
  resumed poll and given back once the job has finished remotely); downloads run outside the slots;
- tasks exist only for jobs being worked on (bounded), never one per manifest job;
- a job is submitted only after its intent is durable in the ledger, and a POST is repeated only
  when it certainly created nothing (`retry.submit_is_retryable`);
- a finished job is never resubmitted to replace a download: expired URLs are refreshed through
  the result call;
- an auth or balance error stops all submitting at once; jobs already accepted are still collected;
- a negative answer about a paid request ("not found", "completed" without outputs) is believed only
  once it has held across `not_found_grace`; until then the job's money stays counted;
- a 429 (or any refusal with Retry-After) on one submit pauses every submit (`pacing.SubmitPacer`);
- every wait ends at `max_wait`, and a submit's wait at the first Ctrl-C; when the API cannot be
  reached at all (`unreachable_after` connection failures in a row), the run leaves at once;
- money given back by a job (refused, failed, cancelled) can be committed again in the same run: a
  job over the budget waits while jobs in flight may still give some back.

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
from batchrun.ledger import RIDE_SECONDS, JobRow, Ledger, LedgerWriteError, Output, utc_now
from batchrun.localfiles import LocalFileError
from batchrun.manifest import Job, Manifest
from batchrun.outputhosts import HostPolicy
from batchrun.pacing import SubmitPacer
from batchrun.plan import Plan, RunOptions
from batchrun.polling import PollPlanner, RenderStarts
from batchrun.provenance import ProvenanceWriter
from batchrun.retry import (
    RetryPolicy,
    doubt_delay,
    negative_is_final,
    next_delay,
    submit_is_retryable,
    with_retries,
)

log = logging.getLogger("batchrun.run")

VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".gif", ".png", ".jpg", ".jpeg", ".webp",
                  ".wav", ".mp3", ".ogg", ".opus", ".flac", ".m4a"}
DEFAULT_SUFFIX = {"video": ".mp4", "image": ".png", "audio": ".mp3"}  # when the URL's own ending says nothing
MAX_URL_REFRESHES = 3
UNREACHABLE_AFTER = 5  # connection failures in a row (and more than jobs in flight) that end the run
# Submits in a row whose outcome is unknown (sent, no usable answer: a timeout, a 5xx...) with none accepted
# in between, after which submitting stops: each may have created a job nobody can collect without help.
UNANSWERED_AFTER = 3


class _OutOfTime(Exception):
    """A wait would end past `max_wait`, or the run is leaving: the job keeps the state last recorded."""


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


class _Signal(asyncio.Event):
    """An `asyncio.Event` a nap can wait for without a task of its own: `set` also ends the naps waiting
    on it (`naps`, the futures of `Scheduler._nap`). Why: each task and each `asyncio.wait` asks CPython
    3.11 for the running loop, a getpid system call every time, and a run naps once or twice per job."""

    def __init__(self) -> None:
        super().__init__()
        self.naps: set[asyncio.Future] = set()

    def set(self) -> None:
        super().set()
        naps, self.naps = self.naps, set()
        for nap in naps:
            _end_nap(nap)


def _end_nap(nap: asyncio.Future) -> None:
    if not nap.done():
        nap.set_result(None)


class _IntentBatch:
    """Makes the intents of jobs about to be POSTed durable together: the ledger's next commit (at most
    `within` seconds away) carries them all, with every other write queued meanwhile, and is FULL.

    Each job still waits for its own intent to be on disk before sending. A job whose wait is cancelled
    has its intent withdrawn (dropped if still queued, else the job goes back to `pending`), so a stopped
    run leaves no intent without its POST for the next run to hold as `unknown`.
    """

    def __init__(self, ledger: Ledger, simulated: bool = False, within: float = RIDE_SECONDS):
        self.ledger = ledger
        self.simulated = simulated
        self.within = within
        self._waiting = 0

    def __len__(self) -> int:
        """Jobs waiting for their intent to be committed: each sends its POST right after."""
        return self._waiting

    async def commit(self, job_id: str) -> None:
        self._waiting += 1
        try:
            waiter = self.ledger.mark_submitting_soon(job_id, simulated=self.simulated, within=self.within)
            try:
                await waiter
            except asyncio.CancelledError:
                self.ledger.withdraw_intent(job_id, waiter)
                raise
        finally:
            self._waiting -= 1

    def withdraw(self, job_id: str) -> None:
        """The job's intent is on disk but its POST will not be sent (the run stopped meanwhile)."""
        self.ledger.withdraw_intent(job_id, None)


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
        output_hosts: HostPolicy | None = None,
        simulated: bool = False,
        unreachable_after: int = UNREACHABLE_AFTER,
    ):
        self.manifest = manifest
        self.settings = manifest.settings
        self.ledger = ledger
        self.client = client
        self.session = download_session
        self.output_hosts = output_hosts  # checked on every download hop; `download_session` is made by it
        self.options = options
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self.policy = retry_policy or RetryPolicy(max_attempts=self.settings.max_attempts)
        self.on_change = on_change or (lambda: None)
        self.planner = PollPlanner(self.settings.poll_min_interval, self.settings.poll_max_interval)
        self._starts = RenderStarts(self.settings.concurrency)  # which of ours render, which wait queued
        self._wakes: dict[str, asyncio.Event] = {}  # per job being polled: set to make it plan again
        self._result_polls = True  # cleared if the API refuses result calls for unfinished jobs
        self.calls: Counter[str] = Counter()  # API and download calls made, for the run's record
        # Why submitting stopped, if it did: "interrupted", "auth", "budget", "balance", "no_balance",
        # "deadline", "disk_full", "cancel" ('batchrun cancel' asked).
        self.stop_reason: str | None = None
        # Jobs this run recorded a problem of their own for (a local file that changed, a call or download
        # that failed): the closing lines list them whatever their state; jobs merely waiting their turn
        # (pending after a stop, still in flight) are only counted.
        self.problems: set[str] = set()
        self.auth_error: str | None = None
        self.fatal_error: str | None = None
        self.aborted = False
        self.interrupted = False
        # `queue_ahead` more slots: jobs that wait in the provider's queue, each reserved against the budget
        # and made durable before its POST like any other.
        self._in_flight_cap = self.settings.concurrency + self.settings.queue_ahead
        self._slots = asyncio.Semaphore(self._in_flight_cap)
        self.simulated = simulated  # sending to the built-in sandbox, which ends with this process
        # An intent waits for a commit to share at most a fifth of the shortest poll interval (20 ms at
        # most): a POST's delay well below the time resolution the manifest asks of its jobs.
        self._intents = _IntentBatch(ledger, simulated, min(RIDE_SECONDS, self.settings.poll_min_interval / 5))
        self._provenance = ProvenanceWriter(ledger, manifest.output_dir)
        self._downloads = asyncio.Semaphore(options.download_concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._started = clock()
        # Money committed: the ledger's spend plus the estimates of submits under way in this run.
        self.committed_usd = ledger.spent_usd()
        # Requests not made with the manifest's job as written (see `Plan.previous`): their cost is the
        # ledger's estimate, since the manifest no longer holds their input.
        self._previous: dict[str, JobRow] = {}
        # Set by the run after the balance call: `committed_usd` past which the account would run dry.
        self.balance_limit: float | None = None
        self.balance_room_usd: float | None = None
        self.budget_block: tuple[str, float] | None = None  # (job id, estimate) that did not fit the budget
        self._active = 0  # submit, poll and recheck tasks running: jobs whose money may still move
        self._budget_waiters = 0
        self._money_moved = _Signal()
        self._stopping = _Signal()  # set once submitting stops, for whatever reason
        self._leaving = _Signal()  # set when the run must end at once (the API cannot be reached)
        # More failures than jobs in flight: at least one job failed twice, so it is not one blip.
        self._unreachable_after = max(unreachable_after, self._in_flight_cap + 1)
        self._connect_failures = 0
        self._unanswered = 0  # submits in a row whose outcome is unknown, none accepted in between
        self._pacer = SubmitPacer(clock, rand, lambda seconds: self._nap(seconds, submit=True))
        self._submits_accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, once `run` starts

    # -- control -------------------------------------------------------------------------------
    def stop_submitting(self, reason: str) -> None:
        if reason == "interrupted":
            self.interrupted = True  # even when submitting had already stopped for another reason
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("no further jobs will be submitted (%s)", reason)
        self._stopping.set()
        self._notify()

    def abort(self) -> None:
        """Leave now: every task is cancelled; the ledger already holds what each job reached."""
        self.stop_submitting("interrupted")
        self._cancel_all()

    def _halt(self, reason: str, message: str) -> None:
        """Stop the whole run because it can no longer record or store what happens (disk full). As in
        `_leave`, a call under way is not cancelled: a POST in flight gets its answer, so its request id
        is recorded, or named in the output if the ledger cannot take it."""
        self._leave(reason, message)

    def posts_in_flight(self) -> int:
        """Jobs whose POST is about to be sent or not yet answered: once submitting has stopped and this
        is 0, no further request can appear in the ledger."""
        return len(self._intents) + self.ledger.counts().get("submitting", 0)

    def _estimate(self, job: Job) -> float:
        row = self._previous.get(job.id)
        if row is not None:
            return row.estimated_cost_usd or 0.0
        return self.manifest.estimate_cost(job)

    def _leave(self, reason: str, message: str) -> None:
        """End the run at once without cancelling a call under way: every wait ends, nothing new starts,
        and each job keeps the state last recorded (a POST in flight still gets its answer recorded)."""
        if self.fatal_error is None:
            self.fatal_error = message
            log.error("stopping: %s", message)
        self.stop_submitting(reason)
        self._leaving.set()

    def _notify(self) -> None:
        """Wake the jobs waiting for budget: money or the number of jobs in flight changed."""
        self._money_moved.set()
        self._money_moved = _Signal()

    def _release(self, usd: float) -> None:
        self.committed_usd -= usd
        self._notify()

    # -- waiting -----------------------------------------------------------------------------------
    async def _nap(self, seconds: float, *, submit: bool = False, clip: bool = False,
                   wake: _Signal | None = None) -> bool:
        """Wait `seconds` by the injected clock, or raise `_OutOfTime`: when the run leaves, when the
        wait would end past `max_wait` (with `clip`, it waits until then first), or for a submit's wait
        (`submit`) when submitting stops (Ctrl-C, auth error, ...). Returns True if `wake` was set
        (the wait then ends early)."""
        event = self._stopping if submit else self._leaving
        if event.is_set():
            raise _OutOfTime
        left = self._time_left()
        if left is not None and seconds > left:
            if not clip or left <= 0:
                self.stop_submitting("deadline")
                raise _OutOfTime
            seconds = left
        if seconds <= 0:  # only a turn of the event loop: not worth two tasks
            await self.sleep(0)
            if event.is_set():
                raise _OutOfTime
            return wake is not None and wake.is_set()
        if wake is not None and wake.is_set():
            return True
        # One future, ended by the sleep or by a signal (`_Signal`): no task per signal, no asyncio.wait.
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        nap = loop.create_future()
        sleeper = loop.create_task(self.sleep(seconds))
        sleeper.add_done_callback(lambda _: _end_nap(nap))
        signals = (event,) if wake is None else (event, wake)
        for signal in signals:
            signal.naps.add(nap)
        try:
            await nap
        finally:
            sleeper.cancel()
            for signal in signals:
                signal.naps.discard(nap)
        if event.is_set():
            raise _OutOfTime
        return wake is not None and wake.is_set()

    async def _rate_turn(self) -> None:
        """Take this POST's place in the API rate limit, waiting as a submit's nap does (`_nap`): the wait
        ends with `_OutOfTime` at once when submitting stops (Ctrl-C, a cancel, an auth error) or at
        `max_wait`, and the place is then left to the polls of the jobs in flight."""
        if self.client.turn_free():  # the usual case: no task, no wait
            await self.client.turn()
            return
        turn = (self._loop or asyncio.get_running_loop()).create_task(self.client.turn())
        taken = _Signal()
        turn.add_done_callback(lambda _: taken.set())
        try:
            while not turn.done():  # naps clipped to max_wait; the next one past it raises
                await self._nap(3600.0, submit=True, clip=True, wake=taken)
        finally:
            turn.cancel()  # (a no-op once it is done)
        turn.result()

    async def _retry_nap(self, seconds: float) -> None:
        await self._nap(seconds)

    def _reached(self) -> None:
        self._connect_failures = 0

    def _not_reached(self, exc: ApiError) -> None:
        """A call could not connect at all. Enough of them in a row, across jobs, with no answer from the
        API in between, mean it cannot be reached (wrong base URL, no DNS, no network): leave at once
        rather than let every job back off on its own for minutes."""
        self._connect_failures += 1
        if self._connect_failures >= self._unreachable_after and not self._leaving.is_set():
            base = getattr(self.client, "base_url", "?")
            self._leave("unreachable", f"cannot reach the API at {base} ({self._connect_failures} connection "
                        f"failures in a row; last: {exc}); nothing more was sent, and every job keeps its state "
                        "for the next run")

    def _cancel_all(self) -> None:
        self.aborted = True  # and no new task starts, not even for a job resumed from the ledger
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    # -- the run ---------------------------------------------------------------------------------
    async def run(self, plan: Plan) -> None:
        self._loop = asyncio.get_running_loop()
        self._previous = {job_id: row for job_id, (row, _) in plan.previous.items()}
        # Jobs already paid for come first: their slots and downloads matter more than new ones.
        work: list[tuple[str, Job, JobRow | None]] = (
            [("collect", job, row) for job, row in plan.collect]
            + [("poll", job, row) for job, row in plan.poll]
            + [("recheck", job, row) for job, row in plan.recheck]
            + [("submit", job, None) for job in plan.submit]
        )
        # Bounds the number of tasks: remote slots + downloads + a little slack to keep slots busy.
        room = asyncio.Semaphore(self._in_flight_cap + self.options.download_concurrency + 4)
        # Group commit: the jobs' writes share commits (see batchrun.ledger); a commit that fails stops the
        # run as a failed write always did.
        self.ledger.on_write_error = lambda exc: self._halt("disk_full", f"{exc}; every job keeps the state "
                                                                         "last recorded")
        with self.ledger.group_commits():
            try:
                await self._run(work, room)
            finally:
                # SPEC: every done job has its <id>.json when the run ends (a killed run's next run writes them).
                self._provenance.close()

    async def _run(self, work: list[tuple[str, Job, JobRow | None]], room: asyncio.Semaphore) -> None:
        loop = self._loop  # set by `run`
        assert loop is not None
        try:
            for action, job, row in work:
                if self.aborted or self._leaving.is_set() or (action == "submit" and self._submitting_stopped()):
                    break
                await room.acquire()
                if action != "collect":
                    await self._slots.acquire()
                if self.aborted or self._leaving.is_set() or (action == "submit" and self._submitting_stopped()):
                    if action != "collect":
                        self._slots.release()
                    room.release()
                    break
                task = loop.create_task(self._drive(action, job, row))
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
                await self._collect(job, row.request_id if row else None, None, row.cost_usd if row else None,
                                    anchor=self._anchor(row.finished_at or row.submitted_at) if row else None)
                return
            self._active += 1
            try:
                if action == "submit":
                    request_id = await self._submit(job)
                    age0 = 0.0
                elif action == "recheck":
                    request_id, age0 = await self._recheck(job, row)
                else:
                    request_id, age0 = row.request_id, _seconds_since(row.submitted_at)
                result = await self._wait_remote(job, request_id, age0) if request_id is not None else None
            finally:
                self._slots.release()
                self._active -= 1
                self._notify()
            if result is not None:
                await self._collect(job, request_id, result)
        except asyncio.CancelledError:
            raise
        except _OutOfTime:
            log.info("%s: left as %s for the next run", job.id, self.ledger.state_of(job.id))
        except LedgerWriteError as exc:
            self._halt("disk_full", f"{exc}; every job keeps the state last recorded")
        except Exception as exc:  # no task may die silently: record it on the job and go on
            log.exception("%s: unexpected error", job.id)
            self._record_error(job.id, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            self.on_change()

    def _record_error(self, job_id: str, kind: str, message: str) -> None:
        self.problems.add(job_id)
        # Download errors quote what a storage host said: made as safe as the API's own text.
        self.ledger.set_error(job_id, kind, self.client.scrub(message))

    # -- submit ----------------------------------------------------------------------------------
    async def _submit(self, job: Job) -> str | None:
        try:
            # Local images become data: URIs only now, so the ledger never holds megabytes of base64.
            payload = await asyncio.to_thread(job.api_input) if job.local_files else job.api_input()
        except LocalFileError as exc:
            # Nothing was sent, so nothing is held back: the next run submits the job with its file as it is then.
            # A job resubmitted or retried on request keeps its state (`unknown`: an earlier POST may have
            # created it, so no later run may take it for a job never sent).
            if self.ledger.state_of(job.id) == "pending":
                self.ledger.set_state(job.id, "pending", error=("local_file", str(exc)))
            self.problems.add(job.id)
            log.warning("%s: not submitted: %s", job.id, exc)
            return None
        estimate = self.manifest.estimate_cost(job)
        if not await self._reserve(job, estimate):
            return None
        try:
            return await self._post(job, payload, estimate)
        except _OutOfTime:
            # Waiting to submit (a pause, a backoff) and told to stop: the job certainly was not created.
            self._release(estimate)
            log.info("%s: not submitted (%s)", job.id, self.stop_reason or "stopped")
            return None

    async def _reserve(self, job: Job, estimate: float) -> bool:
        """Count `estimate` as committed, if the budget allows it. A job that does not fit waits while
        jobs in flight may still give money back (a failed or cancelled job costs nothing); once none
        can, the budget is reached and submitting stops."""
        if self.balance_limit is not None and self.committed_usd + estimate > self.balance_limit + 1e-9:
            self.stop_submitting("balance")
            log.info("%s: not submitted: its $%.2f would take this run past the balance", job.id, estimate)
            return False
        budget = self.settings.budget_usd
        self._budget_waiters += 1
        try:
            while budget is not None and self.committed_usd + estimate > budget + 1e-9:
                moved = self._money_moved
                if self.stop_reason is not None:
                    return False
                if self._active - self._budget_waiters <= 0:  # nothing in flight can give money back
                    self.budget_block = (job.id, estimate)
                    log.info("%s: not submitted: $%.2f committed + $%.2f would exceed the $%.2f budget",
                             job.id, self.committed_usd, estimate, budget)
                    self.stop_submitting("budget")
                    return False
                await moved.wait()
        finally:
            self._budget_waiters -= 1
        # Reserved before the next await: jobs submitted concurrently must see each other's spend,
        # or every slot would pass the budget check at once. Given back if nothing was created.
        self.committed_usd += estimate
        return True

    def _must_not_send(self) -> bool:
        """A stop that forbids every further POST, even of a job already reserved (a budget or a deadline
        stop only keeps new jobs from starting)."""
        return self.interrupted or self.stop_reason in ("auth", "disk_full", "interrupted", "unreachable", "cancel",
                                                        "unanswered")

    async def _post(self, job: Job, payload: dict, estimate: float) -> str | None:
        """POST the job, retrying only what certainly created nothing; its request id, or None."""
        attempt = 0
        accepted_at_refusal: int | None = None  # submits accepted (all jobs) when this one was last refused
        while True:
            if self._must_not_send():
                self._release(estimate)
                return None
            try:
                async with self._pacer.turn():
                    if self._must_not_send():  # the stop came while this job waited for its turn
                        raise _OutOfTime()
                    # Its place in the rate limit before its intent: a job waiting for the limit (seconds,
                    # for many jobs at a few calls per second) has recorded nothing and is sent nothing
                    # once the run is told to stop; after its intent only the POST itself remains.
                    await self._rate_turn()
                    if self._must_not_send():
                        raise _OutOfTime()
                    await self._intents.commit(job.id)
                    if self._must_not_send():  # the stop came while its intent waited for its commit
                        self._intents.withdraw(job.id)
                        raise _OutOfTime()
                    crashpoint("after_intent")
                    self.calls["submit"] += 1
                    submitted = await self.client.submit(self.manifest.model_of(job).model_id, payload, paced=True)
            except SubmitOutcomeUnknown as exc:
                self._reached()
                self.ledger.set_state(job.id, "unknown", error=("unknown", str(exc)))
                log.warning("%s: unknown: %s", job.id, exc)
                self._unanswered += 1
                if self._unanswered >= UNANSWERED_AFTER and self.stop_reason is None:
                    base = getattr(self.client, "base_url", "?")
                    self.fatal_error = (f"{self._unanswered} submits in a row to {base} got no usable answer "
                                        f"(last: {exc}); each may have created a job, so no more are sent. "
                                        "Check RunComfy's Generations page and the API's status, then run again")
                    log.error("stopping: %s", self.fatal_error)
                    self.stop_submitting("unanswered")
                return None  # it may have been created: its estimate stays counted against the budget
            except AuthError as exc:
                self._reached()
                self.ledger.mark_not_sent(job.id, "auth", str(exc), reached_server=True)
                self._release(estimate)
                self._auth_failed(exc)
                return None
            except TransientApiError as exc:
                if exc.connected:
                    self._reached()
                else:
                    self._not_reached(exc)
                self.ledger.mark_not_sent(job.id, exc.kind, str(exc), reached_server=exc.connected)
                refused = exc.connected and (exc.status == 429 or exc.retry_after is not None)
                # A refusal while other jobs get through is the account's limit at work, not this job
                # failing: it costs an attempt only when nothing was accepted since this job last tried.
                if not refused or accepted_at_refusal == self._submits_accepted:
                    attempt += 1
                accepted_at_refusal = self._submits_accepted if refused else None
                delay = next_delay(exc, attempt - 1, self.policy, self.rand, retryable=submit_is_retryable)
                if delay is None:
                    if not submit_is_retryable(exc):
                        # Defensive: the client reports such failures as SubmitOutcomeUnknown.
                        self.ledger.set_state(job.id, "unknown", error=("unknown", str(exc)))
                    else:
                        self._release(estimate)
                    log.warning("%s: not submitted: %s", job.id, exc)
                    return None
                if refused:
                    # The limit is the account's, not this job's: every submit waits it out.
                    self._pacer.refused(delay)
                    log.info("%s: submit refused (%s); all submits wait %.1fs", job.id, exc, delay)
                    continue
                log.info("%s: submit refused (%s); retrying in %.1fs", job.id, exc, delay)
                await self._nap(delay, submit=True)
                continue
            except ApiError as exc:  # rejected input, unknown model: nothing was created
                self._reached()
                self.ledger.mark_not_sent(job.id, exc.kind, str(exc), reached_server=True)
                # Not a job resubmitted while its earlier POST may have created one (`unknown`, or
                # `submitting` from a run that died): it stays so, to adopt or resubmit knowingly.
                if self.ledger.state_of(job.id) not in ("unknown", "submitting"):
                    self.ledger.set_state(job.id, "failed", error=(exc.kind, str(exc)))
                self._release(estimate)
                log.warning("%s: failed: %s", job.id, exc)
                return None
            self._reached()
            self._submits_accepted += 1
            self._unanswered = 0
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
            try:
                answer = await call()
            except TransientApiError as exc:
                if exc.connected:
                    self._reached()
                else:
                    self._not_reached(exc)
                raise
            except ApiError:
                self._reached()
                raise
            self._reached()
            return answer

        return await with_retries(counted, policy=self.policy, sleep=self._retry_nap, rand=self.rand)

    def _anchor(self, iso: str | None) -> float:
        """The moment `iso` (a ledger timestamp, wall clock) on this run's clock."""
        return self.clock() - _seconds_since(iso)

    async def _wait_remote(self, job: Job, request_id: str, age0: float) -> Result | None:
        """Poll until the job has finished remotely; returns its result, or None to leave it for later.

        A job taken to be waiting in the provider's queue (`RenderStarts`) is not polled on the render
        schedule: it is woken when one of ours finishes and it takes that slot (or when the first render
        time is learned), and otherwise only checked once per slowest recent render (before any is known,
        once per longest backoff, 4x `poll_max_interval`). Before any render time is known, only the job that started
        first probes; the others wait for what it learns, checking with a backoff (from `poll_max_interval`
        up to 4x it) meanwhile."""
        submitted = self.clock() - age0
        anchor = submitted  # when the job was submitted, later when it was first seen completed
        polls, state = 0, "queued"
        unfinished_at = submitted  # when the job was last known unfinished, on this run's clock
        wake = self._wakes[job.id] = _Signal()
        self._starts.submitted(job.id, submitted)
        try:
            while True:
                now = self.clock()
                age = now - submitted
                timed = now - self._timed_from(job.id, submitted, now)
                if timed >= self.settings.job_timeout and polls > 0:
                    return await self._timed_out(job, request_id, state)
                left = self._time_left()
                if left is not None and left <= 0:  # max_wait: leave the job recorded for the next run
                    self.stop_submitting("deadline")
                    return None
                start = self._starts.start_of(job.id)
                if start is None:
                    # Queued: woken when it takes a slot, or when the first render time is learned; checked
                    # now and then only in case the guess is wrong (another client's jobs ahead): once per
                    # slowest recent render, or, before any is known, after the longest backoff.
                    slowest = self.planner.quantile(1.0)
                    delay = max(self.planner.max_interval,
                                slowest if slowest is not None else 4 * self.planner.max_interval)
                elif not self.planner.known and self._starts.leader() != job.id:
                    # The leader probes for all and wakes the rest with what it learns; they back off meanwhile.
                    delay = max(self.planner.max_interval, min(age, 4 * self.planner.max_interval))
                else:
                    delay = self.planner.next_delay(now - start, polls)
                wake.clear()
                if await self._nap(max(0.0, min(delay, self.settings.job_timeout - timed + 0.001) if polls
                                       else delay), clip=True, wake=wake):
                    continue  # it took a freed slot, or render times became known: plan again
                asked = self.clock()
                start = self._starts.start_of(job.id)
                answer = await self._poll(job, request_id, -1.0 if start is None else asked - start, anchor)
                if answer is None:
                    return None
                polls += 1
                answered = self.clock()
                if answer.state in ("queued", "running"):
                    if answer.state != state or polls == 1:
                        self.ledger.record_remote(job.id, answer.raw_status, answer.state,
                                                  started=answer.state == "running")
                        self.on_change()
                    if answer.state == "queued":
                        self._starts.queued(job.id, answer.queue_position)
                    else:  # it started between the last answer and this one
                        self._starts.running(job.id, unfinished_at, asked)
                    state, unfinished_at = answer.state, asked
                    continue
                if anchor == submitted and answer.state == "completed":
                    anchor = self.clock()
                if isinstance(answer, Result):
                    result = answer
                else:
                    result = await self._remote(job, request_id, "result", lambda: self.client.result(request_id),
                                                anchor=anchor)
                    if result is None:
                        return None
                result = await self._settled(job, request_id, result, anchor)
                if result is None:
                    return None
                if result.state in ("queued", "running"):  # status and result disagree: keep polling
                    continue
                self._render_ended(job.id, result, submitted, unfinished_at, answered)
                return result
        finally:
            self._starts.forget(job.id)
            self._wakes.pop(job.id, None)

    def _timed_from(self, key: str, submitted: float, now: float) -> float:
        """When `job_timeout` starts counting for a job: its submission; with `queue_ahead`, its render
        start as far as the client can tell (a job the run itself queued behind its own renders is not
        late for waiting its turn), but never later than one `job_timeout` after its submission, so a
        provider that never starts it still times it out."""
        if not self.settings.queue_ahead:
            return submitted
        start = self._starts.start_of(key)
        return min(now if start is None else max(start, submitted), submitted + self.settings.job_timeout)

    def _render_ended(self, key: str, result: Result, submitted: float, low: float, high: float) -> None:
        """Learn from a job seen finished: it ended after `low` and by `high` (this run's clock), and
        `submitted` plus the server's own duration, as exact as its stamps. The job that takes its
        slot in the provider's queue is woken."""
        planner = self.planner
        planner.stamps.note(result.created_at, result.finished_at)
        span = planner.stamps.span(result.created_at, result.finished_at)
        if span is not None and submitted + span[0] <= high and submitted + span[1] >= low:
            low, high = max(low, submitted + span[0]), min(high, submitted + span[1])
        start = self._starts.start_of(key)
        start = submitted if start is None else start
        finish = high
        # A job cancelled in the queue never rendered; one whose start is a guess says little.
        if result.state != "cancelled" and not self._starts.start_is_guessed(key):
            learned_before = planner.known
            if span is not None and planner.stamps.exact:
                finish = min(high, max(low, submitted + (span[0] + span[1]) / 2))
                planner.observe(finish - start)
            else:
                finish = start + planner.observe_interval(low - start, high - start)
                finish = min(high, max(low, finish))
            if not learned_before:
                for wake in self._wakes.values():  # the jobs waiting for a first render time
                    wake.set()
        freed = self._starts.finished(key, finish)
        if freed is not None and freed in self._wakes:
            self._wakes[freed].set()

    async def _settled(self, job: Job, request_id: str, result: Result, anchor: float) -> Result | None:
        """`result`, or, while it says "completed" without outputs or an error (outputs can be attached a
        moment after the status changes), the result asked again until that has held across
        `not_found_grace` after `anchor`. None if asking failed (recorded on the job)."""
        empty = 0
        while result.state == "completed" and not result.output_urls and not result.error:
            empty += 1
            since = self.clock() - anchor
            if negative_is_final(empty, since, self.settings.not_found_grace):
                break
            log.info("%s: request %s completed without outputs so far; asking again", job.id, request_id)
            await self._nap(doubt_delay(empty, since, self.settings.not_found_grace, self.policy, self.rand))
            fresh = await self._remote(job, request_id, "result", lambda: self.client.result(request_id),
                                       anchor=anchor)
            if fresh is None:
                return None
            result = fresh
        return result

    async def _poll(self, job: Job, request_id: str, age: float, anchor: float) -> Status | Result | None:
        """Ask where a job stands. Once it has probably finished, ask with the result call: the API
        answers it with the current status while the job is unfinished, and a finished job then costs
        one call instead of status + result."""
        if self._result_polls and self.planner.likely_done(age):
            try:
                return await self._remote(job, request_id, "result", lambda: self.client.result(request_id),
                                          anchor=anchor, raise_refusal=True)
            except ApiError as exc:
                # Not what the API documents, but such an answer must not fail or strand a paid job:
                # the status call decides, for this job and every later one.
                self._result_polls = False
                log.info("the API refused a result call for a job that may be unfinished (%s); polling with "
                         "status from now on", exc)
        return await self._remote(job, request_id, "status", lambda: self.client.status(request_id), anchor=anchor)

    async def _remote(self, job: Job, request_id: str, kind: str, call: Callable[[], Awaitable[Any]], *,
                      anchor: float, raise_refusal: bool = False, forget: bool = True) -> Any:
        """A status or result call, retried; after a final failure, records why on the job and returns None
        (the job keeps its state and request id, so a later run asks again). With `raise_refusal`, an
        answer refusing the call (not a transient or auth error) is raised instead of recorded.

        "Not found" is believed only once it has held across `not_found_grace` after `anchor` (the
        job's submission or completion, on this run's clock); until then the call is repeated with
        backoff. Then the job is failed, its money no longer counted, or with `forget=False` the
        `RequestNotFound` is raised for the caller to decide."""
        answers = 0
        while True:
            try:
                return await self._api(kind, call)
            except AuthError as exc:
                self._auth_failed(exc)
            except RequestNotFound as exc:
                if raise_refusal:
                    raise
                answers += 1
                since = self.clock() - anchor
                if not negative_is_final(answers, since, self.settings.not_found_grace):
                    if answers == 1:
                        log.info("%s: the API does not know request %s (%s); asking again until that has held "
                                 "for %gs", job.id, request_id, exc, self.settings.not_found_grace)
                    await self._nap(doubt_delay(answers, since, self.settings.not_found_grace, self.policy,
                                                self.rand))
                    continue
                if not forget:
                    raise
                self._remote_gone(job, request_id, exc, answers, since)
            except ApiError as exc:
                if raise_refusal and not isinstance(exc, TransientApiError):
                    raise
                self._record_error(job.id, exc.kind, f"the {kind} call failed: {exc}; the next run asks again")
            return None

    def _remote_gone(self, job: Job, request_id: str, exc: ApiError, answers: int, since: float) -> None:
        message = (f"the API no longer knows request {request_id} ({exc}; {answers} answers alike, the last "
                   f"{since:.0f}s after the job was submitted or finished); it may have expired")
        if job.id not in self._previous:  # --retry-failed runs only the manifest's job as written
            message += (". Use --retry-failed to ask again and, if it is still unknown, submit the job again")
        if self.ledger.cost_of(job.id) is None:
            self._release(self._estimate(job))  # no longer counted: see spend.job_cost
        self.ledger.set_state(job.id, "failed", error=("not_found", message))
        log.warning("%s: failed: %s", job.id, message)

    async def _recheck(self, job: Job, row: JobRow) -> tuple[str | None, float]:
        """`--retry-failed` for a job that has a request id: ask that request first. If the API knows
        it and it has not failed, its money counts again and it is polled and collected; only a request
        the API does not know (after the grace window) or that failed or was cancelled is submitted
        again. Returns the request id to poll and its age, or (None, 0) to stop here."""
        request_id = row.request_id
        anchor = self._anchor(row.finished_at or row.submitted_at)
        try:
            status = await self._remote(job, request_id, "status", lambda: self.client.status(request_id),
                                        anchor=anchor, forget=False)
        except RequestNotFound:
            log.info("%s: request %s is unknown to the API; submitting the job again", job.id, request_id)
            return await self._submit(job), 0.0
        if status is None:  # could not ask: leave the job as it is, its request id kept
            return None, 0.0
        if status.state in ("failed", "cancelled"):
            log.info("%s: request %s %s remotely; submitting the job again", job.id, request_id, status.state)
            return await self._submit(job), 0.0
        state = status.state if status.state in ("queued", "running") else "running"
        self.committed_usd += self.manifest.estimate_cost(job) - (row.cost_usd or 0.0)
        self.ledger.set_state(job.id, state, clear_error=True, remote_status=status.raw_status, cost_usd=None,
                              finished_at=None)
        log.info("%s: request %s is %s after all; collecting it", job.id, request_id, status.raw_status)
        return request_id, _seconds_since(row.submitted_at)

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
                self._release(self._estimate(job))
                log.warning("%s: cancelled: still queued after %g min", job.id, minutes)
                return None
        self.ledger.set_state(job.id, state, error=("timeout", f"not finished after {minutes:g} min; request "
                                                    f"{request_id} is kept and the next run collects it"))
        log.warning("%s: timed out after %g min; left for the next run", job.id, minutes)
        return None

    # -- collect -----------------------------------------------------------------------------------
    async def _collect(self, job: Job, request_id: str | None, result: Result | None,
                       recorded_cost: float | None = None, *, anchor: float | None = None) -> None:
        """Record a finished job's outcome and download its outputs. `recorded_cost` is what the ledger
        already holds for a job collected again (its files were damaged), counted in `committed_usd`;
        `anchor` is when it finished (or was submitted), on this run's clock."""
        if request_id is None:
            self.ledger.set_state(job.id, "failed", error=("internal", "no request id recorded"))
            return
        if result is None:
            anchor = self.clock() if anchor is None else anchor
            result = await self._remote(job, request_id, "result", lambda: self.client.result(request_id),
                                        anchor=anchor)
            if result is not None:
                result = await self._settled(job, request_id, result, anchor)
            if result is None:
                return
            if result.state in ("queued", "running"):
                self.ledger.record_remote(job.id, result.raw_status, result.state, started=True)
                return
        finished = {"finished_at": _utc_iso(result.finished_at), "remote_status": result.raw_status}
        # What `committed_usd` holds for this job so far: its recorded cost (a done job collected
        # again), else its estimate. Replaced below by what the result says, as `Ledger.spent_usd` counts it.
        held = recorded_cost if recorded_cost is not None else self._estimate(job)
        if result.state == "cancelled":
            self.ledger.set_state(job.id, "cancelled", error=("cancelled", "cancelled remotely"), **finished)
            self._release(held)
            return
        if result.state == "failed" or not result.output_urls:
            message = result.error or "the job finished without any output"
            self.ledger.set_state(job.id, "failed", error=("remote", message), cost_usd=result.cost_usd,
                                  cost_flag=result.cost_flag, **finished)
            self._release(held - (result.cost_usd or 0.0))
            log.warning("%s: failed remotely: %s", job.id, message)
            return
        cost = result.cost_usd if result.cost_usd is not None else self._estimate(job)
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
                self._provenance.add(job.id)
                log.info("%s: done", job.id)

    def _output_name(self, job: Job, index: int, url: str) -> str:
        suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
        kind = self.manifest.model_of(job).output_kind
        suffix = suffix if suffix in VIDEO_SUFFIXES else DEFAULT_SUFFIX.get(kind, ".mp4")
        return f"{job.id}{suffix}" if index == 0 else f"{job.id}-{index + 1}{suffix}"

    async def _download_all(self, job: Job, request_id: str, urls: list[str]) -> list[Output] | None:
        """Every output on disk and verified, or None (the error is recorded) to leave it for later."""
        output_dir = self.manifest.output_dir
        max_bytes = int(self.settings.max_video_mb * 1024 * 1024)
        outputs: list[Output] = []
        kind = self.manifest.model_of(job).output_kind
        refreshes, part_size = 0, 0
        index = 0
        while index < len(urls):
            name = self._output_name(job, index, urls[index])
            url = urls[index]
            try:
                got = await with_retries(
                    lambda url=url, name=name: self._count_download(url, output_dir / name, max_bytes, kind),
                    policy=self.policy, sleep=self._retry_nap, rand=self.rand,
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
            outputs.append(Output(index, name, got.bytes, got.sha256, got.mtime_ns, got.inode))
            index, refreshes, part_size = index + 1, 0, 0
        return outputs

    async def _count_download(self, url: str, dest: Path, max_bytes: int, kind: str):
        self.calls["download"] += 1
        return await dl.download(self.session, url, dest, kind=kind,
                                 hosts=self.output_hosts, max_bytes=max_bytes)
