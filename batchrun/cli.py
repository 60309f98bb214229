"""The command line: parse arguments, call the library, print, and map errors to exit codes.

`main(argv) -> int` is what the console script and the tests call; nothing here holds logic that a
library user would need.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from batchrun import __version__
from batchrun.errors import BatchrunError, LedgerError, ManifestError, OutputDirLocked, Problem, UsageError
from batchrun.manifest import Manifest, load_manifest
from batchrun.settings import DEFAULT_BASE_URL
from batchrun.settings import base_url as resolve_base_url

EXIT_OK, EXIT_NOT_DONE, EXIT_USAGE, EXIT_AUTH, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 75, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `cat` whose reader left
MAX_PROBLEMS_SHOWN = 50


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 by itself; keep that, but through UsageError
        raise UsageError(f"{message} (see 'batchrun {self.prog.split()[-1]} --help')"
                         if " " in self.prog else message)


def _print_problems(problems: list[Problem], out: TextIO, shown_so_far: int = 0) -> int:
    """Print up to the cap of problems; returns how many were printed."""
    room = max(0, MAX_PROBLEMS_SHOWN - shown_so_far)
    for problem in problems[:room]:
        print(problem, file=out)
    return min(room, len(problems))


def _summary(problems: list[Problem]) -> str:
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    parts = [plural(errors, "error")] + ([plural(warnings, "warning")] if warnings else [])
    return ", ".join(parts)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def cmd_validate(args, out: TextIO, err: TextIO) -> int:
    status, shown = EXIT_OK, 0
    for path in args.manifests:
        try:
            manifest = load_manifest(path, cached=False)  # validate checks everything (and refreshes the cache)
        except ManifestError as exc:
            status, problems, verdict = EXIT_USAGE, exc.problems, "invalid: " + _summary(exc.problems)
        else:
            problems = manifest.warnings
            if args.check_urls:
                problems = sorted(problems + _url_problems(manifest), key=lambda p: (p.file, p.line, p.column))
            if any(p.severity == "error" for p in problems):
                status, verdict = EXIT_USAGE, "invalid: " + _summary(problems)
            else:
                note = f", {_summary(problems).split(', ')[-1]}" if problems else ""
                verdict = f"ok, {plural(len(manifest.jobs), 'job')}{note}"
        printed = _print_problems(problems, out, shown)
        shown += printed
        hidden = len(problems) - printed
        if not hidden:
            more = ""
        elif printed:
            more = f" (first {printed} shown)"
        else:
            more = f" (not shown: only the first {MAX_PROBLEMS_SHOWN} problems of a call are printed)"
        print(f"{path}: {verdict}{more}", file=out)
    return status


def _url_problems(manifest: Manifest) -> list[Problem]:
    from batchrun.preflight import check_manifest, problems_for

    return problems_for(manifest, _run_async(check_manifest(manifest)))


def _load_for_run(args, err: TextIO, *, budget_kept: bool = True) -> Manifest:
    """The manifest with the flags' overrides; with `budget_kept`, UsageError when a budget is set and a
    job's price is unknown (a run could not keep it), else that is only said on `err`."""
    manifest = load_manifest(args.manifest, output=args.output)
    for warning in manifest.warnings[:MAX_PROBLEMS_SHOWN] if not getattr(args, "quiet", False) else ():
        print(warning, file=err)
    overrides = {"concurrency": args.concurrency, "budget_usd": args.budget, "max_wait": args.max_wait}
    manifest.settings = manifest.settings.with_overrides(**overrides)
    problem = manifest.budget_problem()
    if problem and budget_kept:
        raise UsageError(f"{manifest.path}: {problem}")
    if problem:
        print(f"{manifest.path}: warning: {problem}; `run` refuses to start until then", file=err)
    return manifest


def _connection(args) -> tuple[str | None, str | None]:
    """Base URL and token: flag, then environment, then default. The token never leaves this pair."""
    if args.sandbox:
        return None, None
    base_url = resolve_base_url(args.base_url, os.environ)
    token = os.environ.get("RUNCOMFY_API_TOKEN", "").strip()
    if not token:
        raise UsageError("set RUNCOMFY_API_TOKEN to your RunComfy API token (or use --sandbox to try for free)")
    return base_url, token


