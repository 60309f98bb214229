"""One run of a manifest, end to end: lock the output dir, plan from the ledger, schedule, report.

`run_manifest` is the library entry point behind `batchrun run`; it owns the sessions, the signal
handlers, run.log and results.jsonl, and returns a `RunOutcome` whose `exit_code` follows SPEC.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
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

from batchrun import console, mediafacts, outputhosts, provenance, schema, startimages, stoprequest
from batchrun.api import Client, make_limiter
from batchrun.balance import balance_url as default_balance_url
from batchrun.balance import fetch_balance, judge
from batchrun.errors import LedgerError, UsageError
from batchrun.fsutil import open_append, remove_stale_temps
from batchrun.ledger import Ledger
from batchrun.ledger_index import LedgerIndex, check_new_ledger
from batchrun.lock import OutputDirLock
from batchrun.manifest import Manifest
from batchrun.plan import GONE, PREVIOUS_INPUT, Plan, RunOptions, make_plan, outputs_intact
from batchrun.progress import Progress, describe, write_line
from batchrun.results import results_current, write_results
from batchrun.scheduler import Scheduler
from batchrun.servertext import server_text
from batchrun.spend import Spend

log = logging.getLogger("batchrun")
RUN_LOG = "run.log"
RUN_LOG_MAX_BYTES = 10 * 1024 * 1024
# A run refreshes report.html itself only for an output dir of fewer jobs than this (`batchrun report`
# writes it at any size): a gallery of that many cards takes longer to write than a nightly run should
# spend on it (about 4 s at 10,000 jobs).
AUTO_REPORT_JOBS = 10_000
SANDBOX_TOKEN = "sandbox-token"

EXIT_OK, EXIT_NOT_DONE, EXIT_AUTH, EXIT_INTERRUPTED = 0, 1, 3, 130


def report_is_automatic(jobs_in_ledger: int) -> bool:
    """Whether a run refreshes report.html for an output dir holding this many jobs: fewer than 10,000."""
    return jobs_in_ledger < AUTO_REPORT_JOBS


@dataclass
class RunOutcome:
    exit_code: int
    counts: dict[str, int]  # states of the manifest's jobs after the run
    spent_usd: float
    lines: list[str] = field(default_factory=list)  # the closing report, for people
    run_spent_usd: float = 0.0  # committed by this run (actual where reported, else estimated)


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
        write_line(f"batchrun: {record.getMessage()}", self.stream)


class _RunLogHandler(logging.handlers.RotatingFileHandler):
    """run.log, rotated so that years of nightly cron runs cannot fill the disk (run.log.1, run.log.2).

    Lines are flushed at most every `FLUSH_SECONDS` (and on warnings and at the end) rather than one
    write per line: a fast batch logs thousands of lines, and the ledger, not this log, is the record."""

    FLUSH_SECONDS = 0.5

    def __init__(self, path: Path, stream: TextIO):
        super().__init__(path, maxBytes=RUN_LOG_MAX_BYTES, backupCount=2, encoding="utf-8")
        self._flushed = time.monotonic()
        self._urgent = False
        self._size = os.fstat(self.stream.fileno()).st_size
        self._console = stream
        self._broken = False
        self._last_record: logging.LogRecord | None = None
        self._last_line = ""

    def _open(self):
        # Never through a symlink (the base class's open() follows one): a line of server text appended
        # to a planted `run.log -> ~/.bashrc` would run at the next login. Rotation only renames, which
        # moves a link itself and never writes through it.
        return os.fdopen(open_append(Path(self.baseFilename)), "a", encoding="utf-8")

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        # A full disk must not turn every later log line into a traceback: say it once, then drop lines.
        if not self._broken:
            self._broken = True
            write_line(f"batchrun: cannot write {RUN_LOG} any more: {sys.exc_info()[1]}", self._console)

    def format(self, record: logging.LogRecord) -> str:
        # shouldRollover and emit both format each record: the second time costs nothing.
        if record is not self._last_record:
            self._last_record, self._last_line = record, super().format(record)
        return self._last_line

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
    try:
        handler = _RunLogHandler(output_dir / RUN_LOG, stream)
    except OSError as exc:  # UnsafeFile (a link, a FIFO) is not one: it says why itself
        raise UsageError(f"cannot write {output_dir / RUN_LOG}: {exc.strerror}") from None
    handler.setFormatter(console.utc_formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    return handler


def _read_media_facts(output_dir: Path, ledger: Ledger) -> None:
    """Duration, size, frame rate, audio and a poster frame of each new video; never changes the run's outcome."""
    try:
        mediafacts.fill(ledger, output_dir)
    except Exception as exc:  # noqa: BLE001 - the files are verified; facts are for people
        log.warning("could not read the media facts of the new videos: %s", exc)


