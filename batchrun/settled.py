"""Done jobs settled at a glance: the one pass over the ledger that `status`, `plan` and a re-run make
before they build any full row.

A done job is *settled* when neither a person nor a run has anything to do for it:
- the manifest asks for it as it was made (same input digest), or, without a manifest, no refusal is
  recorded for it;
- its one output is a regular file with the size, mtime and inode recorded at download (batchrun.filecheck);
- its `<id>.json` is a regular file with the size, mtime and inode recorded when it was last found intact,
  and the ledger's fields that file names are still those recorded then (results.provenance_check).

That is told from a short tuple per job (`Ledger.briefs`, one query) and one `lstat` per file, relative to
the output dir opened once, without building a JobRow: about a fifth of what building the rows and
checking them cost (at 100,000 jobs, about 1 s instead of 5-6 s; the query and the stats are most of it). Every
other job (not done, two outputs, a stat that differs, a file missing, an input changed...) is listed in
ledger order, for the caller to read in full (`Ledger.rows_of`) and check as before, so what is missing,
damaged or refused is found and said exactly as without this pass: a settled job is one those checks
would have passed without reading a file. For `status`, the flags its media facts raise (how the video
differs from what was paid for, mediafacts.flags) are worked out in the same pass. With `full`
(`--verify`) nothing is settled: every file is hashed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from batchrun import mediafacts
from batchrun.ledger import media_facts

if TYPE_CHECKING:
    from batchrun.ledger import Ledger
    from batchrun.manifest import Job


@dataclass
class Sweep:
    settled: set[str] = field(default_factory=set)  # done jobs settled as described above
    unsettled: list[str] = field(default_factory=list)  # every other ledger job, oldest first
    # With `media`: (place in the ledger's order, id, flags) of the settled jobs whose video raises flags;
    # a place is (first_seen_at, rowid): sorting by it gives the ledger's order
    flagged: list[tuple[tuple[str, int], str, list[str]]] = field(default_factory=list)
    places: dict[str, tuple[str, int]] = field(default_factory=dict)  # with `media`: the unsettled jobs' places


def sweep(ledger: Ledger, output_dir: Path, jobs: Mapping[str, Job] | None, *, media: bool = False,
          full: bool = False,
          mismatches: Callable[[], list[tuple[str, tuple[str, int]]]] | None = None) -> Sweep:
    """Split the ledger's jobs into settled and unsettled (see the module docstring). `jobs`: the
    manifest's jobs by id (None: no manifest); `media`: also say which settled jobs' media facts raise
    flags, and where every job listed stands in the ledger's order (to list flags in that order). Reads
    the ledger once; call it inside `ledger.snapshot()` when the unsettled rows are read next. Writes
    nothing. `mismatches`: gives `Ledger.identity_mismatches` as of this snapshot once the files are
    statted (batchrun.sidereads reads them meanwhile); the briefs are then read without comparing
    identities."""
    # The unsettled are listed in the ledger's order, so that their full rows are read in that order.
    found = Sweep()
    briefs = None if full else ledger.briefs(media=media, asked=jobs is None, identity=mismatches is None)
    folder = None
    if briefs is not None:
        try:
            # O_PATH (Linux): only a handle to stat names in, so a dir one may search but not list still works.
            folder = os.open(output_dir, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:  # no output dir: nothing on disk is as recorded
            pass
    if folder is None:  # every job is checked in full
        found.unsettled = ledger.ids()
        if media:
            found.places = {job_id: ("", place) for place, job_id in enumerate(found.unsettled)}
        return found
    try:
        unsettled = _split(briefs, folder, jobs, media, found)
    finally:
        os.close(folder)
    if mismatches is not None:
        _unsettle(found, unsettled, mismatches(), media)
    unsettled.sort()
    found.unsettled = [job_id for _, job_id in unsettled]
    return found


def _unsettle(found: Sweep, unsettled: list[tuple[tuple[str, int], str]],
              mismatches: list[tuple[str, tuple[str, int]]], media: bool) -> None:
    """Move the jobs whose recorded identity does not match from settled to unsettled."""
    moved = {job_id for job_id, _ in mismatches if job_id in found.settled}
    if not moved:
        return
    found.settled -= moved
    found.flagged[:] = [entry for entry in found.flagged if entry[1] not in moved]
    for job_id, place in mismatches:
        if job_id in moved:
            unsettled.append((place, job_id))
            if media:
                found.places[job_id] = place


def _split(briefs, folder: int, jobs: Mapping[str, Job] | None, media: bool,
           found: Sweep) -> list[tuple[tuple[str, int], str]]:
    """Fill `found.settled` (and with `media`, `found.flagged` and `found.places`); returns the unsettled
    as (place, id), unsorted."""
    # One loop over 100,000 tuples: names bound locally, stats compared inline (a function call per file
    # would be a fifth of the loop).
    settle, flagged, places = found.settled.add, found.flagged, found.places
    unsettled: list[tuple[tuple[str, int], str]] = []
    keep = unsettled.append
    lstat, is_regular = os.stat, stat.S_ISREG
    get = jobs.get if jobs is not None else None
    asked = mediafacts.asked
    raised: dict[tuple, list[str]] = {}  # (media facts' text, asked duration, audio) -> the flags they raise
    for brief in briefs:
        job_id = brief[0]
        if not brief[1]:  # not quick: not done, not one output, or `<id>.json` not recorded as it is now
            keep(((brief[11], brief[12]), job_id))
            if media:
                places[job_id] = (brief[11], brief[12])
            continue
        job = None
        if get is not None:
            job = get(job_id)
            ok = job is not None and job.input_sha256 == brief[2]
        else:
            ok = not brief[3]  # else a refusal recorded by the last run: listed as such
        if ok:
            try:
                video = lstat(brief[4], dir_fd=folder, follow_symlinks=False)
                record = lstat(job_id + ".json", dir_fd=folder, follow_symlinks=False)
            except (OSError, ValueError):  # missing, or a name no file can have
                ok = False
            else:
                ok = (video.st_mtime_ns == brief[6] and video.st_ino == brief[7] and video.st_size == brief[5]
                      and record.st_mtime_ns == brief[9] and record.st_ino == brief[10]
                      and record.st_size == brief[8] and is_regular(video.st_mode) and is_regular(record.st_mode))
        if ok and media and brief[13] is not None:
            # (media facts' text, *mediafacts.asked(input)): the input's own when the manifest's is the one
            # the job was made with, else what SQL read of the ledger's
            key = (brief[13], *asked(job.input)) if job is not None else brief[13:16]
            if key[2] is None:  # its input is not JSON: the full row says what it can
                ok = False
            else:
                try:
                    found_flags = raised.get(key)
                except TypeError:  # an unhashable duration (a list): not cached
                    found_flags = None
                    uncached = True
                else:
                    uncached = False
                if found_flags is None:
                    found_flags = mediafacts.flags_for(media_facts(brief[13]), key[1], key[2])
                    if not uncached:
                        raised[key] = found_flags
                if found_flags:
                    # One list per kind of difference, shared by the jobs that show it (nothing changes it).
                    flagged.append(((brief[11], brief[12]), job_id, found_flags))
        if ok:
            settle(job_id)
        else:
            keep(((brief[11], brief[12]), job_id))
            if media:
                places[job_id] = (brief[11], brief[12])
    return unsettled
