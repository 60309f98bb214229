"""What a run will do with each job, decided from the ledger before anything is sent, and
`batchrun plan`: that decision and its cost shown without sending or writing anything."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from batchrun import download
from batchrun.errors import LedgerError
from batchrun.ledger import LEDGER_NAME, JobRow, Ledger
from batchrun.manifest import Job, Manifest
from batchrun.spend import Spend

log = logging.getLogger("batchrun.run")


@dataclass(frozen=True)
class RunOptions:
    retry_failed: bool = False
    resubmit_unknown: bool = False
    download_concurrency: int = 4
    preflight: bool = True  # check image URLs before paying for jobs that would fail
    preflight_ssl: object = None  # aiohttp's `ssl` for preflight (tests trust their own CA)


@dataclass
class Plan:
    """What a run will do with each manifest job, decided from the ledger before anything is sent."""

    submit: list[Job] = field(default_factory=list)
    poll: list[tuple[Job, JobRow]] = field(default_factory=list)  # accepted remotely, not finished
    collect: list[tuple[Job, JobRow]] = field(default_factory=list)  # finished remotely or files damaged
    # --retry-failed jobs with a request id: asked first, submitted again only if it is unknown or failed
    recheck: list[tuple[Job, JobRow]] = field(default_factory=list)
    skip: list[Job] = field(default_factory=list)  # done and verified
    held: list[tuple[Job, str]] = field(default_factory=list)  # not touched, with the reason
    refused: list[tuple[Job, str]] = field(default_factory=list)  # input changed after submission


def outputs_intact(output_dir: Path, row: JobRow) -> bool:
    """Every recorded output of a done job is on disk with its recorded size and sha256."""
    return bool(row.outputs) and all(
        download.verify(output_dir / o.path, o.bytes, o.sha256) for o in row.outputs
    )


def make_plan(manifest: Manifest, ledger: Ledger, options: RunOptions) -> Plan:
    """Record what a run starts from (new jobs `pending`, interrupted submits `unknown`), then decide."""
    rows = {row.id: row for row in ledger.all()}
    for row in rows.values():
        if row.state == "submitting":  # a run died between the intent and the POST's answer
            ledger.set_state(row.id, "unknown", error=("unknown", "the run stopped while this job was being "
                                                       "submitted; the POST may have created a job"))
    ledger.add_pending(
        (job.id, manifest.model.model_id, job.input, job.input_sha256, manifest.estimate_cost(job))
        for job in manifest.jobs
        if job.id not in rows or rows[job.id].state == "pending"
    )
    rows = {row.id: row for row in ledger.all()}
    plan = decide(manifest, rows, options)
    for job in plan.submit:
        row = rows.get(job.id)
        if row is not None and row.input_sha256 != job.input_sha256:
            ledger.update_input(job.id, job.input, job.input_sha256, manifest.estimate_cost(job))
    return plan


def decide(manifest: Manifest, rows: dict[str, JobRow], options: RunOptions) -> Plan:
    """What each manifest job needs, given the ledger's rows. Reads files (to verify), writes nothing."""
    plan = Plan()
    resubmit_unknown = options.resubmit_unknown or manifest.settings.resubmit_unknown
    for job in manifest.jobs:
        row = rows.get(job.id)
        if row is None or (row.state == "pending" and row.submissions == 0):
            plan.submit.append(job)
            continue
        if row.input_sha256 != job.input_sha256 and (row.request_id or row.state in ("submitting", "unknown")):
            # Only a job that may exist remotely is refused: one whose POSTs all certainly created
            # nothing (refused with 429, rejected as invalid) simply runs with its new input.
            plan.refused.append((job, f"{job.label}: its input changed after it was submitted "
                                      f"(request {row.request_id or 'unknown'}); give the changed job a new id "
                                      "to run it, or restore the old input"))
            continue
        state = "unknown" if row.state == "submitting" else row.state
        if state == "pending":
            plan.submit.append(job)
        elif state in ("queued", "running"):
            plan.poll.append((job, row))
        elif state == "downloading":
            plan.collect.append((job, row))
        elif state == "done":
            if outputs_intact(manifest.output_dir, row):
                plan.skip.append(job)
            else:
                log.info("%s: a file is missing or damaged; downloading it again", job.id)
                plan.collect.append((job, row))
        elif state == "unknown":
            if resubmit_unknown:
                plan.submit.append(job)
            else:
                plan.held.append((job, "unknown: its POST may have created a job; check your RunComfy "
                                       "dashboard, then use --resubmit-unknown to send it again"))
        elif state in ("failed", "cancelled"):
            if options.retry_failed and row.request_id:
                plan.recheck.append((job, row))
            elif options.retry_failed:
                plan.submit.append(job)
            else:
                plan.held.append((job, f"{state}: use --retry-failed to submit it again"))
    return plan



