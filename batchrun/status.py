"""`batchrun status`: counts by state, the jobs needing attention and the spend, read from the ledger.

Opens the ledger read-only, so it is safe while a run is writing (SQLite WAL readers never block it).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from batchrun.ledger import STATES, JobRow, Ledger
from batchrun.lock import LOCK_NAME, live_pid
from batchrun.manifest import Manifest
from batchrun.spend import Spend

ATTENTION = ("unknown", "failed", "cancelled", "submitting")


@dataclass
class StatusReport:
    output_dir: Path
    counts: dict[str, int]
    spend: Spend
    attention: list[JobRow]  # jobs a person should look at, with their errors
    not_in_manifest: list[str]  # ledger jobs the manifest no longer lists
    not_started: list[str]  # manifest jobs the ledger has never seen
    running_pid: int | None


def _running_pid(output_dir: Path) -> int | None:
    """The PID written in run.lock, if that process is still alive (a hint for people, not a lock check)."""
    try:
        return live_pid((output_dir / LOCK_NAME).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def collect(output_dir: Path, manifest: Manifest | None = None) -> StatusReport:
    ledger = Ledger.open(output_dir, create=False, readonly=True)
    try:
        rows = ledger.all()
        spent = ledger.spend()
    finally:
        ledger.close()
    counts = Counter(row.state for row in rows)
    attention = [row for row in rows if row.state in ATTENTION or (row.error and row.state != "done")]
    manifest_ids = {job.id for job in manifest.jobs} if manifest else None
    return StatusReport(
        output_dir=output_dir,
        counts={state: counts[state] for state in STATES if counts[state]},
        spend=spent,
        attention=attention,
        not_in_manifest=[row.id for row in rows if manifest_ids is not None and row.id not in manifest_ids],
        not_started=[job.id for job in manifest.jobs if job.id not in {r.id for r in rows}] if manifest else [],
        running_pid=_running_pid(output_dir),
    )


def as_dict(report: StatusReport) -> dict[str, Any]:
    return {
        "output": str(report.output_dir),
        "running_pid": report.running_pid,
        "counts": report.counts,
        "total": sum(report.counts.values()),
        "spent_usd": round(report.spend.total_usd, 4),
        "simulated_usd": round(report.spend.simulated_usd, 4),
        "attention": [{"id": r.id, "state": r.state, "request_id": r.request_id, "request_ids": list(r.request_ids),
                       "error": r.error} for r in report.attention],
        "not_in_manifest": report.not_in_manifest,
        "not_started": report.not_started,
    }


def print_report(report: StatusReport, out: TextIO, *, as_json: bool = False, limit: int = 50) -> None:
    if as_json:
        print(json.dumps(as_dict(report), indent=2), file=out)
        return
    total = sum(report.counts.values())
    running = f"; a run is in progress (pid {report.running_pid})" if report.running_pid else ""
    print(f"{report.output_dir}: {total} jobs in the ledger{running}", file=out)
    width = max((len(s) for s in report.counts), default=5)
    for state, n in report.counts.items():
        print(f"  {state:<{width}}  {n:>6}", file=out)
    print(f"spent: {report.spend.describe()} (actual where the API reported it, else estimated)", file=out)
    if report.attention:
        print(f"needing attention ({len(report.attention)}):", file=out)
        for row in report.attention[:limit]:
            why = f": {row.error['message']}" if row.error else ""
            earlier = f" (earlier requests: {', '.join(row.earlier_request_ids)})" if row.earlier_request_ids else ""
            print(f"  {row.id}  {row.state}{why}{earlier}", file=out)
        if len(report.attention) > limit:
            print(f"  ... and {len(report.attention) - limit} more (use --json for all)", file=out)
    if report.not_in_manifest:
        shown = ", ".join(report.not_in_manifest[:20]) + (" ..." if len(report.not_in_manifest) > 20 else "")
        print(f"in the ledger but no longer in the manifest ({len(report.not_in_manifest)}): {shown}", file=out)
    if report.not_started:
        print(f"in the manifest but never run: {len(report.not_started)}", file=out)
