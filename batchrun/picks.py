"""`batchrun copy ... DEST --picked`: the reviewer's picks out of the output dir, with what made them.

Each picked job's verified output files are copied into DEST under their own names, and `picks.csv`
lists one row per picked job: id, prompt, model, take, rating, note and its files. Nothing in DEST is
overwritten with other bytes: a file of the same name that differs is reported and left alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from batchrun import download
from batchrun.errors import UsageError
from batchrun.fsutil import atomic_write
from batchrun.ledger import Ledger
from batchrun.results import sheet_cell

PICKS_NAME = "picks.csv"
PICKS_COLUMNS = ("id", "prompt", "model", "take", "rating", "note", "files")


@dataclass
class Copied:
    jobs: int = 0  # picked jobs
    files: list[str] = field(default_factory=list)  # names now in DEST (copied, or there already identical)
    problems: list[str] = field(default_factory=list)  # what was not copied, and why


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_picked(output_dir: Path, dest: Path) -> Copied:
    """Copy every picked job's outputs and write `DEST/picks.csv`. Raises UsageError if DEST cannot be made."""
    ledger = Ledger.open(output_dir, create=False, readonly=True)
    try:
        rows = [row for row in ledger.all() if row.decision == "picked"]
    finally:
        ledger.close()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot make {dest}: {exc.strerror}") from None
    result = Copied(jobs=len(rows))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(PICKS_COLUMNS)
    for row in rows:
        names = []
        for output in row.outputs:
            source, name = output_dir / output.path, Path(output.path).name
            if not download.verify(source, output.bytes, output.sha256):
                result.problems.append(f"{row.id}: {output.path} is missing or damaged in {output_dir}; not copied "
                                       "(the next run downloads it again)")
                continue
            target = dest / name
            if target.exists() or target.is_symlink():
                if target.is_file() and not target.is_symlink() and _sha256(target) == output.sha256:
                    names.append(name)
                    continue
                result.problems.append(f"{row.id}: {target} exists with other content; left alone, not copied")
                continue
            part = target.with_name(target.name + ".part")
            shutil.copyfile(source, part)
            os.replace(part, target)
            names.append(name)
        result.files.extend(names)
        prompt = row.input.get("prompt")
        writer.writerow([sheet_cell(cell) for cell in (row.id, prompt if isinstance(prompt, str) else "", row.model,
                                                        row.take or 1, row.rating or "", row.note or "",
                                                        " ".join(names))])
    atomic_write(dest / PICKS_NAME, table.getvalue().encode("utf-8"))
    return result
