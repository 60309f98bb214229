"""The reads of `status` that SQLite answers in one long step, made on a second read-only connection in a
thread while the main thread streams every job's short tuple and stats its files (batchrun.settled).

They are the file's integrity check, the grouped counts (`Ledger.tally`) and the done jobs whose recorded
`<id>.json` identity no longer matches (`Ledger.identity_mismatches`). Python's sqlite3 lets go of the GIL
while SQLite works, so on a second core they cost no wall time: at 100,000 jobs, 0.7 s of a 2.6 s `status`.

The two connections have a snapshot each. Their answers are used together only when both saw the same
ledger change count (schema 8's triggers count every insert, update and delete of a job, and every change of
an output's identifying fields): the jobs and outputs tables are then the same in both, and so are the
answers. A provenance record written between the two snapshots carries the identity of the fields at that
moment, which are the same in both, so it cannot turn a mismatch into a match. When a run committed in
between (the counts differ), the counts and mismatches are read again on the main connection, in its
snapshot.

Nothing read on either connection is shown before the integrity check has passed: `result` raises the
same LedgerError as opening a damaged ledger does.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from batchrun.errors import LedgerError
from batchrun.ledger import Ledger, unusable


class SideReads:
    """Start with `SideReads(output_dir)`; `result()` waits for them. Only for a ledger of schema 8 or newer
    (a change count): see `usable`."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.changes: int | None = None
        self.tally: list[tuple] = []
        self.mismatches: list[tuple[str, tuple[str, int]]] = []
        self._error: LedgerError | None = None
        self._thread = threading.Thread(target=self._read, name="batchrun-side-reads", daemon=True)
        self._thread.start()

    @staticmethod
    def usable(ledger: Ledger) -> bool:
        """Whether `ledger` counts its changes (schema 8, which also records file stats): else read serially."""
        return ledger.change_count() is not None

    def _read(self) -> None:
        try:
            side = Ledger.open(self.output_dir, create=False, readonly=True, check=False)
        except LedgerError as exc:
            self._error = exc
            return
        try:
            with side.snapshot():
                side.integrity()
                self.changes = side.change_count()
                self.tally = side.tally()
                self.mismatches = side.identity_mismatches()
        except sqlite3.DatabaseError as exc:
            self._error = unusable(side.path, exc)
        except sqlite3.Error as exc:  # e.g. locked for longer than the busy timeout
            self._error = LedgerError(f"{side.path}: cannot read it ({exc})")
        finally:
            side.close()

    def result(self) -> SideReads:
        """Wait for the reads; raises LedgerError when the ledger failed its integrity check or could not be
        read."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self

    def tally_at(self, ledger: Ledger, changes: int | None) -> list[tuple]:
        """The grouped counts as of `ledger`'s snapshot, whose change count is `changes`."""
        self.result()
        return self.tally if changes is not None and changes == self.changes else ledger.tally()

    def mismatches_at(self, ledger: Ledger, changes: int | None) -> list[tuple[str, tuple[str, int]]]:
        """The identity mismatches as of `ledger`'s snapshot, whose change count is `changes`."""
        self.result()
        return self.mismatches if changes is not None and changes == self.changes else ledger.identity_mismatches()
