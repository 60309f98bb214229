"""Takes: several separately paid renders of one input, side by side for review.

`takes: N` on a job (or in `defaults`) makes N jobs of the same input. The take number is part of the
job's identity, so takes are never deduplicated into one job and each is paid once:

- take 1 keeps the job's id as written (or derived), so a ledger made before `takes:` was added keeps
  working: `beach`;
- take k >= 2 is `<id>-t<k>`: `beach-t2`, `beach-t3`. Its files are `beach-t2.mp4`, ... (a job's own
  further outputs are `<id>-2.mp4`, without the `t`, so they never collide).

`batchrun reroll` asks for more takes after the fact. Those are recorded in the output dir's ledger (table
`rerolls`: id, take_of, take, requested_at), not in the manifest, which stays the source of the inputs:
`with_rerolls` adds them to the manifest's jobs, with the input of take 1 as the manifest has it now, so
the next `run` submits exactly them, once each. A rerolled take whose number the manifest's `takes:` later
reaches is the same job (same id), not a second one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchrun.ledger import Ledger
    from batchrun.manifest import Job, Manifest

KEY = "takes"
MAX_TAKES = 100  # per input in the manifest; far above what anyone reviews side by side
_TAKE_ID = re.compile(r"^(?P<base>.+)-t(?P<take>[1-9][0-9]*)$")


def take_id(job_id: str, take: int) -> str:
    """The id of take `take` of the job written as `job_id`."""
    return job_id if take == 1 else f"{job_id}-t{take}"


def check_count(value: object) -> int | str:
    """The number of takes a manifest asks for, or the problem with it (a message)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"takes must be a whole number from 1 to {MAX_TAKES}, not {value!r}"[:200]
    if not 1 <= value <= MAX_TAKES:
        return f"takes must be from 1 to {MAX_TAKES}, not {value}"
    return value


def with_rerolls(manifest: Manifest, rerolls: list[tuple[str, str, int]]) -> list[Job]:
    """Add to `manifest.jobs` (in place; also returned) the rerolled takes `(id, take_of, take)` whose
    take 1 is still in the manifest and whose id the manifest does not already list."""
    by_id = {job.id: job for job in manifest.jobs}
    for job_id, take_of, take in rerolls:
        base = by_id.get(take_of)
        if job_id in by_id or base is None:
            continue
        job = dataclasses.replace(base, index=len(manifest.jobs), id=job_id, take=take, take_of=take_of)
        manifest.jobs.append(job)
        by_id[job_id] = job
    return manifest.jobs


def base_of(manifest: Manifest, job_id: str) -> str | None:
    """The id of take 1 of the manifest's job `job_id` (itself for a take 1), or None if it is not listed."""
    for job in manifest.jobs:
        if job.id == job_id:
            return job.take_of or job.id
    match = _TAKE_ID.match(job_id)
    if match and any(job.id == match["base"] and job.take == 1 for job in manifest.jobs):
        return match["base"]
    return None


def request_more(manifest: Manifest, ledger: Ledger, job_ids: list[str], count: int) -> list[str]:
    """Record `count` more takes of each job (by id of any of its takes) in the ledger; return the new ids.

    Raises KeyError naming the first id that is not a job of the manifest, ValueError when a new id would
    be over 64 characters; nothing is recorded then. The next take number is one past the highest the
    manifest, the ledger's jobs and earlier rerolls know for that input."""
    bases = []
    for job_id in job_ids:
        base = base_of(manifest, job_id)
        if base is None:
            raise KeyError(job_id)
        bases.append(base)

    def choose(taken: set[str]) -> list[tuple[str, str, int]]:
        known = {job.id for job in manifest.jobs} | taken
        made: list[tuple[str, str, int]] = []
        for base in dict.fromkeys(bases):
            take = 1
            for _ in range(count):
                while take_id(base, take) in known:
                    take += 1
                if len(take_id(base, take)) > 64:
                    raise ValueError(f"take {take} of {base!r} would have the id {take_id(base, take)!r}, over 64 "
                                     "characters: give the job a shorter id")
                made.append((take_id(base, take), base, take))
                known.add(take_id(base, take))
        return made

    return [m[0] for m in ledger.add_rerolls(choose)]
