"""Replace a file with content produced piece by piece, and leave it alone when the content is the same.

For files rebuilt from the ledger at every run (results.jsonl): the new content streams from a
generator, so it is never held whole in memory, and it is compared with the file on disk as it comes.
While they agree nothing is written; at the first difference the bytes that agreed are copied from the
old file into a temporary file and the rest streams there, then the temporary file is renamed over the
old one as `fsutil.atomic_write` does (same temporary name pattern, so `fsutil.remove_stale_temps` finds
one a kill left). An unchanged file keeps its inode, mtime and bytes: a no-op re-run writes nothing, and
tools that watch the file (rsync, backups, `make`) see no change.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from batchrun.fsutil import fsync_dir, replace_with

_BLOCK = 1024 * 1024


def open_old(path: Path) -> BinaryIO | None:
    """The current file for reading; None when there is none to compare with (missing, a symlink, not a
    regular file: then it is replaced whatever it holds)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb", buffering=_BLOCK)


def write_if_changed(path: Path, chunks: Iterable[bytes], mode: int = 0o666, *, durable: bool = True,
                     before_rename: Callable[[], None] | None = None) -> bool:
    """Make `path` hold the concatenation of `chunks`; True when it was (re)written, False when it already
    held exactly those bytes (then nothing is written and `before_rename` is not called).

    `mode`, `durable` and `before_rename` as in `fsutil.atomic_write`. Raises OSError when the file
    cannot be written; the old file is then untouched and no temporary file is left."""
    old = open_old(path)
    tmp: Path | None = None
    out: BinaryIO | None = None
    agreed = 0  # bytes of the old file that match the new content so far (while `out` is None)
    try:
        for chunk in chunks:
            if out is None and old is not None:
                if old.read(len(chunk)) == chunk:
                    agreed += len(chunk)
                    continue
            if out is None:
                tmp, out = _start(path, mode, old, agreed)
            out.write(chunk)
        if out is None:
            if old is not None and old.read(1) == b"":
                return False  # same bytes, same length
            tmp, out = _start(path, mode, old, agreed)  # the old file is longer: cut it here
        out.flush()
        if durable:
            os.fsync(out.fileno())
        out.close()
        out = None
        if before_rename is not None:
            before_rename()
        replace_with(tmp, path)
        tmp = None
    finally:
        if old is not None:
            old.close()
        if out is not None:
            out.close()
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    if durable:
        fsync_dir(path.parent)
    return True


def _start(path: Path, mode: int, old: BinaryIO | None, agreed: int) -> tuple[Path, BinaryIO]:
    """A new temporary file beside `path` holding the first `agreed` bytes of `old`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    out = os.fdopen(fd, "wb", buffering=_BLOCK)
    try:
        if agreed:
            old.seek(0)
            left = agreed
            while left:
                block = old.read(min(_BLOCK, left))
                if not block:
                    raise OSError(f"{path} shrank while it was being compared")
                out.write(block)
                left -= len(block)
    except BaseException:
        out.close()
        os.unlink(tmp)
        raise
    return tmp, out