def compute(manifest: Manifest, options: RunOptions = RunOptions()) -> tuple[Plan, Spend]:
    """The plan and the money already committed in this output dir (none when nothing has run)."""
    if not (manifest.output_dir / LEDGER_NAME).exists():
        return decide(manifest, {}, options), Spend()
    ledger = Ledger.open(manifest.output_dir, create=False, readonly=True)
    try:
        return decide(manifest, {row.id: row for row in ledger.all()}, options), ledger.spend()
    finally:
        ledger.close()


def summary(manifest: Manifest, plan: Plan, spend: Spend) -> dict:
    # A job to recheck may be submitted again: counted as if it will be.
    may_submit = plan.submit + [job for job, _ in plan.recheck]
    seconds = sum(manifest.model.video_seconds(job.input) for job in may_submit)
    estimate = round(sum(manifest.estimate_cost(job) for job in may_submit), 4)
    budget = manifest.settings.budget_usd
    spent = spend.total_usd
    return {
        "manifest": str(manifest.path),
        "output": str(manifest.output_dir),
        "model": manifest.model.model_id,
        "jobs": len(manifest.jobs),
        "submit": len(plan.submit),
        "recheck": len(plan.recheck),
        "resume": len(plan.poll),
        "download": len(plan.collect),
        "skip": len(plan.skip),
        "held": [{"id": job.id, "reason": why} for job, why in plan.held],
        "refused": [{"id": job.id, "reason": why} for job, why in plan.refused],
        "video_seconds": seconds,
        "estimated_cost_usd": estimate,
        "spent_usd": round(spent, 4),
        "simulated_usd": round(spend.simulated_usd, 4),
        "spent": spend.describe(),
        "budget_usd": budget,
        "budget_left_usd": None if budget is None else round(budget - spent, 4),
        "over_budget": budget is not None and spent + estimate > budget + 1e-9,
        # Absolute, so a path that climbs out of the manifest's folder with .. is plain to see.
        "local_files": sorted({str(path) for job in plan.submit for path in job.local_files.values()}),
    }


def show_plan(manifest: Manifest, out: TextIO, *, as_json: bool = False) -> int:
    try:
        plan, spent = compute(manifest)
    except LedgerError as exc:
        print(f"batchrun: {exc}", file=out)
        return 2
    info = summary(manifest, plan, spent)
    if as_json:
        print(json.dumps(info, indent=2), file=out)
        return 0
    rows = [
        ("jobs in manifest", str(info["jobs"])),
        ("to submit", str(info["submit"])),
        ("to ask again, then submit if lost", str(info["recheck"])),
        ("to resume (in flight)", str(info["resume"])),
        ("to download again", str(info["download"])),
        ("already done", str(info["skip"])),
        ("held", str(len(info["held"]))),
        ("refused (input changed)", str(len(info["refused"]))),
        ("video seconds to submit", f"{info['video_seconds']:g}"),
        ("estimated cost to submit", f"${info['estimated_cost_usd']:.2f}"),
        ("spent in this output dir", info["spent"]),
        ("budget", "none" if info["budget_usd"] is None else f"${info['budget_usd']:.2f}"),
    ]
    if info["budget_left_usd"] is not None:
        rows.append(("budget left", f"${info['budget_left_usd']:.2f}"))
    width = max(len(label) for label, _ in rows)
    print(f"plan for {info['manifest']} ({info['model']}) into {info['output']}", file=out)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}", file=out)
    if info["local_files"]:
        print(f"  local image files sent inline ({len(info['local_files'])}):", file=out)
        for path in info["local_files"][:20]:
            print(f"    {path}", file=out)
        if len(info["local_files"]) > 20:
            print(f"    ... and {len(info['local_files']) - 20} more (see --json)", file=out)
    for item in info["held"][:20] + info["refused"][:20]:
        print(f"  {item['id']}: {item['reason']}", file=out)
    if info["over_budget"]:
        print("  the budget does not cover every job: the run will stop submitting when it is reached", file=out)
    return 0
