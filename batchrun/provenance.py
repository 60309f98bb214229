"""`<id>.json` provenance files of the jobs a run finishes, written in batches instead of one
worker-thread trip per job.

SPEC's promise is kept at the end of a run: `ProvenanceWriter.close()` writes every file still owed
before the run's closing lines, so every `done` job has its file when a run ends. A run killed in
between leaves some done jobs without one; the next run's plan finds them (`Plan.provenance`, checked
by `results.provenance_intact`) and writes them before it does anything else. The files are derived
from the ledger and are not fsynced (as before): a lost one is rebuilt the same way.

Batching: jobs are queued as they become `done`; once `batch` are waiting and no batch is being
written, their rows are read from the ledger in one pass (`Ledger.get_many`, which commits the queued
`done` first, so a file never precedes its job's `done` on disk) and written in one worker-thread trip.
Choice where the issue was silent: 256 jobs a batch, so a kill costs the next run at most a few
hundred small files to write, and a 10,000-job run makes about 40 trips instead of 10,000.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

from batchrun.crashpoints import crashpoint
from batchrun.errors import LedgerError
from batchrun.ledger import JobRow, Ledger
from batchrun.results import write_provenance

log = logging.getLogger("batchrun.run")

BATCH = 256


def write_all(output_dir: Path, rows: Iterable[JobRow]) -> list[tuple[str, OSError]]:
    """Write the `<id>.json` of each row; returns the (id, error) of those that could not be written."""
    failed = []
    for row in rows:
        try:
            write_provenance(output_dir, row)
        except OSError as exc:
            failed.append((row.id, exc))
    return failed


class ProvenanceWriter:
    """Writes the provenance files of jobs that became `done`, `batch` at a time, off the event loop."""

    def __init__(self, ledger: Ledger, output_dir: Path, batch: int = BATCH):
        self.ledger = ledger
        self.output_dir = output_dir
        self.batch = batch
        self._waiting: list[str] = []
        self._trip: asyncio.Future | None = None
        self.trips = 0  # worker-thread trips made (a benchmark figure)

    def add(self, job_id: str) -> None:
        """`job_id` is done (its `done` may still be queued in the ledger): its file is owed."""
        self._waiting.append(job_id)
        if len(self._waiting) >= self.batch and self._trip is None:
            self._trip = self._start()

    def _start(self) -> asyncio.Future:
        ids, self._waiting = self._waiting, []
        rows = [row for row in self.ledger.get_many(ids) if row.state == "done"]
        crashpoint("provenance_batch")
        self.trips += 1
        trip = asyncio.get_running_loop().run_in_executor(None, write_all, self.output_dir, rows)
        trip.add_done_callback(self._finished)
        return trip

    def _finished(self, trip: asyncio.Future) -> None:
        self._trip = None
        if not trip.cancelled():
            self._report(trip.exception() or trip.result())
        if len(self._waiting) >= self.batch:
            try:
                self._trip = self._start()
            except LedgerError as exc:  # the run stops on it elsewhere; the next run writes the files
                self._report(exc)

    @staticmethod
    def _report(outcome: list[tuple[str, OSError]] | BaseException) -> None:
        if isinstance(outcome, BaseException):
            log.warning("could not write provenance files: %s; the next run writes the missing ones", outcome)
            return
        for job_id, exc in outcome:
            log.warning("%s: could not write %s.json: %s; the next run writes it", job_id, job_id, exc)

    async def close(self) -> None:
        """Write every file still owed (the batch under way, then the rest in one trip). A ledger that
        cannot be read or written is logged, not raised: the next run writes the missing files."""
        try:
            while self._trip is not None or self._waiting:
                if self._trip is None:
                    self._trip = self._start()
                await asyncio.shield(self._trip)
        except LedgerError as exc:
            self._report(exc)
