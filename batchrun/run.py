"""One run of a manifest, end to end: lock the output dir, plan from the ledger, schedule, report.

`run_manifest` is the library entry point behind `batchrun run`; it owns the sessions, the signal
handlers, run.log and results.jsonl, and returns a `RunOutcome` whose `exit_code` follows SPEC.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from tqdm import tqdm

from batchrun import schema
from batchrun.api import Client, make_limiter
from batchrun.errors import LedgerError, UsageError
from batchrun.ledger import Ledger
from batchrun.lock import OutputDirLock
from batchrun.manifest import Manifest
from batchrun.plan import Plan, RunOptions, make_plan
from batchrun.progress import Progress, describe
from batchrun.results import write_results
from batchrun.scheduler import Scheduler
from batchrun.servertext import server_text

log = logging.getLogger("batchrun")
RUN_LOG = "run.log"
RUN_LOG_MAX_BYTES = 10 * 1024 * 1024
AUTO_REPORT_MAX_JOBS = 10_000
SANDBOX_TOKEN = "sandbox-token"

EXIT_OK, EXIT_NOT_DONE, EXIT_AUTH, EXIT_INTERRUPTED = 0, 1, 3, 130


@dataclass
class RunOutcome:
    exit_code: int
    counts: dict[str, int]  # states of the manifest's jobs after the run
    spent_usd: float
    lines: list[str] = field(default_factory=list)  # the closing report, for people


class _OneSafeLine(logging.Filter):
    """Each line for run.log and the console as one line, capped, with the token blanked out.

    Server text is made safe where it enters batchrun (`api`, `servertext`); this is the last guard
    for text quoted from elsewhere, e.g. an exception a library raised about a redirect's target."""

    MAX_CHARS = 4000

    def __init__(self, secrets: tuple[str, ...]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not stop the run
            message = str(record.msg)
        record.msg, record.args = server_text(message, self.MAX_CHARS, self.secrets), None
        return True


class _ConsoleHandler(logging.Handler):
    """Warnings to the terminal without tearing the progress bar."""

    def __init__(self, stream: TextIO):
        super().__init__(logging.WARNING)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"batchrun: {record.getMessage()}", file=self.stream)


class _RunLogHandler(logging.handlers.RotatingFileHandler):
    """run.log, rotated so that years of nightly cron runs cannot fill the disk (run.log.1, run.log.2).

    Lines are flushed at most every `FLUSH_SECONDS` (and on warnings and at the end) rather than one
    write per line: a fast batch logs thousands of lines, and the ledger, not this log, is the record."""

    FLUSH_SECONDS = 0.5

    def __init__(self, path: Path, stream: TextIO):
        super().__init__(path, maxBytes=RUN_LOG_MAX_BYTES, backupCount=2, encoding="utf-8")
        self._flushed = time.monotonic()
        self._urgent = False
        self._size = path.stat().st_size if path.exists() else 0
        self._console = stream
        self._broken = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        # A full disk must not turn every later log line into a traceback: say it once, then drop lines.
        if not self._broken:
            self._broken = True
            tqdm.write(f"batchrun: cannot write {RUN_LOG} any more: {sys.exc_info()[1]}", file=self._console)

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 - logging's name
        # Counted here rather than by seeking to the end of the file for every line, as the base class does.
        self._size += len(self.format(record)) + 1
        if self._size < self.maxBytes:
            return False
        self._size = 0
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if self._broken:
            return
        self._urgent = record.levelno >= logging.WARNING
        super().emit(record)

    def flush(self) -> None:
        now = time.monotonic()
        if self._urgent or now - self._flushed >= self.FLUSH_SECONDS:
            self.force_flush()

    def force_flush(self) -> None:
        self._flushed = time.monotonic()
        try:
            super().flush()
        except OSError:
            self.handleError(None)

    def close(self) -> None:
        self.force_flush()
        try:
            super().close()
        except OSError:
            self.handleError(None)


async def _flush_periodically(handler: _RunLogHandler) -> None:
    while True:
        await asyncio.sleep(handler.FLUSH_SECONDS)
        handler.force_flush()


def _open_run_log(output_dir: Path, stream: TextIO) -> _RunLogHandler:
    handler = _RunLogHandler(output_dir / RUN_LOG, stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    handler.setLevel(logging.INFO)
    return handler


def _refresh_report(output_dir: Path, jobs_in_ledger: int) -> None:
    """report.html follows every run; a failure here must not change what the run achieved."""
    from batchrun.report import write_report

    if jobs_in_ledger > AUTO_REPORT_MAX_JOBS:
        # A gallery of that many cards takes longer to write than a nightly run should spend on it.
        log.info("report.html not refreshed for %d jobs (over %d): run 'batchrun report' to write it",
                 jobs_in_ledger, AUTO_REPORT_MAX_JOBS)
        return
    try:
        write_report(output_dir)
    except Exception as exc:  # noqa: BLE001 - the report is a convenience, the ledger is the record
        log.warning("could not refresh report.html: %s", exc)


def _prepare_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{output_dir} exists and is not a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot create the output directory {output_dir}: {exc.strerror}") from None
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir} is not a directory")


