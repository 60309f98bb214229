"""`batchrun status`: counts by state, the jobs needing attention and the spend, read from the ledger.

Opens the ledger read-only, so it is safe while a run is writing (SQLite WAL readers never block it).
Jobs needing attention include those the manifest asks for with an input they were not made with
(refused): worked out from the manifest when one is given, else as the last run recorded them. Done
jobs' files are checked (outputs with `download.verify`, `<id>.json` against the ledger): what is
missing or damaged is listed, and the next run repairs it.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from batchrun import filecheck, gcpause, mediafacts, settled, takes
from batchrun.ledger import STATES, JobRow, Ledger, unusable
from batchrun.lock import LOCK_NAME, live_pid
from batchrun.manifest import Manifest
from batchrun.owners import FileOwners
from batchrun.plan import refusal
from batchrun.results import ProvenanceStat, provenance_check, provenance_path
from batchrun.sidereads import SideReads
from batchrun.spend import Spend, add_up_groups

ATTENTION = ("unknown", "failed", "cancelled", "submitting")
IN_FLIGHT_OR_DOWNLOADING = ("queued", "running", "downloading")
UNSETTLED = ("unknown", "submitting")  # may have created a job: shown with what helps find it by hand


@dataclass
class StatusReport:
    output_dir: Path
    counts: dict[str, int]
    spend: Spend
    attention: list[JobRow]  # jobs a person should look at, with their errors
    not_in_manifest: list[str]  # ledger jobs the manifest no longer lists
    not_started: list[str]  # manifest jobs the ledger has never seen
    running_pid: int | None
    refused: dict[str, str] = field(default_factory=dict)  # id -> why the manifest's job is not run as written
    damaged: list[tuple[str, str, str]] = field(default_factory=list)  # (id, file, "missing" | "damaged")
    states: dict[str, str] = field(default_factory=dict)  # id -> state, for the jobs listed above
    decisions: dict[str, int] = field(default_factory=dict)  # "picked" / "rejected" / "unrated" (done, undecided)
    media_flags: dict[str, list[str]] = field(default_factory=dict)  # id -> how its file differs from what was paid
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)  # model id -> state -> jobs
    verified: bool = False  # files were hashed whatever their recorded stat (`--verify`)


def _running_pid(output_dir: Path) -> int | None:
    """The PID written in run.lock, if that process is still alive (a hint for people, not a lock check)."""
    try:
        return live_pid((output_dir / LOCK_NAME).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def damaged_files(output_dir: Path, row: JobRow, *, full: bool = False,
                  provenance: ProvenanceStat | None = None) -> list[tuple[str, str]]:
    """(file name, "missing" | "damaged") for each output or provenance file of a done job that is not intact.

    A file whose size, mtime and inode are as recorded (`provenance`: the ledger's record of `<id>.json`)
    is not read unless `full` (`status --verify`): see batchrun.filecheck and `results.provenance_check`."""
    found = []
    for output in row.outputs:
        if not filecheck.check_file(output_dir, output, full=full)[0]:
            path = output_dir / output.path  # only for a file to report: pathlib costs more than the check
            found.append((output.path, "damaged" if path.exists() or path.is_symlink() else "missing"))
    if not provenance_check(output_dir, row, provenance, full=full)[0]:
        path = provenance_path(output_dir, row)
        found.append((path.name, "damaged" if path.exists() or path.is_symlink() else "missing"))
    return found


def collect(output_dir: Path, manifest: Manifest | None = None, *, verify: bool = False) -> StatusReport:
    """What `status` shows. Done files are checked by size, mtime and inode, or hashed in full with
    `verify` (see batchrun.filecheck); nothing is written (a stat found stale is recorded by the next run)."""
    ledger = Ledger.open(output_dir, create=False, readonly=True, check=False)
    side = None
    try:
        try:
            # The integrity check, the counts and the identity mismatches on a second connection meanwhile
            # (batchrun.sidereads); an older ledger (no change count) is read as before, checked first.
            side = SideReads(output_dir) if SideReads.usable(ledger) else None
            if side is None:
                ledger.integrity()
            with gcpause.paused():  # 100,000 rows of small objects, no cycles
                report = _collect(output_dir, ledger, manifest, verify, side)
        except sqlite3.DatabaseError as exc:
            if side is not None:
                side.result()  # a damaged file: said as its integrity check says it
            raise unusable(ledger.path, exc) from None
        if side is not None:
            side.result()  # nothing read is shown before the integrity check has passed
        return report
    finally:
        ledger.close()


def _collect(output_dir: Path, ledger: Ledger, manifest: Manifest | None, verify: bool,
             side: SideReads | None) -> StatusReport:
    jobs = None  # id -> the manifest's job, once the manifest's re-rolled takes are added
    counts: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    per_model: dict[str, Counter] = {}
    maybe_attention: list[JobRow] = []  # in ledger order; never-sent jobs among them may turn out refused
    unsent: list[str] = []  # manifest jobs the ledger holds as pending, never sent: checked for clashes below
    by_refusal: dict[str, str] = {}
    not_in_manifest: list[str] = []
    states: dict[str, str] = {}
    damaged: list[tuple[str, str, str]] = []
    if manifest is not None:
        takes.with_rerolls(manifest, ledger.rerolls())
        jobs = {job.id: job for job in manifest.jobs}
    with ledger.snapshot():  # one view of the ledger for every read below, while a run may be writing
        mismatches = None
        if side is not None:
            changes = ledger.change_count()  # the snapshot's first read: the side's answers are used if equal
            mismatches = partial(side.mismatches_at, ledger, changes)
        # Done jobs whose files are as recorded are counted below and need nothing more; only the others
        # are read in full (batchrun.settled).
        found = settled.sweep(ledger, output_dir, jobs, media=True, full=verify, mismatches=mismatches)
        tally = ledger.tally() if side is None else side.tally_at(ledger, changes)
        for model, state, decision, n, *_ in tally:
            counts[state] += n
            per_model.setdefault(model, Counter())[state] += n
            if decision or state == "done":
                decisions[decision or "unrated"] += n
        spent = add_up_groups((state, *money) for _, state, _, _, *money in tally)
        flagged = found.flagged  # (place in the ledger's order, id, flags): settled jobs' first, then the others'
        for row, known in ledger.rows_of(found.unsettled):
            candidate = False
            job = None
            if jobs is not None:
                job = jobs.get(row.id)
                if job is None:
                    not_in_manifest.append(row.id)
                    states[row.id] = row.state
                elif (why := refusal(job, row)) is not None:
                    by_refusal[row.id] = why
                elif row.state == "pending" and row.submissions == 0:
                    unsent.append(row.id)
                    candidate = True
            elif row.refusal:
                by_refusal[row.id] = row.refusal
            if row.state == "done":
                damaged += [(row.id, name, problem) for name, problem in
                            damaged_files(output_dir, row, full=verify, provenance=known)]
                # The manifest's input when it is the one the job was made with (same digest): the row's own
                # JSON is then not decoded; no facts: input not decoded.
                if row.media and (found_flags := mediafacts.flags(
                        row.media, job.input if job is not None and job.input_sha256 == row.input_sha256
                        else row.input)):
                    flagged.append((found.places[row.id], row.id, found_flags))
            if (candidate or row.state in ATTENTION or (row.error and row.state != "done")
                    or row.id in by_refusal):
                maybe_attention.append(row)
        # A job never sent whose file names another ledger job owns (as `plan.decide` refuses it).
        owners = FileOwners(()) if not unsent else FileOwners.of_ids(ledger.owner_ids())
    media_flags = {job_id: flags for _, job_id, flags in sorted(flagged)}
    if jobs is not None:
        refused = {job_id: by_refusal[job_id] for job_id in jobs if job_id in by_refusal}
        unsent_ids = set(unsent)
        for job_id in jobs:
            if job_id in unsent_ids and (clash := owners.clash(job_id)):
                refused[job_id] = f"{jobs[job_id].label}: {clash}"
    else:
        refused = by_refusal
    attention = [row for row in maybe_attention
                 if row.state in ATTENTION or (row.error and row.state != "done") or row.id in refused]
    if jobs is not None:
        listed = set(found.unsettled)
        not_started = [job_id for job_id in jobs if job_id not in found.settled and job_id not in listed]
    else:
        not_started = []
    return StatusReport(
        output_dir=output_dir,
        counts={state: counts[state] for state in STATES if counts[state]},
        spend=spent,
        attention=attention,
        not_in_manifest=not_in_manifest,
        not_started=not_started,
        running_pid=_running_pid(output_dir),
        refused=refused,
        damaged=damaged,
        states=states,
        decisions={key: decisions[key] for key in ("picked", "rejected", "unrated") if decisions[key]},
        media_flags=media_flags,
        by_model={model: {state: n[state] for state in STATES if n[state]} for model, n in per_model.items()},
        verified=verify,
    )


def decision_counts(rows: list[JobRow]) -> dict[str, int]:
    """The reviewer's decisions: picked and rejected jobs, and done jobs not decided yet ("unrated")."""
    counts = Counter(row.decision or "unrated" for row in rows if row.decision or row.state == "done")
    return {key: counts[key] for key in ("picked", "rejected", "unrated") if counts[key]}


def _error(report: StatusReport, row: JobRow) -> dict[str, str] | None:
    """The job's recorded error; for a refused job, its refusal (what a person has to act on)."""
    if row.id in report.refused:
        return {"kind": "refused", "message": report.refused[row.id]}
    return row.error
def prompt_start(row: JobRow, length: int = 60) -> str:
    """The start of the job's prompt (or of its first shot's), to match it by eye."""
    prompt = row.input.get("prompt")
    if not isinstance(prompt, str):
        shots = row.input.get("multi_prompt")
        prompt = shots[0].get("prompt") if isinstance(shots, list) and shots and isinstance(shots[0], dict) else ""
    prompt = " ".join(str(prompt or "").split())
    return prompt if len(prompt) <= length else prompt[: length - 1] + "…"


def as_dict(report: StatusReport) -> dict[str, Any]:
    return {
        "output": str(report.output_dir),
        "running_pid": report.running_pid,
        "counts": report.counts,
        "by_model": report.by_model,
        "total": sum(report.counts.values()),
        "spent_usd": round(report.spend.total_usd, 4),
        "simulated_usd": round(report.spend.simulated_usd, 4),
        "attention": [{"id": r.id, "state": r.state, "request_id": r.request_id,
                       "request_ids": list(r.request_ids),
                       "error": _error(report, r),
                       **({"submitted_at": r.submitted_at, "prompt": prompt_start(r, 200)}
                          if r.state in UNSETTLED else {})}
                      for r in report.attention],
        "refused": [{"id": job_id, "refusal": why} for job_id, why in report.refused.items()],
        "damaged": [{"id": job_id, "path": name, "problem": problem} for job_id, name, problem in report.damaged],
        "not_in_manifest": report.not_in_manifest,
        "not_started": report.not_started,
        "decisions": report.decisions,
        "media_flags": [{"id": job_id, "flags": found} for job_id, found in report.media_flags.items()],
    }


def print_report(report: StatusReport, out: TextIO, *, as_json: bool = False, limit: int = 50) -> None:
    if as_json:
        print(json.dumps(as_dict(report), indent=2), file=out)
        return
    total = sum(report.counts.values())
    running = f"; a run is in progress (pid {report.running_pid})" if report.running_pid else ""
    print(f"{report.output_dir}: {total} job{'s' * (total != 1)} in the ledger{running}", file=out)
    width = max((len(s) for s in report.counts), default=5)
    for state, n in report.counts.items():
        print(f"  {state:<{width}}  {n:>6}", file=out)
    if len(report.by_model) > 1:
        for model, states in report.by_model.items():
            print(f"  {model}: " + ", ".join(f"{n} {state}" for state, n in states.items()), file=out)
    print(f"spent: {report.spend.describe()} (actual where the API reported it, else estimated)", file=out)
    if report.decisions:
        print("review: " + ", ".join(f"{n} {key}" for key, n in report.decisions.items()), file=out)
    if report.attention:
        print(f"needing attention ({len(report.attention)}):", file=out)
        for row in report.attention[:limit]:
            if row.id in report.refused:
                print(f"  {row.id}  refused (the ledger's job is {row.state}): {report.refused[row.id]}", file=out)
                continue
            why = f": {row.error['message']}" if row.error else ""
            earlier = f" (earlier requests: {', '.join(row.earlier_request_ids)})" if row.earlier_request_ids else ""
            print(f"  {row.id}  {row.state}{why}{earlier}", file=out)
            if row.state in UNSETTLED:
                # What a person needs to find the request on RunComfy's Generations page, then adopt it.
                when = (row.submitted_at or "?")[:19].replace("T", " ")
                print(f"      submitted {when} UTC; prompt: {prompt_start(row)!r}", file=out)
        if len(report.attention) > limit:
            print(f"  ... and {len(report.attention) - limit} more (use --json for all)", file=out)
        if any(row.state in UNSETTLED for row in report.attention):
            print(f"found an unknown job's request on RunComfy's Generations page? attach it without paying again: "
                  f"batchrun adopt {report.output_dir} JOB REQUEST_ID", file=out)
    if report.damaged:
        # A file only a full hash found damaged keeps the stat a plain run trusts: only `run --verify` sees it.
        repairs = "the next 'batchrun run --verify' repairs them" if report.verified else "the next run repairs them"
        print(f"missing or damaged files ({len(report.damaged)}); {repairs}:", file=out)
        for job_id, name, problem in report.damaged[:limit]:
            print(f"  {name}  {problem} (job {job_id})", file=out)
        if len(report.damaged) > limit:
            print(f"  ... and {len(report.damaged) - limit} more (use --json for all)", file=out)
    if report.media_flags:
        print(f"videos that differ from what was paid for ({len(report.media_flags)}):", file=out)
        # islice, not list(...)[:limit]: 100,000 tuples at once can set off a full GC pass over the manifest.
        for job_id, found in islice(report.media_flags.items(), limit):
            print(f"  {job_id}  {'; '.join(found)}", file=out)
        if len(report.media_flags) > limit:
            print(f"  ... and {len(report.media_flags) - limit} more (use --json for all)", file=out)
    if report.not_in_manifest:
        shown = ", ".join(f"{job_id} ({report.states[job_id]})" for job_id in report.not_in_manifest[:20])
        more = " ..." if len(report.not_in_manifest) > 20 else ""
        print(f"in the ledger but no longer in the manifest ({len(report.not_in_manifest)}): {shown}{more}",
              file=out)
        pending = [job_id for job_id in report.not_in_manifest if report.states[job_id] in IN_FLIGHT_OR_DOWNLOADING]
        if pending:
            print(f"  paid renders of those still to collect ({len(pending)}): the next run collects them", file=out)
    if report.not_started:
        print(f"in the manifest but never run: {len(report.not_started)}", file=out)
