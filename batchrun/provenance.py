"""`<id>.json` provenance files of the jobs a run finishes, written in batches instead of one
worker-thread trip per job.

SPEC's promise is kept at the end of a run: `ProvenanceWriter.close()` writes every file still owed
before the run's closing lines, so every `done` job has its file when a run ends. A run killed in
between leaves some done jobs without one; the next run's plan finds them (`Plan.provenance`, checked
by `results.provenance_intact`) and writes them before it does anything else. The files are derived
from the ledger and are not fsynced (as before): a lost one is rebuilt the same way.

Batching: jobs are queued as they become `done`; once `batch` are waiting, their rows are read from the
ledger in one pass (`Ledger.get_many`, which commits the queued `done` first, so a file never precedes
its job's `done` on disk) and their files written at once, on the event loop's own thread: a worker
thread would spend more in handing the interpreter lock back and forth (several futex calls per file)
than the few milliseconds the batch blocks the loop. Choices where the issue was silent: 256 jobs a
batch, so a kill costs the next run at most a few hundred small files to write, and `status` during a
run shows at most that many as missing.

A file that does not exist yet is created in place (`O_EXCL`, one write) rather than through a
temporary file and a rename: a kill mid-write leaves a cut file, which `provenance_intact` finds
damaged and the next run rewrites; an existing file is replaced atomically as before.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from batchrun.crashpoints import crashpoint
from batchrun.errors import LedgerError
from batchrun.ledger import JobRow, Ledger, LedgerWriteError
from batchrun.results import job_record, provenance_identity, provenance_path, write_provenance

log = logging.getLogger("batchrun.run")

BATCH = 256

Written = tuple[str, str, int, int, int]  # (job id, identity, bytes, mtime_ns, inode) of a file written


def _write_new(output_dir: Path, row: JobRow) -> os.stat_result | None:
    """Create `<id>.json` if it does not exist (never through a link) and return its stat; None if
    something is there."""
    record = job_record(row)
    record.update({"model": row.model, "input": row.input})
    data = (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        fd = os.open(provenance_path(output_dir, row), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ELOOP):
            return None
        raise
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return os.fstat(fd)
    finally:
        os.close(fd)


def write_all(output_dir: Path, rows: Iterable[JobRow]) -> tuple[list[tuple[str, OSError]], list[Written]]:
    """Write the `<id>.json` of each row. Returns the (id, error) of those that could not be written, and
    the (id, identity, bytes, mtime_ns, inode) of those written, for `Ledger.record_provenance_stats`: a
    file the ledger vouches for by its stat is not read again by the next run (results.provenance_check)."""
    failed, written = [], []
    for row in rows:
        try:
            st = _write_new(output_dir, row)
            if st is None:
                # replaces whatever is there (a link included) atomically
                st = os.lstat(write_provenance(output_dir, row))
        except OSError as exc:
            failed.append((row.id, exc))
        else:
            written.append((row.id, provenance_identity(row), st.st_size, st.st_mtime_ns, st.st_ino))
    return failed, written


def record(ledger: Ledger, written: list[Written]) -> None:
    """Record the stats `write_all` gave; a failure only costs the next run a read of those files."""
    try:
        ledger.record_provenance_stats(written)
    except LedgerError as exc:
        log.warning("could not record the stat of the provenance files written: %s", exc)


class ProvenanceWriter:
    """Writes the provenance files of jobs that became `done`, `batch` at a time."""

    def __init__(self, ledger: Ledger, output_dir: Path, batch: int = BATCH):
        self.ledger = ledger
        self.output_dir = output_dir
        self.batch = batch
        self._waiting: list[str] = []
        self.batches = 0  # batches written (a benchmark figure)

    def add(self, job_id: str) -> None:
        """`job_id` is done (its `done` may still be queued in the ledger): its file is owed."""
        self._waiting.append(job_id)
        if len(self._waiting) >= self.batch:
            try:
                self._write()
            except LedgerError as exc:  # the next run writes the files
                self._failed(exc)

    def _write(self) -> None:
        ids, self._waiting = self._waiting, []
        rows = [row for row in self.ledger.get_many(ids) if row.state == "done"]
        crashpoint("provenance_batch")
        self.batches += 1
        failed, written = write_all(self.output_dir, rows)
        self._report(failed)
        record(self.ledger, written)

    def _failed(self, exc: LedgerError) -> None:
        """Reading the rows committed the queued writes first: if that commit failed, the run must stop as
        for any failed commit (the ledger would no longer hold what happened), not only log it."""
        self._report(exc)
        if isinstance(exc, LedgerWriteError) and self.ledger.on_write_error is not None:
            self.ledger.on_write_error(exc)

    @staticmethod
    def _report(outcome: list[tuple[str, OSError]] | BaseException) -> None:
        if isinstance(outcome, BaseException):
            log.warning("could not write provenance files: %s; the next run writes the missing ones", outcome)
            return
        for job_id, exc in outcome:
            log.warning("%s: could not write %s.json: %s; the next run writes it", job_id, job_id, exc)

    def close(self) -> None:
        """Write every file still owed. A ledger that cannot be read is logged, not raised: the next run
        writes the missing files."""
        if self._waiting:
            try:
                self._write()
            except LedgerError as exc:
                self._failed(exc)