def _refresh_report(output_dir: Path, jobs_in_ledger: int, manifest: Manifest) -> None:
    """report.html follows every run; a failure here must not change what the run achieved."""
    from batchrun.report import write_report

    if not report_is_automatic(jobs_in_ledger):
        log.info("%s", _report_not_refreshed(output_dir, jobs_in_ledger))
        return
    try:
        write_report(output_dir, listed={job.id for job in manifest.jobs})
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

    values = (value for job in plan.submit for _, value in schema.image_values(manifest.model_of(job), job.input))
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
    print(f"preflight: {_plural(len(urls), 'image URL')}, {fetched} fetched, {len(urls) - fetched} known good from "
          f"earlier runs; {_plural(len(doomed), 'job')} held", file=stream)
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


def _rewrite_provenance(output_dir: Path, ledger: Ledger, plan: Plan) -> None:
    """`<id>.json` of done jobs whose file went missing or was damaged (or that a killed run had not
    written yet: see batchrun.provenance), rebuilt from the ledger, read in one pass."""
    if not plan.provenance:
        return
    fresh = {row.id: row for row in ledger.get_many(row.id for row in plan.provenance)}
    rows = [fresh.get(row.id, row) for row in plan.provenance]
    failed, written = provenance.write_all(output_dir, rows)
    failed = dict(failed)
    plan.provenance_failed = [row.id for row in rows if row.id in failed]
    for row in rows:
        if row.id in failed:
            log.warning("%s: could not rewrite %s.json: %s", row.id, row.id, failed[row.id])
        else:
            log.info("%s: rewrote %s.json, which was missing or damaged", row.id, row.id)
    provenance.record(ledger, written)


async def _check_balance(manifest: Manifest, plan: Plan, scheduler: Scheduler, session: aiohttp.ClientSession,
                         url: str, token: str, stream: TextIO) -> None:
    """Ask the balance once; cap this run's new spend by it, or stop submitting if it does not cover
    the first job (jobs already in flight are still collected: that costs nothing)."""
    answer = await fetch_balance(url, token, session=session)
    in_flight = sum(row.cost_usd if row.cost_usd is not None else manifest.estimate_cost(job)
                    for job, row in plan.poll)
    verdict = judge(answer, [manifest.estimate_cost(job) for job in plan.submit], in_flight,
                    manifest.settings.budget_usd)
    if verdict.failed:
        log.warning("%s", verdict.line)
        return
    log.info("%s", verdict.line)
    print(verdict.line, file=stream)
    scheduler.balance_room_usd = verdict.limit_room_usd
    scheduler.balance_limit = scheduler.committed_usd + verdict.limit_room_usd
    if verdict.refuse:
        scheduler.stop_submitting("no_balance")


