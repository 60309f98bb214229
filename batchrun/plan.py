"""`batchrun plan`: what a run would do and what it would cost, without sending or writing anything."""

from __future__ import annotations

import json
from typing import TextIO

from batchrun.errors import LedgerError
from batchrun.ledger import LEDGER_NAME, Ledger
from batchrun.manifest import Manifest
from batchrun.scheduler import Plan, RunOptions, decide


def compute(manifest: Manifest, options: RunOptions = RunOptions()) -> tuple[Plan, float]:
    """The plan and the money already committed in this output dir (0 when nothing has run)."""
    if not (manifest.output_dir / LEDGER_NAME).exists():
        return decide(manifest, {}, options), 0.0
    ledger = Ledger.open(manifest.output_dir, create=False, readonly=True)
    try:
        return decide(manifest, {row.id: row for row in ledger.all()}, options), ledger.spent_usd()
    finally:
        ledger.close()


def summary(manifest: Manifest, plan: Plan, spent: float) -> dict:
    seconds = sum(manifest.model.video_seconds(job.input) for job in plan.submit)
    estimate = round(sum(manifest.estimate_cost(job) for job in plan.submit), 4)
    budget = manifest.settings.budget_usd
    return {
        "manifest": str(manifest.path),
        "output": str(manifest.output_dir),
        "model": manifest.model.model_id,
        "jobs": len(manifest.jobs),
        "submit": len(plan.submit),
        "resume": len(plan.poll),
        "download": len(plan.collect),
        "skip": len(plan.skip),
        "held": [{"id": job.id, "reason": why} for job, why in plan.held],
        "refused": [{"id": job.id, "reason": why} for job, why in plan.refused],
        "video_seconds": seconds,
        "estimated_cost_usd": estimate,
        "spent_usd": round(spent, 4),
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
        ("to resume (in flight)", str(info["resume"])),
        ("to download again", str(info["download"])),
        ("already done", str(info["skip"])),
        ("held", str(len(info["held"]))),
        ("refused (input changed)", str(len(info["refused"]))),
        ("video seconds to submit", f"{info['video_seconds']:g}"),
        ("estimated cost to submit", f"${info['estimated_cost_usd']:.2f}"),
        ("spent in this output dir", f"${info['spent_usd']:.2f}"),
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