async def _preflight(manifest: Manifest, ledger: Ledger, plan: Plan, options: RunOptions, stream: TextIO) -> None:
    """Check the image URLs of the jobs about to be submitted; hold (never pay for) those that would fail."""
    from batchrun.preflight import ImageCheck, check_urls, doomed_jobs, problems_for

    values = (value for job in plan.submit for _, value in schema.image_values(manifest.model, job.input))
    urls = list(dict.fromkeys(value for value in values if schema.image_ref_kind(value) == "url"))
    if not urls:
        return
    cached = {row["url"]: ImageCheck(**{**row, "ok": bool(row["ok"])}) for row in ledger.preflight_cache()}
    connector = aiohttp.TCPConnector(ssl=options.preflight_ssl if options.preflight_ssl is not None else True)
    async with aiohttp.ClientSession(connector=connector) as session:
        checks = await check_urls(urls, session=session, cached=cached)
    ledger.save_preflight(vars(c) for c in checks.values() if c.ok and c.url not in cached)
    fetched = sum(1 for url in urls if url not in cached)
    doomed = {job_id: why for job_id, why in doomed_jobs(manifest, checks).items()
              if job_id in {job.id for job in plan.submit}}
    print(f"preflight: {len(urls)} image URLs, {fetched} fetched, {len(urls) - fetched} known good from earlier runs; "
          f"{len(doomed)} jobs held", file=stream)
    if not doomed:
        return
    for problem in problems_for(manifest, checks)[:50]:
        print(problem, file=stream)
    kept = []
    for job in plan.submit:
        if job.id in doomed:
            reason = f"preflight: {doomed[job.id]}; fix the image or run with --no-preflight"
            ledger.set_error(job.id, "preflight", reason)
            plan.held.append((job, reason))
        else:
            kept.append(job)
    plan.submit = kept


def plan_lines(plan: Plan) -> list[str]:
    parts = [f"{len(plan.submit)} to submit", f"{len(plan.poll)} to resume", f"{len(plan.collect)} to download",
             f"{len(plan.skip)} already done"]
    if plan.held:
        parts.append(f"{len(plan.held)} held")
    if plan.refused:
        parts.append(f"{len(plan.refused)} refused")
    lines = ["plan: " + ", ".join(parts)]
    lines += [f"  refused: {message}" for _, message in plan.refused]
    lines += [f"  held: {job.id}: {why}" for job, why in plan.held[:20]]
    if len(plan.held) > 20:
        lines.append(f"  ... and {len(plan.held) - 20} more held (see 'batchrun status')")
    return lines


def _closing_lines(manifest: Manifest, ledger: Ledger, scheduler: Scheduler, plan: Plan) -> list[str]:
    counts = Counter(ledger.state_of(job.id) for job in manifest.jobs)
    lines = [f"{len(manifest.jobs)} jobs: {describe(counts)}; spent in this output dir: ${scheduler.committed_usd:.2f} "
             f"(actual where the API reported it, else estimated)"]
    # Only jobs not done are read back: on a clean 100,000-job run that is none.
    not_done = [job.id for job in manifest.jobs if ledger.state_of(job.id) != "done"]
    attention = [row for row in map(ledger.get, not_done[:21]) if row is not None]
    for row in attention[:20]:
        why = f": {row.error['message']}" if row.error else ""
        lines.append(f"  {row.id}: {row.state}{why}")
    if len(not_done) > 20:
        lines.append(f"  ... and {len(not_done) - 20} more (see 'batchrun status')")
    budget = manifest.settings.budget_usd
    reason = {
        "budget": f"budget reached: no job was submitted that would take spend over ${budget or 0:.2f}",
        "auth": f"stopped by the API: {scheduler.auth_error}",
        "deadline": "max_wait reached: no new jobs submitted; jobs in flight are collected by the next run",
        "interrupted": "interrupted: jobs in flight are recorded; the next run picks them up",
        "disk_full": f"stopped: {scheduler.fatal_error}",
    }.get(scheduler.stop_reason or "")
    if reason:
        lines.append(reason)
    if scheduler.interrupted and scheduler.stop_reason != "interrupted":
        lines.append("interrupted: jobs in flight are recorded; the next run picks them up")
    lines.append(f"results: {manifest.output_dir / 'results.jsonl'}")
    return lines


def _exit_code(manifest: Manifest, ledger: Ledger, scheduler: Scheduler) -> int:
    if scheduler.interrupted:
        return EXIT_INTERRUPTED
    if scheduler.stop_reason == "auth":
        return EXIT_AUTH
    all_done = all(ledger.state_of(job.id) == "done" for job in manifest.jobs)
    return EXIT_OK if all_done else EXIT_NOT_DONE


