"""One run per output directory: an OS lock on a file beside the ledger.

`fcntl.flock` dies with its process, so a run killed with SIGKILL never blocks the next one. The
lock is on `run.lock`, never on the SQLite file itself (SQLite's own locking must not be disturbed).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from batchrun.errors import OutputDirLocked, UsageError

LOCK_NAME = "run.lock"


class OutputDirLock:
    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot write in the output directory {self.path.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise OutputDirLocked(str(self.path.parent), int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
