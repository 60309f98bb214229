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
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_active: list[Read] | None = None  # one load at a time: loading is synchronous and single-threaded


@dataclass(frozen=True, slots=True)
class Read:
    """One file as read: `path` as opened (not resolved), its `stamp` and the SHA-256 of its bytes."""

    path: str
    stamp: tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
    sha256: str


def stamp_of(info: os.stat_result) -> tuple[int, int, int, int, int]:
    """What identifies a file's content without reading it: device, inode, size, mtime and ctime (ns)."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


@contextlib.contextmanager
def recording() -> Iterator[list[Read]]:
    """Collect every file read (see `record`) until the block ends; the list is filled as they are read."""
    global _active
    outer, reads = _active, []
    _active = reads
    try:
        yield reads
    finally:
        _active = outer


def active() -> bool:
    return _active is not None


def record(path: str | os.PathLike, info: os.stat_result, data: bytes) -> None:
    """Note that `data` was read from `path`, whose fstat before the read was `info` (no-op unless recording)."""
    if _active is not None:
        _active.append(Read(os.fspath(path), stamp_of(info), hashlib.sha256(data).hexdigest()))


def read_bytes(path: Path) -> bytes:
    """The bytes of `path`, recorded when recording (for files read without `inputfile.read_regular`)."""
    if _active is None:
        return path.read_bytes()
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        data = handle.read()
    record(path, info, data)
    return data
