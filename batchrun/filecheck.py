"""Whether a done job's output files are still what was downloaded: by a stat when possible, by a hash when not.

A run records each output's size, sha256, and the mtime (ns) and inode `os.stat` saw once the file was
under its final name (`download.Downloaded`, ledger schema 7). Checking a done file then costs one
`lstat`: a regular file with the recorded size, mtime and inode is taken as intact without reading it.
Anything else is hashed in full (`download.verify`): intact after all (copied back from a backup, the
output dir moved to another disk, `touch`ed) and its new stat is returned to be recorded; or missing or
damaged, as before. A file whose stat was never recorded (a ledger from before schema 7) is hashed once,
and its stat recorded by the run that hashed it.

The limit of the fast path: an edit that keeps the size and inode and puts the mtime back (`os.utime`,
`touch -r`, some sync tools) is not seen; `full=True` (`--verify` on `run` and `status`) hashes every
file whatever its stat says.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from batchrun.ledger import Output

# (output idx, mtime_ns, inode) of a file hashed and found intact whose recorded stat was absent or stale.
Restat = tuple[int, int, int]


def _stat_matches(path: str, output: Output) -> bool:
    if output.mtime_ns is None or output.inode is None:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISREG(st.st_mode) and st.st_size == output.bytes and st.st_mtime_ns == output.mtime_ns
            and st.st_ino == output.inode)


def check_file(output_dir: Path | str, output: Output, kind: str | None = None, *,
               full: bool = False) -> tuple[bool, Restat | None]:
    """(intact, what to record): whether the output file is on disk as recorded, and, when it was hashed
    and found intact while its recorded stat was absent or differs, its (idx, mtime_ns, inode) to record.
    `kind` as in `download.verify` (checked only when the file is hashed)."""
    path = os.path.join(output_dir, output.path)  # a str: pathlib's joins cost more than the lstat
    if not full and _stat_matches(path, output):
        return True, None
    # Imported here: download brings aiohttp, which `status` and `plan` need only when a file is hashed.
    from batchrun import download

    if not download.verify(path, output.bytes, output.sha256, kind):
        return False, None
    try:
        st = os.lstat(path)
    except OSError:
        return True, None
    if (st.st_mtime_ns, st.st_ino) == (output.mtime_ns, output.inode):
        return True, None
    return True, (output.idx, st.st_mtime_ns, st.st_ino)


def check_outputs(output_dir: Path | str, outputs: Iterable[Output], kind: str | None = None, *,
                  full: bool = False) -> tuple[bool, list[Restat]]:
    """(all intact, stats to record) for a done job's outputs; False for a job with no outputs. Stops at
    the first file that is not intact."""
    restats: list[Restat] = []
    found = False
    for output in outputs:
        found = True
        intact, restat = check_file(output_dir, output, kind, full=full)
        if not intact:
            return False, restats
        if restat is not None:
            restats.append(restat)
    return found, restats
