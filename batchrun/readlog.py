"""A record of the files one manifest load reads, so a cached result can be stamped with all of them.

`inputfile.read_regular` (the manifest, its `jobs_from:` file, local images) and the user folder's model
files report each read here while a `recording()` is open: the path as it was opened, the file's identity
and times from fstat on the open descriptor (taken *before* its bytes were read) and the SHA-256 of the
bytes read. A file written to after its fstat changes its ctime (a time no user call can set back), so a
later stat equal to the recorded one means the bytes are still the ones the load read.

Outside a `recording()` nothing is kept and reading costs nothing more.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Per thread (and task): a load in one thread never records, or stops recording, another's reads.
_active: contextvars.ContextVar[list[Read] | None] = contextvars.ContextVar("batchrun_readlog", default=None)


@dataclass(frozen=True, slots=True)
class Read:
    """One file as read: `path` as opened (not resolved), its `stamp`, the SHA-256 of its bytes and when
    it was read (`time.time_ns()`: a file changed just before may share its ctime with a later change)."""

    path: str
    stamp: tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
    sha256: str
    read_at_ns: int


def stamp_of(info: os.stat_result) -> tuple[int, int, int, int, int]:
    """What identifies a file's content without reading it: device, inode, size, mtime and ctime (ns)."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


@contextlib.contextmanager
def recording() -> Iterator[list[Read]]:
    """Collect every file read (see `record`) until the block ends; the list is filled as they are read."""
    reads: list[Read] = []
    token = _active.set(reads)
    try:
        yield reads
    finally:
        _active.reset(token)


def record(path: str | os.PathLike, info: os.stat_result, data: bytes) -> None:
    """Note that `data` was read from `path`, whose fstat before the read was `info` (no-op unless recording)."""
    reads = _active.get()
    if reads is not None:
        reads.append(Read(os.fspath(path), stamp_of(info), hashlib.sha256(data).hexdigest(), time.time_ns()))


def read_bytes(path: Path) -> bytes:
    """The bytes of `path`, recorded when recording (for files read without `inputfile.read_regular`)."""
    if _active.get() is None:
        return path.read_bytes()
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        data = handle.read()
    record(path, info, data)
    return data