def _plan_balance(args):
    """How `plan` learns the balance: a callable giving a `Balance` (asked only when called)."""
    from batchrun.balance import Balance, balance_url, fetch_balance

    if args.no_balance_check:
        return lambda: Balance(None, "skipped (--no-balance-check)")
    if getattr(args, "sandbox", False):
        return lambda: Balance(None, "skipped with --sandbox (a run starts its own sandbox account)")
    token = os.environ.get("RUNCOMFY_API_TOKEN", "").strip()
    if not token:
        return lambda: Balance(None, "no RUNCOMFY_API_TOKEN set")
    base_url = resolve_base_url(getattr(args, "base_url", None), os.environ)  # UsageError (exit 2) if unusable
    url = balance_url(base_url, os.environ, DEFAULT_BASE_URL)
    return lambda: _run_async(fetch_balance(url, token))


def cmd_plan(args, out: TextIO, err: TextIO) -> int:
    from batchrun.ledger_index import LedgerIndex, locate
    from batchrun.plan import show_plan

    manifest = _load_for_run(args, err, budget_kept=False)
    if not args.new_output:
        # What a run would do is what the manifest's existing ledger says, wherever it is; say where.
        found = locate(manifest, LedgerIndex.for_user())
        if found.note:
            print(f"batchrun: {found.note}; 'run' from here refuses to start a new ledger: add --output "
                  f"{found.output_dir} to resume it, or --new-output", file=err)
            manifest.output_dir = found.output_dir
    return show_plan(manifest, out, as_json=getattr(args, "json", False), balance=_plan_balance(args),
                     jobs=getattr(args, "jobs", False))


