"""`batchrun adopt`: attach a request id found by hand (RunComfy's Generations page) to an `unknown` job,
so the next run polls and collects it instead of paying for it again.

RunComfy has no call that lists a user's requests, so a job whose POST answer was lost stays `unknown`
until a person finds its request. Before attaching one, adopt asks the API about it with the result
call (which also answers for unfinished jobs) and refuses:
- a job that is not `unknown` or `submitting` (anything else either has its request, or certainly
  created nothing and can simply run);
- a request id the ledger already records for another job (or that the same call attaches twice);
- a request the API does not know (404), or refuses to show;
- a request whose input visibly differs from the job's: only where the API's answer carries the input
  (the documented answer does not; fields absent from either side are not compared, and a local image
  sent inline is compared by its file, not at all).
It takes the output dir's lock, so no run is changing the ledger meanwhile.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrun.api import Client
from batchrun.console import stamp
from batchrun.errors import ApiError, AuthError, LedgerError, RequestNotFound, UsageError
from batchrun.ledger import LEDGER_NAME, JobRow, Ledger
from batchrun.lock import OutputDirLock
from batchrun.results import write_results

ADOPTABLE = ("unknown", "submitting")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class Outcome:
    job_id: str
    request_id: str
    adopted: bool
    message: str


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """`job,request_id` rows of a CSV file (a first row naming the columns is skipped; blank lines too).
    Raises UsageError naming the file and line of the first unreadable row."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it: {exc}") from None
    pairs = []
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if line_no == 1 and [c.lower() for c in cells[:2]] in (["job", "request_id"], ["id", "request_id"]):
            continue
        if len(cells) != 2 or not all(cells):
            raise UsageError(f"{path}:{line_no}: expected two columns, job and request_id, got {row!r}"[:200])
        pairs.append((cells[0], cells[1]))
    if not pairs:
        raise UsageError(f"{path}: no job,request_id rows")
    return pairs


def _input_differs(job_input: dict[str, Any], shown: Any) -> list[str]:
    """The fields whose values the API shows differently from the job's input (both sides present)."""
    if not isinstance(shown, dict):
        return []
    differ = []
    for key, value in job_input.items():
        if key not in shown:
            continue
        theirs = shown[key]
        if isinstance(theirs, str) and theirs.startswith("data:"):
            continue  # a local image sent inline: the ledger keeps its path, not its bytes
        if theirs != value and not (isinstance(value, (int, float)) and isinstance(theirs, (int, float))
                                    and float(theirs) == float(value)):
            differ.append(key)
    return differ


async def adopt(output_dir: Path, pairs: list[tuple[str, str]], client: Client) -> list[Outcome]:
    """Check each (job id, request id) pair and attach those that pass; returns one outcome per pair."""
    if not (output_dir / LEDGER_NAME).is_file():
        raise LedgerError(f"no ledger at {output_dir / LEDGER_NAME}: nothing has run with this output directory yet")
    with OutputDirLock(output_dir):
        ledger = Ledger.open(output_dir, create=False)
        try:
            claimed: dict[str, str] = {}  # request ids attached by this call, to their jobs
            return [await _adopt_one(ledger, output_dir, job_id, request_id, client, claimed)
                    for job_id, request_id in pairs]
        finally:
            ledger.close()


async def _adopt_one(ledger: Ledger, output_dir: Path, job_id: str, request_id: str, client: Client,
                     claimed: dict[str, str]) -> Outcome:
    def refuse(why: str) -> Outcome:
        return Outcome(job_id, request_id, False, f"{job_id}: not adopted: {why}")

    if not _REQUEST_ID.match(request_id):
        return refuse(f"{request_id!r} does not look like a request id")
    row = ledger.get(job_id)
    if row is None:
        return refuse("no such job in this output dir's ledger")
    if row.state not in ADOPTABLE:
        extra = f" with request {row.request_id}" if row.request_id else ""
        return refuse(f"it is {row.state}{extra}; only unknown jobs can be adopted")
    owner = claimed.get(request_id) or _owner(ledger, request_id)
    if owner is not None:
        return refuse(f"request {request_id} already belongs to job {owner}")
    try:
        result = await client.result(request_id)
    except RequestNotFound as exc:
        return refuse(f"the API does not know request {request_id} ({exc})")
    except AuthError as exc:
        return refuse(f"the API refused the token: {exc}")
    except ApiError as exc:
        return refuse(f"could not check request {request_id}: {exc}; nothing changed, try again later")
    differ = _input_differs(row.input, result.input)
    if differ:
        return refuse(f"request {request_id} was made with a different {', '.join(differ)} than this job's")
    _attach(ledger, output_dir, row, request_id)
    claimed[request_id] = job_id
    return Outcome(job_id, request_id, True, f"{job_id}: adopted request {request_id} (remote status "
                                            f"{result.raw_status}); the next run collects it")


def _owner(ledger: Ledger, request_id: str) -> str | None:
    return next((row.id for row in ledger.all() if row.request_id == request_id), None)


def _attach(ledger: Ledger, output_dir: Path, row: JobRow, request_id: str) -> None:
    """The job now has its request: `queued` as if the POST's answer had arrived (the next run polls it).
    `submissions` is left alone: the POST was counted when its intent was recorded."""
    ledger.adopt_request(row.id, request_id)
    with open(output_dir / "run.log", "a", encoding="utf-8") as log:
        log.write(f"{stamp()} INFO adopt: {row.id}: attached request {request_id} (was {row.state})\n")


def finish(output_dir: Path) -> None:
    """results.jsonl follows the ledger after adopting, as after a run."""
    ledger = Ledger.open(output_dir, create=False, readonly=True)
    try:
        write_results(ledger, output_dir)
    finally:
        ledger.close()
