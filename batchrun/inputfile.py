"""Reading the files a manifest brings in (the manifest itself, its `jobs_from:` file, local images):
regular files only.

A path may be a symlink, but what it leads to must be a regular file holding the bytes its size says:

- a named pipe (FIFO), a device, a socket or a folder is refused without reading it. The kind is checked
  before opening (so a device is never opened) and again on the open descriptor with fstat (so a path
  swapped in between changes nothing); the open uses O_NONBLOCK, so a FIFO swapped in never blocks.
- kernel pseudo-files stat as regular files but are views of live state: ``/proc/self/environ`` holds
  the environment, the API token included. Files that live under /proc or /sys are refused by where
  the open descriptor points, and on any file system a file whose bytes do not match its stated size
  is refused (procfs states 0 bytes, sysfs 4,096), which also catches a file changing while it is read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from batchrun import readlog

_PSEUDO_ROOTS = ("/proc", "/sys")
_CHUNK = 1 << 20


class NotARegularFile(Exception):
    """The path is not a regular file's; `str()` is a predicate such as "is a named pipe (FIFO), ...".

    `folder` is True when it is a folder, which callers usually name in their own terms.
    """

    def __init__(self, message: str, *, folder: bool = False):
        super().__init__(message)
        self.folder = folder


def _kind(mode: int) -> str | None:
    """What a non-regular file is, as a predicate; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    return "is not a regular file"


def _opened_path(fd: int, path: Path) -> str:
    """Where the open descriptor really points (Linux names it in /proc/self/fd), else the resolved path."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _under_pseudo_root(real: str) -> bool:
    return any(real == root or real.startswith(root + "/") for root in _PSEUDO_ROOTS)


def read_regular(path: Path | str, max_bytes: int) -> tuple[bytes, int]:
    """The bytes of the regular file at `path` (following symlinks) and its size from fstat.

    At most `max_bytes` + 1 bytes are read, so a caller sees that a file is over its cap (`len(data) >
    max_bytes`, with the real size in the second value) without reading it all.

    Raises NotARegularFile for anything but a regular file of a real file system, and OSError
    (FileNotFoundError, PermissionError, ...) when it cannot be opened or read.
    """
    mode = os.stat(path).st_mode
    kind = _kind(mode)
    if kind:
        raise NotARegularFile(kind, folder=stat.S_ISDIR(mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise NotARegularFile("is a folder, not a file", folder=True) from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket, or a FIFO with no reader, swapped in after the stat
            raise NotARegularFile("is not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        kind = _kind(info.st_mode)
        if kind:
            raise NotARegularFile(kind, folder=stat.S_ISDIR(info.st_mode))
        if _under_pseudo_root(_opened_path(fd, Path(path))):
            raise NotARegularFile("is a kernel pseudo-file (under /proc or /sys), not a regular file")
        size = info.st_size
        want = min(size, max_bytes) + 1
        chunks, total = [], 0
        while total < want:
            chunk = os.read(fd, min(_CHUNK, want - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if size == 0 and total:
        raise NotARegularFile("is a pseudo-file (its size says 0 bytes but it yields some), not a regular file")
    if total != min(size, max_bytes + 1):
        raise NotARegularFile(f"changed while it was read ({size:,} bytes stated, {total:,} read), or is a "
                              "pseudo-file; if it is a real file, try again")
    data = b"".join(chunks)
    readlog.record(path, info, data)  # for the validated-manifest cache (batchrun.manifestcache)
    return data, size