def _events_handler(stream: TextIO) -> logging.Handler:
    """Per-job events (the scheduler's log lines) and warnings, as lines on `stream` (`run --verbose`)."""
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.INFO)
    handler.addFilter(lambda record: record.name != log.name or record.levelno >= logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def plan_lines(plan: Plan) -> list[str]:
    parts = [f"{len(plan.submit)} to submit", f"{len(plan.poll)} to resume", f"{len(plan.collect)} to download",
             f"{len(plan.skip)} already done"]
    if plan.recheck:
        parts.append(f"{len(plan.recheck)} to ask again (submitted again only if lost or failed)")
    if plan.held:
        parts.append(f"{len(plan.held)} held")
    if plan.refused:
        parts.append(f"{len(plan.refused)} refused")
    lines = ["plan: " + ", ".join(parts)]
    lines += [f"  refused: {message}" for _, message in plan.refused[:20]]
    if len(plan.refused) > 20:
        lines.append(f"  ... and {len(plan.refused) - 20} more refused (see 'batchrun status')")
    if plan.gone and plan.new:  # such as a job without an id whose input changed: its derived id did too
        lines.append(f"  new: {_ids([job.id for job in plan.new])}")
        lines.append(f"  no longer in the manifest (kept in the ledger): {_ids([row.id for row in plan.gone])}")
    for why in (GONE, PREVIOUS_INPUT):
        ids = [job_id for job_id, (_, reason) in plan.previous.items() if reason == why]
        if ids:
            lines.append(f"  to collect, {why}: {_ids(ids)}")
    lines += [f"  held: {job.id}: {why}" for job, why in plan.held[:20]]
    if len(plan.held) > 20:
        lines.append(f"  ... and {len(plan.held) - 20} more held (see 'batchrun status')")
    return lines


def _ids(ids: list[str], limit: int = 20) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _previous_not_done(ledger: Ledger, plan: Plan) -> list[str]:
    """Requests not made with the manifest's job as written that this run set out to collect and did not."""
    return [job_id for job_id in plan.previous if ledger.state_of(job_id) != "done"]


def _closing_lines(manifest: Manifest, ledger: Ledger, scheduler: Scheduler, plan: Plan, spend: Spend,
                   unrepaired: list[str]) -> list[str]:
    counts = Counter(ledger.state_of(job.id) for job in manifest.jobs)
    refused = {job.id: why for job, why in plan.refused}
    refused_note = f" ({_plural(len(refused), 'job')} refused, see below)" if refused else ""
    lines = [f"{_plural(len(manifest.jobs), 'job')}: {describe(counts)}{refused_note}; spent in this output dir: "
             f"{spend.describe()} (actual where the API reported it, else estimated)"]
    lines += [f"  refused: {why}" for why in list(refused.values())[:20]]
    if len(refused) > 20:
        lines.append(f"  ... and {len(refused) - 20} more refused (see 'batchrun status')")
    # Jobs waiting their turn are counted, not listed: after a budget stop or a Ctrl-C they can be
    # thousands, and say nothing a person must act on. Only the others are read back from the ledger.
    waiting = Counter()
    attention_ids = []
    for job in manifest.jobs:
        if job.id in refused:
            continue
        state = ledger.state_of(job.id)
        if state != "done" and job.id in scheduler.problems:
            attention_ids.append(job.id)
        elif state in ("pending", "queued", "running", "downloading"):
            waiting[state] += 1
        elif state != "done":
            attention_ids.append(job.id)
    for row in filter(None, map(ledger.get, attention_ids[:20])):
        why = f": {row.error['message']}" if row.error else ""
        lines.append(f"  {row.id}: {row.state}{why}")
    if len(attention_ids) > 20:
        lines.append(f"  ... and {len(attention_ids) - 20} more needing attention (see 'batchrun status')")
    if waiting["pending"]:
        if scheduler.stop_reason == "budget":
            lines.append(f"  {waiting['pending']} pending: not submitted; raise budget_usd (or pass --budget) to "
                         "submit them, or the next run stops at the budget again")
        else:
            lines.append(f"  {waiting['pending']} pending: not submitted yet; the next run submits them")
    in_flight = waiting["queued"] + waiting["running"] + waiting["downloading"]
    if in_flight:
        lines.append(f"  {in_flight} in flight or downloading: the next run collects them")
    lines += _previous_lines(ledger, plan, unrepaired)
    failed = set(plan.provenance_failed)
    names = [f"{row.id}.json" for row in plan.provenance if row.id not in failed]
    if names:
        lines.append(f"rewrote {_plural(len(names), 'provenance file')} that {'was' if len(names) == 1 else 'were'} "
                     f"missing or damaged: {_ids(names)}")
    if failed:
        names = [f"{job_id}.json" for job_id in plan.provenance_failed]
        lines.append(f"could not rewrite {_plural(len(names), 'provenance file')} (see run.log; remove whatever "
                     f"is in the way, then run again): {_ids(names)}")
    budget = manifest.settings.budget_usd
    blocked = scheduler.budget_block
    reason = {
        "budget": f"budget reached: {spend.describe()} committed of the ${budget or 0:.2f} budget"
                  + (f"; the next job ({blocked[0]}) would cost ${blocked[1]:.2f}, over ${budget or 0:.2f}"
                     if blocked else ""),
        "balance": f"balance reached: no job was submitted that would take this run's spend over the "
                   f"${scheduler.balance_room_usd or 0:.2f} the balance had room for; add funds and run again",
        "no_balance": "stopped before paying: the balance does not cover the first job to submit; add funds "
                      "and run again",
        "auth": f"stopped by the API: {scheduler.auth_error}",
        "deadline": "max_wait reached: no new jobs submitted; jobs in flight are collected by the next run",
        "interrupted": _INTERRUPTED_SANDBOX if scheduler.simulated else _INTERRUPTED,
        "disk_full": f"stopped: {scheduler.fatal_error}",
        "cancel": "stopped submitting: 'batchrun cancel' asked; jobs not submitted stay pending for the next run",
        "unreachable": f"stopped: {scheduler.fatal_error}",
        "unanswered": f"stopped submitting: {scheduler.fatal_error}",
    }.get(scheduler.stop_reason or "")
    if reason:
        lines.append(reason)
    if scheduler.interrupted and scheduler.stop_reason != "interrupted":
        lines.append(_INTERRUPTED_SANDBOX if scheduler.simulated else _INTERRUPTED)
    lines.append(f"results: {manifest.output_dir / 'results.jsonl'}")
    # The report is written after these lines (once the run's end is recorded), for fewer than
    # AUTO_REPORT_JOBS jobs; a failure to write it is logged as a warning.
    jobs_in_ledger = sum(ledger.counts().values())
    if report_is_automatic(jobs_in_ledger):
        lines.append(f"report: {manifest.output_dir / 'report.html'}")
    else:
        lines.append(_report_not_refreshed(manifest.output_dir, jobs_in_ledger))
    return lines


def _report_not_refreshed(output_dir: Path, jobs_in_ledger: int) -> str:
    return (f"report: not refreshed by runs of {AUTO_REPORT_JOBS:,} jobs or more (this output dir holds "
            f"{jobs_in_ledger:,}); write it with: batchrun report {output_dir}")


_INTERRUPTED = "interrupted: jobs in flight are recorded; the next run picks them up"
_INTERRUPTED_SANDBOX = ("interrupted: jobs in flight are recorded, but this --sandbox ends with the process: a "
                        "new one cannot know them, so the next --sandbox run fails them (use 'batchrun sandbox' "
                        "in another terminal to try resuming)")


def _unrepaired(ledger: Ledger, plan: Plan) -> list[str]:
    """Done jobs this run set out to download again (a file missing or damaged) whose files are still not
    intact: checked on disk, so the closing lines never claim a repair that did not happen."""
    repairs = [job.id for job, row in plan.collect if row.state == "done" and job.id not in plan.previous]
    current = {row.id: row for row in ledger.get_many(repairs)}
    found = []
    for job_id in repairs:
        now = current.get(job_id)
        if now is None or now.state != "done" or not outputs_intact(ledger.path.parent, now):
            found.append(job_id)
    return found


def _previous_lines(ledger: Ledger, plan: Plan, unrepaired: list[str]) -> list[str]:
    """What became of paid requests that are not the manifest's job as written (see `Plan.previous`), and
    of done jobs whose files were missing or damaged (checked again: only a repair that happened is said)."""
    lines = []
    not_repaired = set(unrepaired)  # a set: a whole dir of deleted videos is 100,000 jobs to collect again
    repaired = [job.id for job, row in plan.collect if row.state == "done" and job.id not in plan.previous
                and job.id not in not_repaired]
    if repaired:
        lines.append(f"downloaded again the missing or damaged files of {_plural(len(repaired), 'job')}: "
                     f"{_ids(repaired)}")
    if unrepaired:
        lines.append(f"could not repair the missing or damaged files of {_plural(len(unrepaired), 'job')}: "
                     f"{_ids(unrepaired)} (their lines above, and 'batchrun status', say why and what to do)")
    for why in (GONE, PREVIOUS_INPUT):
        done = [job_id for job_id, (_, reason) in plan.previous.items()
                if reason == why and ledger.state_of(job_id) == "done"]
        if done:
            whose = ("of a job" if len(done) == 1 else "of jobs") if why == GONE else ""
            lines.append(f"collected {_plural(len(done), 'render')} {whose + ' ' if whose else ''}{why}: {_ids(done)}")
    for job_id in _previous_not_done(ledger, plan)[:20]:
        row = ledger.get(job_id)
        if row is not None:
            error = f": {row.error['message']}" if row.error else ""
            lines.append(f"  {job_id} ({plan.previous[job_id][1]}, request {row.request_id}): {row.state}{error}")
    return lines


def _explain_not_submitted(manifest: Manifest, ledger: Ledger, scheduler: Scheduler, plan: Plan) -> None:
    """Jobs left `pending` because submitting stopped get the reason on their row, so results.jsonl and
    `status` say why they were not sent, not only the closing lines."""
    budget = manifest.settings.budget_usd
    message = {
        "budget": f"not submitted: it would take spend over the ${budget or 0:.2f} budget",
        "deadline": "not submitted: max_wait was reached; the next run submits it",
        "cancel": "not submitted: 'batchrun cancel' stopped this run's submitting; the next run submits it",
        "auth": f"not submitted: the API stopped the run: {scheduler.auth_error}",
        "unanswered": "not submitted: the submits before it got no usable answer; the next run submits it",
    }.get(scheduler.stop_reason or "")
    if message is None or scheduler.interrupted:
        return
    waiting = [job.id for job in plan.submit if ledger.state_of(job.id) == "pending"]
    try:
        ledger.explain_pending(waiting, scheduler.stop_reason, message)
    except LedgerError as exc:
        log.warning("could not record why %d jobs were not submitted: %s", len(waiting), exc)


def _exit_code(manifest: Manifest, ledger: Ledger, scheduler: Scheduler, plan: Plan, unrepaired: list[str]) -> int:
    if scheduler.interrupted:
        return EXIT_INTERRUPTED
    if scheduler.stop_reason in ("auth", "no_balance"):
        return EXIT_AUTH
    all_done = all(ledger.state_of(job.id) == "done" for job in manifest.jobs)
    # A refused job is not done as the manifest asks; a paid render still to collect is not done either.
    if not all_done or plan.refused or _previous_not_done(ledger, plan) or unrepaired or plan.provenance_failed:
        return EXIT_NOT_DONE
    return EXIT_OK


def _install_signals(scheduler: Scheduler, stream: TextIO) -> Callable[[], None]:
    """First Ctrl-C: stop submitting and finish what is in flight. Second, or SIGTERM: leave now."""
    loop = asyncio.get_running_loop()
    presses = {"n": 0}

    def on_interrupt() -> None:
        presses["n"] += 1
        if presses["n"] == 1:
            write_line("batchrun: stopping: no new jobs; finishing those in flight (Ctrl-C again to leave now)",
                       stream)
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
    check_balance: bool = True,
    balance_url: str | None = None,
    events: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
    ledger_index: LedgerIndex | None = None,
) -> RunOutcome:
    """Run every job of `manifest` that needs it. `sandbox=True` starts the built-in emulator, whose
    money is recorded (and always shown) as simulated. `clock`, `sleep` and `rand` drive every wait,
    so tests run at full speed.

    `ledger_index` (default: the user's, see batchrun.ledger_index) is where the run looks for this
    manifest's ledgers elsewhere (and refuses with UsageError to start a second one unasked) and
    records its own.

    `check_balance` asks the account's balance before submitting (at `balance_url`; by default RunComfy's
    account API for RunComfy's base URL, else `<base URL>/prod/v2/balance`) and caps this run's new spend
    by it (see balance.py). `events`, when given, receives
    every per-job event (submitted, done, failed...) as a line, and warnings go there instead of `stream`.
    """
    output_dir = manifest.output_dir
    index = LedgerIndex.for_user() if ledger_index is None else ledger_index
    check_new_ledger(manifest, index, new_output=options.new_output)
    _prepare_output_dir(output_dir)
    with OutputDirLock(output_dir):
        stoprequest.clear(output_dir)  # a request left for an earlier run that ended before seeing it
        console_handler = _ConsoleHandler(stream) if events is None else _events_handler(events)
        console_handler.addFilter(_OneSafeLine((token,) if token else ()))
        log.addHandler(console_handler)
        log.setLevel(logging.INFO)
        try:
            # run.log first: a planted link there stops the run before the ledger is touched.
            handler = _open_run_log(output_dir, stream)
        except BaseException:
            log.removeHandler(console_handler)
            raise
        try:
            ledger = Ledger.open(output_dir)
        except BaseException:
            log.removeHandler(console_handler)
            handler.close()
            raise
        handler.addFilter(_OneSafeLine((token,) if token else ()))
        log.addHandler(handler)
        flusher = asyncio.create_task(_flush_periodically(handler))
        try:
            index.record(manifest.path, output_dir)
            for name in remove_stale_temps(output_dir):
                log.info("removed %s, left by a run that was stopped while rewriting a file", name)
            return await _run_locked(manifest, ledger, base_url=base_url, token=token, options=options,
                                     sandbox=sandbox, stream=stream, progress=progress,
                                     handle_signals=handle_signals, clock=clock, sleep=sleep, rand=rand,
                                     check_balance=check_balance, balance_url=balance_url)
        finally:
            flusher.cancel()
            log.removeHandler(handler)
            log.removeHandler(console_handler)
            handler.close()
            ledger.close()