def _exit_code_of(exc: BaseException) -> int:
    """The exit code `main` gives for an exception escaping a command (for the notification)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, OutputDirLocked):
        return EXIT_LOCKED
    if isinstance(exc, (UsageError, LedgerError, ManifestError)):
        return EXIT_USAGE
    return EXIT_NOT_DONE


def _notify(urls: list[str], body: dict, err: TextIO, *, quiet: bool) -> None:
    """POST the summary; says how each delivery went (only failures with --quiet). Never raises."""
    from batchrun import notify

    if not urls:
        return
    try:
        deliveries = _run_async(notify.send(urls, body))
    except Exception as exc:  # noqa: BLE001 - a notification never changes how the run ended
        print(f"notify: not delivered: {type(exc).__name__}", file=err)
        return
    for delivery, line in zip(deliveries, notify.report_lines(deliveries), strict=True):
        if not (quiet and delivery.ok):
            print(line, file=err)


def cmd_run(args, out: TextIO, err: TextIO) -> int:
    if args.sandbox and args.base_url:  # one would silently win over the other
        raise UsageError("--sandbox and --base-url cannot be used together: --sandbox runs against the built-in "
                         "emulator; to run against another server (such as 'batchrun sandbox'), give only "
                         "--base-url. Nothing was sent")
    if args.dry_run:
        return cmd_plan(args, out, err)
    from batchrun import console, notify

    for url in args.notify or []:
        problem = notify.url_problem(url)
        if problem:
            raise UsageError(f"--notify {url!r}: {problem}")
    token = os.environ.get("RUNCOMFY_API_TOKEN")
    try:
        manifest = _load_for_run(args, err)
    except (ManifestError, UsageError) as exc:  # nothing was read that could be run; --notify is still told
        why = f"invalid manifest: {_summary(exc.problems)}" if isinstance(exc, ManifestError) else str(exc)
        _notify(list(args.notify or []), notify.summary(manifest=args.manifest, output_dir=None, exit_code=EXIT_USAGE,
                                                        error=why, token=token), err, quiet=args.quiet)
        raise
    urls = list(dict.fromkeys(manifest.notify + list(args.notify or [])))
    out, err = console.for_unattended(out, args.manifest), console.for_unattended(err, args.manifest)
    try:
        outcome = _run(args, manifest, out, err)
    except OutputDirLocked:
        raise  # the run holding the directory tells how it ends
    except BaseException as exc:
        _notify(urls, notify.summary(manifest=args.manifest, output_dir=manifest.output_dir,
                                     exit_code=_exit_code_of(exc), job_ids=[job.id for job in manifest.jobs],
                                     error=str(exc) or type(exc).__name__, token=token), err, quiet=args.quiet)
        err.flush()
        raise
    if urls:  # the summary reads the whole ledger: only when someone is to be told
        _notify(urls, notify.summary(manifest=args.manifest, output_dir=manifest.output_dir,
                                     exit_code=outcome.exit_code, job_ids=[job.id for job in manifest.jobs],
                                     run_spent_usd=outcome.run_spent_usd, lines=outcome.lines, token=token),
                err, quiet=args.quiet)
    out.flush()
    err.flush()
    return outcome.exit_code


def _run(args, manifest: Manifest, out: TextIO, err: TextIO):
    from batchrun import console
    from batchrun.balance import balance_url
    from batchrun.plan import RunOptions
    from batchrun.run import run_manifest

    base_url, token = _connection(args)
    check_balance = not args.no_balance_check
    url = balance_url(base_url, os.environ, DEFAULT_BASE_URL) if check_balance and not args.sandbox else None
    options = RunOptions(retry_failed=args.retry_failed, resubmit_unknown=args.resubmit_unknown,
                         preflight=not args.no_preflight, new_output=args.new_output, verify=args.verify)
    outcome = _run_async(run_manifest(manifest, base_url=base_url, token=token, options=options,
                                       sandbox=args.sandbox, stream=console.Discard() if args.quiet else err,
                                       progress=False if args.no_progress or args.quiet else None,
                                       check_balance=check_balance, balance_url=url,
                                       events=out if args.verbose else None))
    for line in outcome.lines:
        print(line, file=out)
    return outcome


def cmd_adopt(args, out: TextIO, err: TextIO) -> int:
    from batchrun.adopt import adopt, finish, read_pairs
    from batchrun.api import Client

    if args.csv and (args.job or args.request_id):
        raise UsageError("give either JOB REQUEST_ID or --csv FILE, not both")
    if args.csv:
        pairs = read_pairs(Path(args.csv))
    elif args.job and args.request_id:
        pairs = [(args.job, args.request_id)]
    else:
        raise UsageError("give JOB REQUEST_ID, or --csv FILE of job,request_id rows (see 'batchrun adopt --help')")
    output_dir, _ = _resolve_target(args.target, args.output)
    base_url, token = _connection(args)

    async def check_and_attach():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await adopt(output_dir, pairs, Client(session, base_url, token))

    outcomes = _run_async(check_and_attach())
    if any(o.adopted for o in outcomes):
        finish(output_dir)
    for outcome in outcomes:
        print(outcome.message, file=out if outcome.adopted else err)
    adopted = sum(o.adopted for o in outcomes)
    print(f"{plural(adopted, 'job')} adopted, {len(outcomes) - adopted} refused", file=out)
    return EXIT_OK if adopted == len(outcomes) else EXIT_USAGE


def _run_async(coroutine):
    """asyncio.run: imported here, since the commands that read only the ledger never need it (40 ms)."""
    import asyncio

    return asyncio.run(coroutine)


def cmd_sandbox(args, out: TextIO, err: TextIO) -> int:
    from batchrun.models import user_dir
    from batchrun.sandbox import serve_forever

    try:
        serve_forever(host=args.host, port=args.port, render_seconds=args.render_seconds, balance_usd=args.balance,
                      models_dir=user_dir())  # $BATCHRUN_MODELS: the sandbox serves the user's models too
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise UsageError(f"sandbox: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
                         "(choose another --port)") from None
    return EXIT_OK


def _resolve_target(target: str, output: str | None = None, err: TextIO | None = None, *,
                    read_only: bool = False) -> tuple[Path, Manifest | None]:
    """MANIFEST_OR_OUTPUT_DIR: a directory is an output dir; a file is a manifest naming one, or, when it
    names none and its default dir here holds no ledger, the one where it ran (said on `err`).

    `read_only` commands (status, export, report) of a manifest that is invalid now still read its ledger
    (`--output`, else the default dir here, else where it last ran), with the problems as a warning, and
    return no manifest; without any ledger the ManifestError stands (exit 2)."""
    from batchrun.ledger_index import LedgerIndex, locate

    path = Path(target)
    if path.is_dir():
        return path.absolute(), None
    if not path.exists():
        raise UsageError(f"{target}: no such manifest or output directory")
    try:
        manifest = load_manifest(path, output=output)
    except ManifestError as exc:
        if not read_only:
            raise
        found = _ledger_of_invalid(path, output)
        if found is None:
            raise
        if err is not None:
            _print_problems(exc.problems, err)
            print(f"batchrun: warning: {target} is invalid now ({_summary(exc.problems)}); reading its ledger in "
                  f"{found} without it (jobs no longer in the manifest are not marked)", file=err)
        return found, None
    found = locate(manifest, LedgerIndex.for_user())
    if found.note and err is not None:
        print(f"batchrun: {found.note}", file=err)
    manifest.output_dir = found.output_dir
    return manifest.output_dir, manifest


def _ledger_of_invalid(manifest_path: Path, output: str | None) -> Path | None:
    """The output dir holding the ledger of a manifest that cannot be read now: `--output`, else
    `output/<stem>` here (the default dir), else the most recent one the ledger index knows."""
    from batchrun.ledger import LEDGER_NAME
    from batchrun.ledger_index import LedgerIndex

    candidates = [Path(output)] if output else [Path("output") / manifest_path.stem]
    if not output:
        candidates += LedgerIndex.for_user().ledgers_of(manifest_path.absolute())
    return next((c.absolute() for c in candidates if (c / LEDGER_NAME).is_file()), None)


def cmd_status(args, out: TextIO, err: TextIO) -> int:
    from batchrun.status import collect, print_report

    output_dir, manifest = _resolve_target(args.target, args.output, err, read_only=True)
    print_report(collect(output_dir, manifest, verify=args.verify), out, as_json=args.json)
    return EXIT_OK


def cmd_export(args, out: TextIO, err: TextIO) -> int:
    from batchrun.ledger import Ledger
    from batchrun.results import csv_lines, decision_filter, jsonl_lines

    output_dir, _ = _resolve_target(args.target, args.output, err, read_only=True)
    ledger = Ledger.open(output_dir, create=False, readonly=True)
    try:
        # Streamed row by row: a 100,000-job ledger is never held whole in memory.
        rows = decision_filter(ledger.rows(), args.decision)
        if args.format == "csv":
            for text in csv_lines(rows):
                out.write(text)
        else:
            for line in jsonl_lines(rows):
                out.write(line.decode("utf-8"))
    finally:
        ledger.close()
    out.flush()
    return EXIT_OK


def cmd_cancel(args, out: TextIO, err: TextIO) -> int:
    from batchrun.cancel import cancel_queued

    output_dir, manifest = _resolve_target(args.target, args.output, err)
    base_url, token = _connection(args)
    rps = manifest.settings.requests_per_second if manifest else 5.0
    report = _run_async(cancel_queued(output_dir, base_url=base_url, token=token, requests_per_second=rps,
                                       stop_wait=args.wait))
    run = report.run
    if run.live and run.stopped:
        print(f"a run (pid {run.pid or 'unknown'}) was going in {output_dir}: it has stopped submitting and goes "
              "on collecting the jobs already accepted", file=out)
    elif run.live:
        print(f"a run (pid {run.pid or 'unknown'}) is still submitting in {output_dir}: it was asked to stop and "
              "has not answered yet; jobs it submits from now on are not cancelled: run 'batchrun cancel' again "
              "once it has stopped", file=out)
    for job_id in report.cancelled:
        print(f"cancelled: {job_id}", file=out)
    for job_id, detail in report.not_cancellable:
        print(f"not cancellable (already in progress): {job_id}: {detail}", file=out)
    for job_id, detail in report.errors:
        print(f"error: {job_id}: {detail}", file=out)
    print(f"{plural(len(report.cancelled), 'job')} cancelled, {len(report.not_cancellable)} could not be, "
          f"{plural(len(report.errors), 'error')}", file=out)
    all_stopped = run.stopped and not report.not_cancellable and not report.errors
    return EXIT_OK if all_stopped else EXIT_NOT_DONE


def cmd_report(args, out: TextIO, err: TextIO) -> int:
    from batchrun.ledger import Ledger
    from batchrun.report import write_report
    from batchrun.startimages import copy_local
    from batchrun.takes import with_rerolls

    output_dir, manifest = _resolve_target(args.target, args.output, err, read_only=True)
    listed = None
    if manifest is not None and (output_dir / "ledger.sqlite").is_file():
        ledger = Ledger.open(output_dir, create=False, readonly=True)
        try:
            with_rerolls(manifest, ledger.rerolls())
        finally:
            ledger.close()
        listed = {job.id for job in manifest.jobs}
        copy_local(output_dir, manifest.jobs)
    print(f"report: {write_report(output_dir, listed)}", file=out)
    return EXIT_OK


def cmd_reroll(args, out: TextIO, err: TextIO) -> int:
    from batchrun import takes
    from batchrun.ledger import Ledger

    if not 1 <= args.takes <= takes.MAX_TAKES:
        raise UsageError(f"--takes must be from 1 to {takes.MAX_TAKES}, not {args.takes}")
    output_dir, manifest = _resolve_target(args.manifest, args.output, err)
    if manifest is None:
        raise UsageError(f"{args.manifest}: reroll needs the manifest (it holds the jobs' inputs), not the output dir")
    ledger = Ledger.open(output_dir, create=False)
    try:
        made = takes.request_more(manifest, ledger, args.jobs, args.takes)
    except KeyError as exc:
        raise UsageError(f"{args.manifest}: no job {exc.args[0]!r} in this manifest; nothing was asked for") from None
    except ValueError as exc:
        raise UsageError(f"{args.manifest}: {exc}; nothing was asked for") from None
    finally:
        ledger.close()
    print(f"asked for {plural(len(made), 'more take')}: {', '.join(made)}; recorded in {output_dir / 'ledger.sqlite'}"
          f"; the next 'batchrun run {args.manifest}' submits {'it' if len(made) == 1 else 'them'}", file=out)
    return EXIT_OK


def cmd_copy(args, out: TextIO, err: TextIO) -> int:
    from batchrun.picks import copy_picked

    output_dir, _ = _resolve_target(args.target, args.output, err)
    copied = copy_picked(output_dir, Path(args.dest))
    for problem in copied.problems:
        print(f"batchrun: {problem}", file=err)
    print(f"copied {plural(len(copied.files), 'file')} of {plural(copied.jobs, 'picked job')} to {args.dest} "
          f"(with picks.csv)", file=out)
    return EXIT_OK if not copied.problems else EXIT_NOT_DONE


def cmd_review(args, out: TextIO, err: TextIO) -> int:
    from batchrun.review_app import serve

    output_dir, manifest = _resolve_target(args.target, args.output, err)
    try:
        return serve(output_dir, manifest, port=args.port, out=out, open_browser=args.open)
    except OSError as exc:  # the port is taken
        raise UsageError(f"review: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc} "
                         "(choose another --port, or leave it out for a free one)") from None


MANIFEST_HELP = "a batch manifest, a YAML file (see the README's 'The manifest')"
TARGET_HELP = "a manifest (its ledger is found from any folder) or an output directory holding ledger.sqlite"
EXITS_READ = "exit: 0 done; 2 usage error or no ledger."
EXITS_RUN = ("exit: 0 every job done; 1 jobs not done (failed, cancelled, unknown, budget or max-wait reached, "
             "refused); 2 usage error or invalid manifest, nothing sent; 3 auth or balance error; "
             "75 another run holds the output dir; 130 interrupted (run again to collect).")
OFF = " (default: off)"
# Commands that never send anything: "nothing was sent" would only puzzle their users.
READ_ONLY_COMMANDS = ("status", "export", "report", "review", "copy")


def _command(commands, name: str, summary: str, exits: str) -> argparse.ArgumentParser:
    """A subcommand whose `--help` starts with its one-line `summary` and ends with its exit codes."""
    return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                               epilog=exits)


def _add_target(command: argparse.ArgumentParser) -> None:
    command.add_argument("target", metavar="MANIFEST_OR_OUTPUT_DIR", help=TARGET_HELP)
    command.add_argument("--output", metavar="DIR", help="with a manifest: its output directory, if not the usual "
                         "(default: where its ledger is)")


def _add_run_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("manifest", metavar="MANIFEST", help=MANIFEST_HELP)
    command.add_argument("--output", metavar="DIR", help="output directory (default: the manifest's output:, "
                         "else output/<manifest name> in the current directory)")
    command.add_argument("--concurrency", type=int, metavar="N", help="jobs in flight remotely at once "
                         "(default: the manifest's concurrency:, else 4)")
    command.add_argument("--budget", type=float, metavar="USD", help="hard cap on spend for this output dir, in US "
                         "dollars (default: the manifest's budget_usd:, else none)")
    command.add_argument("--max-wait", type=float, metavar="SECONDS",
                         help="stop submitting after this many seconds and leave jobs in flight for the next run "
                         "(default: the manifest's max_wait:, else none)")
    command.add_argument("--new-output", action="store_true",
                         help="start a new ledger in the default output dir even though this manifest has one "
                         "elsewhere (it will pay for its jobs again)" + OFF)
    command.add_argument("--no-balance-check", action="store_true",
                         help="do not ask the account's balance before paying ($RUNCOMFY_BALANCE_URL)" + OFF)


def _add_decision_filter(command: argparse.ArgumentParser, required: bool = False) -> None:
    which = command.add_mutually_exclusive_group(required=required)
    which.add_argument("--picked", dest="decision", action="store_const", const="picked",
                       help="picked jobs only (default: every job)")
    which.add_argument("--rejected", dest="decision", action="store_const", const="rejected",
                       help="rejected jobs only")
    which.add_argument("--unrated", dest="decision", action="store_const", const="unrated",
                       help="done jobs not picked or rejected yet")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchrun", description="Run batches of image-to-video jobs on RunComfy's Model API.",
                     epilog="'batchrun COMMAND --help' describes a command, its flags and its exit codes.")
    parser.add_argument("--version", action="version", version=f"batchrun {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    validate = _command(commands, "validate", "check manifests offline, printing every problem with its place",
                        "exit: 0 valid (warnings allowed); 2 invalid or usage error.")
    validate.add_argument("manifests", nargs="+", metavar="MANIFEST", help=MANIFEST_HELP + "; one or more")
    validate.add_argument("--check-urls", action="store_true",
                          help="also fetch each image URL's header: reachable, an image, Kling's size limits" + OFF)
    validate.set_defaults(handler=cmd_validate)

    run = _command(commands, "run", "submit, poll, download and record every job of a manifest", EXITS_RUN)
    _add_run_flags(run)
    run.add_argument("--sandbox", action="store_true",
                     help="run against the built-in emulator: free, no token, simulated money" + OFF)
    run.add_argument("--base-url", metavar="URL", help=f"API base URL (default: $RUNCOMFY_BASE_URL or "
                     f"{DEFAULT_BASE_URL}); not with --sandbox")
    run.add_argument("--retry-failed", action="store_true", help="submit failed and cancelled jobs again" + OFF)
    run.add_argument("--resubmit-unknown", action="store_true",
                     help="submit again jobs whose first POST may have reached the server (may pay twice)" + OFF)
    run.add_argument("--verify", action="store_true",
                     help="hash every done file in full; without it a file whose size, mtime and inode are as "
                     "recorded at download is taken as intact unread" + OFF)
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar; a log line every 5 seconds instead (default: a bar on a terminal)")
    run.add_argument("--no-preflight", action="store_true",
                     help="do not check image URLs before submitting" + OFF)
    run.add_argument("--dry-run", action="store_true", help="show what would be done (same as 'plan')" + OFF)
    run.add_argument("--notify", action="append", metavar="URL",
                     help="POST a JSON summary here when the run ends (repeatable; adds to the manifest's notify:; "
                     "default: none)")
    said = run.add_mutually_exclusive_group()
    said.add_argument("--quiet", action="store_true", help="print only the closing summary" + OFF)
    said.add_argument("--verbose", action="store_true",
                      help="also print per-job events (submitted, done, failed)" + OFF)
    run.set_defaults(handler=cmd_run)

    plan = _command(commands, "plan", "what a run would do and cost, sending nothing but the free balance call",
                    "exit: 0 planned; 2 invalid manifest or usage error.")
    _add_run_flags(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output" + OFF)
    plan.add_argument("--jobs", action="store_true", help="also list every job: id, model, seconds, audio, "
                      "estimate, what the run will do, and how many fit the budget" + OFF)
    plan.add_argument("--base-url", metavar="URL", help="API base URL (default: $RUNCOMFY_BASE_URL); decides "
                      "where the balance is asked unless $RUNCOMFY_BALANCE_URL is set")
    plan.set_defaults(handler=cmd_plan)

    adopt = _command(commands, "adopt", "attach a request id found by hand to an unknown job (no new payment)",
                     "exit: 0 attached; 2 refused (the request is not this job's, or not known) or usage error.")
    _add_target(adopt)
    adopt.add_argument("job", nargs="?", metavar="JOB", help="the unknown job's id")
    adopt.add_argument("request_id", nargs="?", metavar="REQUEST_ID",
                       help="its request id, from RunComfy's Generations page")
    adopt.add_argument("--csv", metavar="FILE",
                       help="a CSV file of job,request_id rows instead of one pair (default: none)")
    adopt.add_argument("--base-url", metavar="URL", help="API base URL (default: $RUNCOMFY_BASE_URL)")
    adopt.set_defaults(handler=cmd_adopt, sandbox=False)

    status = _command(commands, "status", "counts by state, jobs needing attention, spend (read-only)", EXITS_READ)
    _add_target(status)
    status.add_argument("--json", action="store_true", help="machine-readable output" + OFF)
    status.add_argument("--verify", action="store_true",
                        help="hash every done file in full; without it a file whose size, mtime and inode are as "
                        "recorded at download is taken as intact unread" + OFF)
    status.set_defaults(handler=cmd_status)

    cancel = _command(commands, "cancel", "ask a run going in the output dir to stop submitting, then cancel "
                      "the jobs queued remotely",
                      "exit: 0 every queued job cancelled; 1 some could not be, or the run has not stopped "
                      "submitting yet; 2 usage error.")
    _add_target(cancel)
    cancel.add_argument("--base-url", metavar="URL", help="API base URL (default: $RUNCOMFY_BASE_URL)")
    cancel.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for a run going in the output dir to stop submitting, in seconds "
                        "(default 30)")
    cancel.set_defaults(handler=cmd_cancel, sandbox=False)

    export = _command(commands, "export", "the ledger as one line per job, to stdout", EXITS_READ)
    _add_target(export)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="jsonl: one JSON object a line; csv: a header row, then one row a job (default jsonl)")
    _add_decision_filter(export)
    export.set_defaults(handler=cmd_export)

    report = _command(commands, "report", "write report.html: a gallery to review the videos", EXITS_READ)
    _add_target(report)
    report.set_defaults(handler=cmd_report)

    review = _command(commands, "review", "serve the review app on 127.0.0.1: pick, reject, rate, re-roll takes",
                      "exit: runs until Ctrl-C, then 0; 2 no ledger, a taken port or usage error.")
    _add_target(review)
    review.add_argument("--port", type=_port, default=0, metavar="N",
                        help="TCP port on 127.0.0.1, 0-65535 (default 0: a free one)")
    review.add_argument("--open", action="store_true", help="also open the URL in the default browser" + OFF)
    review.set_defaults(handler=cmd_review)

    reroll = _command(commands, "reroll", "ask for more takes of jobs; the next run submits them",
                      "exit: 0 recorded; 2 unknown job, nothing has run yet, or usage error.")
    reroll.add_argument("manifest", metavar="MANIFEST", help=MANIFEST_HELP)
    reroll.add_argument("jobs", nargs="+", metavar="JOB", help="a job id (any take's id names its input)")
    reroll.add_argument("--takes", type=int, default=1, metavar="K", help="more takes of each job (default 1)")
    reroll.add_argument("--output", metavar="DIR", help="its output directory, if not the usual "
                        "(default: where its ledger is)")
    reroll.set_defaults(handler=cmd_reroll)

    copy = _command(commands, "copy", "copy the picked videos and a picks.csv sidecar to DEST",
                    "exit: 0 copied; 1 some file was not copied; 2 usage error.")
    _add_target(copy)
    copy.add_argument("dest", metavar="DEST", help="the folder to copy into (made if missing)")
    copy.add_argument("--picked", dest="decision", action="store_const", const="picked", required=True,
                      help="copy the picked jobs' files (required: the only selection so far)")
    copy.set_defaults(handler=cmd_copy)

    from batchrun.models.commands import add_commands as add_models_commands

    add_models_commands(commands)

    sandbox = _command(commands, "sandbox", "serve the built-in API emulator on loopback, free, until Ctrl-C",
                       "exit: runs until Ctrl-C, then 0; 2 a taken port or usage error.")
    sandbox.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                         help="IP address to listen on (default 127.0.0.1, this machine only)")
    sandbox.add_argument("--port", type=_port, default=8765, metavar="N", help="TCP port, 0-65535 (default 8765)")
    sandbox.add_argument("--render-seconds", type=float, default=2.0, metavar="S",
                         help="simulated render time of each job, in seconds (default 2)")
    sandbox.add_argument("--balance", type=float, default=100_000.0, metavar="USD",
                         help="the account's starting balance in US dollars (default 100000; small: watch a batch "
                         "run dry)")
    sandbox.set_defaults(handler=cmd_sandbox)
    return parser


def _port(text: str) -> int:
    """A TCP port number, 0-65535 (0: any free one), for argparse."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def _lean_log_records() -> None:
    """Log records without the caller's file and line, thread, process id or process name (the logging
    HOWTO's "Optimization" switches): batchrun's formats use none of them, and a run logs lines per job
    (each record would otherwise call getpid)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    if argv is None:  # the program itself (not a caller's process): its log lines name none of these
        _lean_log_records()
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = getattr(args, "command", None)
        if not getattr(args, "handler", None):
            build_parser().print_help(out)
            return EXIT_USAGE
        return args.handler(args, out, err)
    except ManifestError as exc:
        _print_problems(exc.problems, err)
        sent = "" if command in READ_ONLY_COMMANDS else "; nothing was sent"
        print(f"{exc.problems[0].file}: invalid manifest: {_summary(exc.problems)}{sent}", file=err)
        return EXIT_USAGE
    except OutputDirLocked as exc:
        print(f"batchrun: {exc}", file=err)
        return EXIT_LOCKED
    except (UsageError, LedgerError) as exc:  # nothing was sent
        print(f"batchrun: {exc}", file=err)
        return EXIT_USAGE
    except BatchrunError as exc:
        print(f"batchrun: {exc}", file=err)
        return EXIT_NOT_DONE
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print("batchrun: interrupted", file=err)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `batchrun status | head`: the reader left. End quietly, as `cat` does, and keep Python from
        # complaining when it flushes stdout at exit.
        if out is sys.stdout:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
