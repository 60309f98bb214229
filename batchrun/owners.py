"""Which job owns which file names in an output dir, so that no job ever writes over another's.

A job `x` writes `x.<ext>`, `x-2.<ext>`, `x-3.<ext>`... (one per output) and `x.json`. Two ids share
names when they are equal ignoring case (macOS and Windows disks fold case) or when one is the other
plus `-N` (N >= 2, no leading zero). `manifest` refuses such pairs within one manifest; this module
does the same against the jobs a ledger already holds, which a later manifest may no longer list.
"""

from __future__ import annotations

from collections.abc import Iterable

from batchrun.ledger import JobRow


def output_number(job_id: str) -> tuple[str, int] | None:
    """(`x`, N) when `job_id` is `x-N`, the name of output #N of a job `x`; else None."""
    base, dash, number = job_id.rpartition("-")
    if dash and base and number.isdigit() and number[0] != "0" and int(number) >= 2:
        return base, int(number)
    return None


def owns_files(row: JobRow) -> bool:
    """A job owns its names once it may have been paid for: it was sent, or it has files."""
    return row.submissions > 0 or row.request_id is not None or bool(row.outputs)


class FileOwners:
    """The ledger jobs that own their file names, indexed for `clash` in O(1) per job."""

    def __init__(self, rows: Iterable[JobRow]):
        self._by_folded: dict[str, str] = {}
        self._numbered: dict[str, tuple[str, int]] = {}  # folded base x -> (owner "x-N", N)
        for row in rows:
            self.add(row)

    @classmethod
    def of_ids(cls, job_ids: Iterable[str]) -> FileOwners:
        """From the ids of the jobs that own their names (`Ledger.owner_ids`), oldest first."""
        owners = cls(())
        for job_id in job_ids:
            owners.add_owner(job_id)
        return owners

    def add(self, row: JobRow) -> None:
        """Count one more ledger job (rows may stream past: only the ids of owners are kept)."""
        if owns_files(row):
            self.add_owner(row.id)

    def add_owner(self, job_id: str) -> None:
        """Count one more ledger job known to own its names."""
        self._by_folded[job_id.lower()] = job_id
        numbered = output_number(job_id)
        if numbered is not None:
            self._numbered.setdefault(numbered[0].lower(), (job_id, numbered[1]))

    def clash(self, job_id: str) -> str | None:
        """Why a job `job_id` that owns nothing yet may not run in this output dir, or None."""
        owner = self._by_folded.get(job_id.lower())
        if owner is not None and owner != job_id:
            return (f"its files would be those of job {owner!r} in this output dir on case-insensitive disks "
                    f"({owner}.mp4); give it another id")
        numbered = output_number(job_id)
        if numbered is not None:
            owner = self._by_folded.get(numbered[0].lower())
            if owner is not None and owner != job_id:
                return (f"its video {job_id}.mp4 has the name kept for output #{numbered[1]} of job {owner!r} "
                        f"(a job's further outputs are {owner}-2.mp4, {owner}-3.mp4...), which this output dir's "
                        "ledger holds; give it another id")
        taken = self._numbered.get(job_id.lower())
        if taken is not None and taken[0] != job_id:
            return (f"its output #{taken[1]} would be named {taken[0]}.mp4, which job {taken[0]!r} in this output "
                    "dir's ledger owns; give it another id")
        return None