def _refuse_mixing(ledger: Ledger, output_dir: Path, sandbox: bool) -> None:
    """Sandbox results and paid ones never share a ledger: a real run would skip the sandbox's `done`
    jobs without ever paying for them, and a sandbox run would put fake videos beside paid ones."""
    sent = ledger.sent_to_sandbox()
    if not sandbox and True in sent:
        raise UsageError(f"{output_dir} holds results of --sandbox runs (simulated, not real videos); a real run "
                         "there would take those jobs as done without paying for them. Run for real into another "
                         "dir (--output DIR), or delete this one first; nothing was sent")
    if sandbox and False in sent:
        raise UsageError(f"{output_dir} holds jobs sent to the real API; a --sandbox run there would mix simulated "
                         "results with paid ones. Use --output DIR for sandbox runs; nothing was sent")


async def _run_locked(manifest: Manifest, ledger: Ledger, *, base_url, token, options, sandbox, stream, progress,
                      handle_signals, clock, sleep, rand, check_balance=False, balance_url=None) -> RunOutcome:
    _refuse_mixing(ledger, manifest.output_dir, sandbox)
    run_id = ledger.start_run()
    log.info("run %d of %s (%d jobs) into %s%s", run_id, manifest.path, len(manifest.jobs), manifest.output_dir,
             "; the manifest is unchanged since it was validated (read from the cache)" if manifest.from_cache else "")
    plan = make_plan(manifest, ledger, options)
    startimages.copy_local(manifest.output_dir, manifest.jobs)  # for report.html and the review app
    if options.preflight and sandbox:
        print("preflight: skipped with --sandbox (the sandbox does not fetch images)", file=stream)
    elif options.preflight and plan.submit:
        await _preflight(manifest, ledger, plan, options, stream)
    for line in plan_lines(plan):
        log.info("%s", line)
        print(line, file=stream)
    _rewrite_provenance(manifest.output_dir, ledger, plan)
    async with AsyncExitStack() as stack:
        if sandbox:
            from batchrun.sandbox import Sandbox

            emulator = await stack.enter_async_context(Sandbox(render_seconds=lambda rng: rng.uniform(1.0, 3.0),
                                                               models_dir=manifest.models_dir))
            base_url, token = emulator.base_url, SANDBOX_TOKEN
            log.info("using the built-in sandbox at %s", base_url)
            # This sandbox was born with this process: a request it does not know was made by an earlier
            # one and never will be known, so waiting out the grace window would only stall the run.
            manifest.settings = manifest.settings.with_overrides(not_found_grace=0)
        api_session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        client = Client(api_session, base_url, token,
                        limiter=make_limiter(manifest.settings.requests_per_second))
        # Downloads use their own session: the storage host must never see API credentials. Unless the API
        # itself is on loopback or a private network, outputs there are refused (no fetching local services).
        hosts = options.output_hosts
        if hosts is None and not await outputhosts.is_private_base(base_url or ""):
            hosts = outputhosts.HostPolicy()
        download_session = await stack.enter_async_context(
            hosts.session() if hosts is not None else aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        scheduler = Scheduler(manifest, ledger, client, download_session, options=options, clock=clock,
                              sleep=sleep, rand=rand, output_hosts=hosts, simulated=sandbox)
        spent_before = scheduler.committed_usd
        if check_balance and plan.submit:
            url = balance_url or default_balance_url(base_url, {})
            await _check_balance(manifest, plan, scheduler, api_session, url, token, stream)
        counts = ledger.counts
        show_bar = stream.isatty() if progress is None else progress and stream.isatty()
        display = Progress(len(manifest.jobs), counts, lambda: scheduler.committed_usd, stream=stream,
                           bar=show_bar, simulated=sandbox,
                           budget_usd=manifest.settings.budget_usd) if progress is not False else None
        refresher = asyncio.create_task(display.run_periodically()) if display else None
        remove_signals = _install_signals(scheduler, stream) if handle_signals else (lambda: None)
        watcher = asyncio.create_task(stoprequest.watch(
            manifest.output_dir, lambda: scheduler.stop_submitting("cancel"), scheduler.posts_in_flight))
        try:
            await scheduler.run(plan)
        finally:
            watcher.cancel()
            remove_signals()
            if refresher:
                refresher.cancel()
            if display:
                display.close()
    _explain_not_submitted(manifest, ledger, scheduler, plan)
    ledger.on_write_error = None  # from here on a failed write is logged, and the run's outcome stands
    with ledger.group_commits():  # the facts of all new videos in one commit, not one per video
        _read_media_facts(manifest.output_dir, ledger)
    # The ledger unchanged since results.jsonl last held it: nothing to read or write (a no-op re-run).
    if not results_current(ledger, manifest.output_dir):
        try:
            write_results(ledger, manifest.output_dir)
        except OSError as exc:  # the ledger holds it all; the next run writes results.jsonl again
            log.warning("could not rewrite results.jsonl: %s", exc)
    unrepaired = _unrepaired(ledger, plan)  # reads the files once, for the exit code and the closing lines
    exit_code = _exit_code(manifest, ledger, scheduler, plan, unrepaired)
    # The ledger's spend, as status, results.jsonl and report.html count it: the scheduler's running
    # figure also holds estimates of submits that a signal cut short before anything was sent.
    spend = ledger.spend()
    lines = _closing_lines(manifest, ledger, scheduler, plan, spend, unrepaired)
    for line in lines:
        log.info("%s", line)
    counts_now = dict(Counter(ledger.state_of(job.id) for job in manifest.jobs))
    try:
        ledger.finish_run(run_id, exit_code, {"counts": counts_now, "spent_usd": spend.total_usd,
                                              "simulated": sandbox,
                                              "stop_reason": scheduler.stop_reason,
                                              "calls": dict(scheduler.calls),
                                              "ledger_commits": ledger.commits})
    except LedgerError as exc:
        log.warning("could not record the end of this run: %s", exc)
    # After the run's end is recorded, so the report shows this run finished, with its exit code.
    _refresh_report(manifest.output_dir, sum(ledger.counts().values()), manifest)
    return RunOutcome(exit_code, counts_now, spend.total_usd, lines,
                      run_spent_usd=spend.total_usd - spent_before)