def _install_signals(scheduler: Scheduler, stream: TextIO) -> Callable[[], None]:
    """First Ctrl-C: stop submitting and finish what is in flight. Second, or SIGTERM: leave now."""
    loop = asyncio.get_running_loop()
    presses = {"n": 0}

    def on_interrupt() -> None:
        presses["n"] += 1
        if presses["n"] == 1:
            tqdm.write("batchrun: stopping: no new jobs; finishing those in flight (Ctrl-C again to leave now)",
                       file=stream)
            scheduler.stop_submitting("interrupted")
        else:
            scheduler.abort()

    def on_terminate() -> None:
        scheduler.abort()

    try:
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        loop.add_signal_handler(signal.SIGTERM, on_terminate)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        return lambda: None

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)

    return remove


async def run_manifest(
    manifest: Manifest,
    *,
    base_url: str | None,
    token: str | None,
    options: RunOptions = RunOptions(),
    sandbox: bool = False,
    stream: TextIO = sys.stderr,
    progress: bool | None = None,
    handle_signals: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> RunOutcome:
    """Run every job of `manifest` that needs it. `sandbox=True` starts the built-in emulator."""
    output_dir = manifest.output_dir
    _prepare_output_dir(output_dir)
    with OutputDirLock(output_dir):
        ledger = Ledger.open(output_dir)
        handler = _open_run_log(output_dir, stream)
        console = _ConsoleHandler(stream)
        for sink in (handler, console):
            sink.addFilter(_OneSafeLine((token,) if token else ()))
        log.addHandler(handler)
        log.addHandler(console)
        log.setLevel(logging.INFO)
        flusher = asyncio.create_task(_flush_periodically(handler))
        try:
            return await _run_locked(manifest, ledger, base_url=base_url, token=token, options=options,
                                     sandbox=sandbox, stream=stream, progress=progress,
                                     handle_signals=handle_signals, clock=clock, sleep=sleep, rand=rand)
        finally:
            flusher.cancel()
            log.removeHandler(handler)
            log.removeHandler(console)
            handler.close()
            ledger.close()


async def _run_locked(manifest: Manifest, ledger: Ledger, *, base_url, token, options, sandbox, stream, progress,
                      handle_signals, clock, sleep, rand) -> RunOutcome:
    run_id = ledger.start_run()
    log.info("run %d of %s (%d jobs) into %s", run_id, manifest.path, len(manifest.jobs), manifest.output_dir)
    plan = make_plan(manifest, ledger, options)
    if options.preflight and sandbox:
        print("preflight: skipped with --sandbox (the sandbox does not fetch images)", file=stream)
    elif options.preflight and plan.submit:
        await _preflight(manifest, ledger, plan, options, stream)
    for line in plan_lines(plan):
        log.info("%s", line)
        print(line, file=stream)
    async with AsyncExitStack() as stack:
        if sandbox:
            from batchrun.sandbox import Sandbox

            emulator = await stack.enter_async_context(Sandbox(render_seconds=lambda rng: rng.uniform(1.0, 3.0)))
            base_url, token = emulator.base_url, SANDBOX_TOKEN
            log.info("using the built-in sandbox at %s", base_url)
        api_session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        # Downloads use their own session: the storage host must never see API credentials.
        download_session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        client = Client(api_session, base_url, token,
                        limiter=make_limiter(manifest.settings.requests_per_second))
        scheduler = Scheduler(manifest, ledger, client, download_session, options=options, clock=clock,
                              sleep=sleep, rand=rand)
        counts = ledger.counts
        show_bar = stream.isatty() if progress is None else progress and stream.isatty()
        display = Progress(len(manifest.jobs), counts, lambda: scheduler.committed_usd, stream=stream,
                           bar=show_bar) if progress is not False else None
        refresher = asyncio.create_task(display.run_periodically()) if display else None
        remove_signals = _install_signals(scheduler, stream) if handle_signals else (lambda: None)
        try:
            await scheduler.run(plan)
        finally:
            remove_signals()
            if refresher:
                refresher.cancel()
            if display:
                display.close()
    try:
        write_results(ledger, manifest.output_dir)
    except OSError as exc:  # the ledger holds it all; the next run writes results.jsonl again
        log.warning("could not rewrite results.jsonl: %s", exc)
    _refresh_report(manifest.output_dir, sum(ledger.counts().values()))
    exit_code = _exit_code(manifest, ledger, scheduler)
    if plan.refused and exit_code == EXIT_OK:
        exit_code = EXIT_NOT_DONE
    lines = _closing_lines(manifest, ledger, scheduler, plan)
    for line in lines:
        log.info("%s", line)
    counts_now = dict(Counter(ledger.state_of(job.id) for job in manifest.jobs))
    try:
        ledger.finish_run(run_id, exit_code, {"counts": counts_now, "spent_usd": scheduler.committed_usd,
                                              "stop_reason": scheduler.stop_reason,
                                              "calls": dict(scheduler.calls)})
    except LedgerError as exc:
        log.warning("could not record the end of this run: %s", exc)
    return RunOutcome(exit_code, counts_now, scheduler.committed_usd, lines)
