"""What a run leaves for people and scripts: results.jsonl, `<id>.json` provenance, CSV/JSONL export."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from batchrun import mediafacts
from batchrun.crashpoints import crashpoint
from batchrun.errors import LedgerError
from batchrun.fsutil import atomic_write
from batchrun.ledger import JobRow, Ledger
from batchrun.rewrite import write_if_changed
from batchrun.spend import job_cost

RESULTS_NAME = "results.jsonl"
CSV_COLUMNS = ("id", "state", "request_id", "submissions", "input_sha256", "outputs", "cost_usd", "cost_source",
               "error_kind", "error_message", "submitted_at", "finished_at", "refusal",
               # for a review sheet: what was asked, and what the reviewer decided
               "prompt", "image", "duration", "model", "take", "decision", "rating", "note")
DECISION_FILTERS = ("picked", "rejected", "unrated")
PROVENANCE_MAX_BYTES = 16 * 1024 * 1024  # far above any real <id>.json; a bigger file is not ours


def job_record(row: JobRow) -> dict[str, Any]:
    """One job as SPEC's results.jsonl line. `cost_usd` is what the job counts for by `spend.job_cost`
    (the API's figure, else the estimate of a job sent and not failed, else null); `cost_source` says
    which, and `simulated` is true when that money is the sandbox's. `request_ids` lists every request
    the job ever had, oldest first (`request_id` is the current one)."""
    cost, source = job_cost(row.state, row.submissions, row.cost_usd, row.estimated_cost_usd)
    return {
        "id": row.id,
        "state": row.state,
        "model": row.model,
        "request_id": row.request_id,
        "request_ids": list(row.request_ids),
        "submissions": row.submissions,
        "input_sha256": row.input_sha256,
        "outputs": _outputs_record(row),
        "cost_usd": cost,
        "cost_source": source,
        "simulated": row.simulated,
        "cost_flag": row.cost_flag,  # the API's figure when it was unusable (the estimate is counted)
        "estimated_cost_usd": row.estimated_cost_usd,
        "error": row.error,
        # Why the manifest's job of this id was not run as written (its input changed after it was
        # submitted); this line then describes the job as it was made.
        "refusal": row.refusal,
        "remote_status": row.remote_status,
        "submitted_at": row.submitted_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "downloaded_at": row.downloaded_at,
        "take": row.take or 1,
        "take_of": row.take_of,
        "decision": row.decision,
        "rating": row.rating,
        "note": row.note,
        "media": row.media,  # {"duration_s", "width", "height", "fps", "has_audio"} read from the file, or null
        "media_flags": mediafacts.flags(row.media, row.input),  # how the file differs from what was paid for
    }


def decision_filter(rows: Iterable[JobRow], which: str | None) -> Iterator[JobRow]:
    """The rows `export --picked|--rejected|--unrated` keeps, lazily; "unrated" is a done job not decided yet."""
    if which is None:
        return iter(rows)
    if which == "unrated":
        return (row for row in rows if row.decision is None and row.state == "done")
    return (row for row in rows if row.decision == which)


def jsonl_lines(rows: Iterable[JobRow]) -> Iterator[bytes]:
    """results.jsonl (and `export`), one encoded line per row as the rows come."""
    for row in rows:
        yield (json.dumps(job_record(row), ensure_ascii=False) + "\n").encode("utf-8")


def to_jsonl(rows: Iterable[JobRow]) -> bytes:
    return b"".join(jsonl_lines(rows))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def sheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet will show as text: text starting like a formula (=, +, -, @, tab, CR) gets a
    leading apostrophe, so a prompt or a note such as =HYPERLINK(...) is never run when the file is
    opened (OWASP's advice on CSV injection). Other values are unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_lines(rows: Iterable[JobRow]) -> Iterator[str]:
    """`export --format csv`: the header, then one line per row as the rows come."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        record = job_record(row)
        error = record.pop("error") or {}
        record["error_kind"], record["error_message"] = error.get("kind"), error.get("message")
        record["outputs"] = " ".join(o["path"] for o in record["outputs"])
        record["prompt"], record["image"], record["duration"] = (
            row.input.get("prompt"), row.input.get("start_image_url"), row.input.get("duration"))
        writer.writerow(["" if record[c] is None else sheet_cell(record[c]) for c in CSV_COLUMNS])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def to_csv(rows: Iterable[JobRow]) -> bytes:
    return "".join(csv_lines(rows)).encode("utf-8")


# Which lines `job_record` writes: part of results.jsonl's stamp in the ledger, so a batchrun that writes
# other lines never takes a file an earlier one wrote for current. Change it whenever job_record's output
# changes (tests/test_results_stamp.py pins the fields).
RESULTS_FORMAT = "1"


def write_results(ledger: Ledger, output_dir: Path) -> Path:
    """Make results.jsonl hold the ledger, one line per job, streamed row by row (never built whole in
    memory); a file that already holds exactly that is not rewritten (same inode, mtime and bytes), else
    it is replaced atomically (see batchrun.rewrite). Then, if the ledger did not change meanwhile, the
    file's stat is recorded with the ledger's change count (`results_current`)."""
    path = output_dir / RESULTS_NAME
    before = ledger.change_count()
    write_if_changed(path, jsonl_lines(ledger.rows()), before_rename=lambda: crashpoint("results_rewrite"))
    # Equal counts before and after: no change was committed while the rows were read, so the file holds
    # the ledger at that count. The record itself is refused if a change lands after this check.
    if before is not None and ledger.change_count() == before:
        try:
            st = os.lstat(path)
        except OSError:
            return path
        try:
            ledger.record_results_stamp(before, RESULTS_FORMAT, st.st_size, st.st_mtime_ns, st.st_ino)
        except LedgerError:  # a ledger opened read-only (adopt's finish), a full disk: the next run compares
            pass
    return path


def results_current(ledger: Ledger, output_dir: Path) -> bool:
    """Whether results.jsonl holds exactly the ledger's rows as `write_results` writes them, known without
    reading either: the ledger's change count (bumped by triggers in every transaction that changes what
    the file shows, whichever process or tool makes it) is the one recorded when the file was last
    written or found current, in this format, and the file still has the size, mtime and inode recorded
    then. False when in doubt (no record, an older ledger): then the file is compared as it is rewritten.

    The limit is filecheck's: an edit of results.jsonl that restores its size, inode and mtime is not seen."""
    stamp = ledger.results_stamp()
    if stamp is None or stamp[1] is None:
        return False
    now, (changes, fmt, size, mtime_ns, inode) = stamp
    if changes != now or fmt != RESULTS_FORMAT:
        return False
    try:
        st = os.lstat(output_dir / RESULTS_NAME)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns, st.st_ino) == (size, mtime_ns, inode)


