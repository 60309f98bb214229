"""One run per output directory: an OS lock on a file beside the ledger.

`fcntl.flock` dies with its process, so a run killed with SIGKILL never blocks the next one. The
lock is on `run.lock`, never on the SQLite file itself (SQLite's own locking must not be disturbed).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from batchrun.errors import OutputDirLocked, UsageError

LOCK_NAME = "run.lock"


_PID_WIDTH = 20


def _read_holder(fd: int, wait: float = 2.0, step: float = 0.01) -> int | None:
    """The holder's PID. A run that won the lock a moment ago may not have written it yet (the file is
    empty, or still names an earlier run that has exited), so wait a little for a live one."""
    deadline = time.monotonic() + wait
    while True:
        pid = live_pid(os.pread(fd, _PID_WIDTH + 1, 0).decode("ascii", "replace"))
        if pid is not None or time.monotonic() >= deadline:
            return pid
        time.sleep(step)


def live_pid(text: str) -> int | None:
    """The PID a run.lock's text names, if that process is alive."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        return None
    try:
        os.kill(int(text), 0)
    except PermissionError:
        pass  # someone else's process: alive
    except (ProcessLookupError, OverflowError):
        return None
    return int(text)


class OutputDirLock:
    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{self.path} is a symbolic link; batchrun never writes through a link in the "
                                 "output directory. Remove the link and run again") from None
            raise UsageError(f"cannot write in the output directory {self.path.parent}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirLocked(str(self.path.parent), holder) from None
        # Fixed width, written in place: the file is never empty or half-written for a racing reader.
        os.pwrite(fd, f"{os.getpid():<{_PID_WIDTH}}\n".encode(), 0)
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
