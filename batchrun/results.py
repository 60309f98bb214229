"""What a run leaves for people and scripts: results.jsonl, `<id>.json` provenance, CSV/JSONL export."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from batchrun.crashpoints import crashpoint
from batchrun.fsutil import atomic_write
from batchrun.ledger import JobRow, Ledger

RESULTS_NAME = "results.jsonl"
CSV_COLUMNS = ("id", "state", "request_id", "submissions", "input_sha256", "outputs", "cost_usd", "cost_source",
               "error_kind", "error_message", "submitted_at", "finished_at")


def job_record(row: JobRow) -> dict[str, Any]:
    """One job as SPEC's results.jsonl line. `cost_usd` is the API's figure when it gave one, else the
    estimate for jobs that were charged (sent and not failed), else null; `cost_source` says which."""
    if row.cost_usd is not None:
        cost, source = row.cost_usd, "api"
    elif row.submissions > 0 and row.state not in ("failed", "cancelled", "pending"):
        cost, source = row.estimated_cost_usd, "estimate"
    else:
        cost, source = None, None
    return {
        "id": row.id,
        "state": row.state,
        "request_id": row.request_id,
        "submissions": row.submissions,
        "input_sha256": row.input_sha256,
        "outputs": [{"path": o.path, "bytes": o.bytes, "sha256": o.sha256} for o in row.outputs],
        "cost_usd": cost,
        "cost_source": source,
        "cost_flag": row.cost_flag,  # the API's figure when it was unusable (the estimate is counted)
        "estimated_cost_usd": row.estimated_cost_usd,
        "error": row.error,
        "remote_status": row.remote_status,
        "submitted_at": row.submitted_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "downloaded_at": row.downloaded_at,
    }


def to_jsonl(rows: list[JobRow]) -> bytes:
    return "".join(json.dumps(job_record(r), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def to_csv(rows: list[JobRow]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        record = job_record(row)
        error = record.pop("error") or {}
        record["error_kind"], record["error_message"] = error.get("kind"), error.get("message")
        record["outputs"] = " ".join(o["path"] for o in record["outputs"])
        writer.writerow(["" if record[c] is None else record[c] for c in CSV_COLUMNS])
    return buffer.getvalue().encode("utf-8")


def write_results(ledger: Ledger, output_dir: Path) -> Path:
    """Rewrite results.jsonl atomically from the ledger."""
    path = output_dir / RESULTS_NAME
    atomic_write(path, to_jsonl(ledger.all()), before_rename=lambda: crashpoint("results_rewrite"))
    return path


def write_provenance(output_dir: Path, row: JobRow) -> Path:
    """`<id>.json` beside the video: what was asked, of which model, and what came back.

    Not fsynced: it is rebuilt from the ledger whenever a run finds it missing."""
    record = job_record(row)
    record.update({"model": row.model, "input": row.input})
    path = output_dir / f"{row.id}.json"
    atomic_write(path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), durable=False)
    return path