def provenance_path(output_dir: Path, row: JobRow) -> Path:
    return output_dir / f"{row.id}.json"


def provenance_intact(output_dir: Path, row: JobRow) -> bool:
    """`<id>.json` is a regular file (not a symlink) naming this job's request, model, input (and its
    digest) and outputs.

    Fields a newer batchrun adds or an older one lacked do not count: only what identifies the render."""
    path = os.path.join(output_dir, f"{row.id}.json")  # as provenance_path, without pathlib's cost per job
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > PROVENANCE_MAX_BYTES:
            return False
        # One read of the size fstat gave (plus one byte, to see a file that grew meanwhile): this runs
        # for every done job of a re-run and of `status`.
        data = os.read(fd, st.st_size + 1)
        record = json.loads(data) if len(data) <= PROVENANCE_MAX_BYTES else None
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    return (isinstance(record, dict) and record.get("id") == row.id and record.get("request_id") == row.request_id
            and record.get("input_sha256") == row.input_sha256 and record.get("model") == row.model
            and record.get("outputs") == _outputs_record(row) and record.get("input") == row.input)


def provenance_identity(row: JobRow) -> str:
    """The ledger fields `provenance_intact` compares, as one string: recorded with a `<id>.json` found
    intact, so that a stat alone vouches for the file only while the ledger still says the same."""
    outputs = ";".join(f"{o.path}:{o.bytes}:{o.sha256}" for o in row.outputs)
    return f"{row.request_id}|{row.model}|{row.input_sha256}|{outputs}"


ProvenanceStat = tuple[str, int, int, int]  # (identity, bytes, mtime_ns, inode), as Ledger.provenance_stats


def provenance_check(output_dir: Path | str, row: JobRow, recorded: ProvenanceStat | None, *,
                     full: bool = False) -> tuple[bool, ProvenanceStat | None]:
    """(intact, what to record) for a done job's `<id>.json`. When the file's size, mtime and inode and the
    ledger's identifying fields are those `recorded` when it was last found intact, it is intact without
    being read (unless `full`); else it is read and checked by `provenance_intact`, and when intact its
    stat is returned to be recorded. The same limit as batchrun.filecheck: an edit that restores size,
    inode and mtime is seen only with `full`."""
    path = os.path.join(output_dir, f"{row.id}.json")
    identity = provenance_identity(row)
    try:
        st = os.lstat(path)
    except OSError:
        return False, None
    found = (identity, st.st_size, st.st_mtime_ns, st.st_ino)
    if not full and recorded is not None and tuple(recorded) == found and stat.S_ISREG(st.st_mode):
        return True, None
    if not provenance_intact(output_dir, row):
        return False, None
    return True, (None if recorded is not None and tuple(recorded) == found else found)


def _outputs_record(row: JobRow) -> list[dict[str, Any]]:
    """The `outputs` field of results.jsonl and `<id>.json`."""
    return [{"path": o.path, "bytes": o.bytes, "sha256": o.sha256} for o in row.outputs]


def write_provenance(output_dir: Path, row: JobRow) -> Path:
    """`<id>.json` beside the video: what was asked, of which model, and what came back.

    Not fsynced: it is rebuilt from the ledger whenever a run finds it missing."""
    record = job_record(row)
    record.update({"model": row.model, "input": row.input})
    path = provenance_path(output_dir, row)
    atomic_write(path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), durable=False)
    return path
