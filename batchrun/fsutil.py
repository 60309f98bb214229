"""Small file-system helpers for the files batchrun writes in an output directory.

Two rules hold for every one of them: nothing is ever written through a symbolic link (a link planted
as `run.log` must not turn our appends into writes to `~/.bashrc`), and new files get the user's umask.
A file is either appended to through `open_append` (O_NOFOLLOW: a link is refused) or replaced whole by
`atomic_write` (a rename: a link at the name is replaced by the file, never written through).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from batchrun.errors import UsageError

log = logging.getLogger("batchrun")

# `.<name>.<pid>.<random>.tmp`, as `atomic_write` names its temporary files; the PID is absent in
# those of batchrun 0.1. Only names batchrun rewrites are matched, so no file of the user's is touched.
_TEMP_NAME = re.compile(r"\.(?:results\.jsonl|report\.html|[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.json)"
                        r"\.(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp")


class UnsafeFile(UsageError):
    """A file batchrun would write is a symlink, has other hard links, or is not a regular file."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_append(path: Path, mode: int = 0o666, *, _unshared: bool = False) -> int:
    """An fd appending to `path` (created with `mode` less the umask), never through a symlink.

    A file with other hard links (a backup tool's snapshot, or a planted link to a file elsewhere) is
    first replaced by a copy of its own, so our lines never land under another name. Raises UnsafeFile
    for a symlink or a FIFO or device (opened without blocking, then refused); OSError otherwise."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path} is a symbolic link; batchrun never writes through a link in the output "
                             "directory. Remove the link and run again") from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader
            raise UnsafeFile(f"{path} is not a regular file; refusing to write to it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{path} is not a regular file; refusing to write to it")
        if st.st_nlink != 1 and not _unshared:
            size = st.st_size
            copy = os.pread(fd, size, 0)
            os.close(fd)
            fd = -1
            atomic_write(path, copy, mode, durable=False)
            log.warning("%s had %d hard links; it now has a copy of its own (the other names keep theirs)",
                        path, st.st_nlink)
            return open_append(path, mode, _unshared=True)
        if st.st_nlink != 1:
            raise UnsafeFile(f"{path} keeps getting other hard links; refusing to write to it")
        os.set_blocking(fd, True)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


def replace_with(tmp: Path | str, path: Path | str) -> None:
    """Give the finished temporary file `tmp` the name `path` (atomically). A symlink at `path` is replaced
    by the file, not written through, and a warning says so."""
    if os.path.islink(path):
        log.warning("%s was a symbolic link; replaced it with the file itself (nothing was written through "
                    "the link)", path)
    os.replace(tmp, path)


def own_folder(path: Path) -> Path:
    """`path` as a folder batchrun may write into: made when missing. Raises NotADirectoryError when a
    symbolic link (to a folder or not) or anything but a directory is there: writing through a link
    planted in the output dir would write wherever it points."""
    try:
        path.mkdir()
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "a symbolic link or not a folder; batchrun never writes "
                                     "through a link in the output directory (remove it)", str(path)) from None
    return path


def atomic_write(path: Path, data: bytes | Sequence[bytes], mode: int = 0o666, *, durable: bool = True,
                 before_rename: Callable[[], None] | None = None) -> None:
    """Replace `path` with `data` (bytes, or parts written one after the other, to spare a caller joining
    large ones) so that readers see either the old file or the whole new one.

    The new file has `mode` less the user's umask (the temporary file is created with it: no chmod,
    so a umask of 077 gives 0600). A symlink at `path` is replaced by the file, not written through,
    and a warning says so. `durable=False` skips the fsyncs, for files that can be rebuilt from the
    ledger. A temporary file left by a kill is removed by `remove_stale_temps`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, (bytes, bytearray, memoryview)):
                handle.write(data)
            else:
                handle.writelines(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        replace_with(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> list[str]:
    """Remove the temporary files `atomic_write` left in `directory` when a process was killed mid-write.

    A temp is stale when the process named in it is gone, or is this one (PIDs repeat, in containers
    especially, and this process writes none before it calls this). Call it holding the run lock.
    Returns the names removed."""
    from batchrun.lock import live_pid

    removed = []
    me = os.getpid()
    # Names only (no DirEntry per file), and every temp name starts with a dot: the other 200,000 names of a
    # big output dir cost one startswith each.
    for name in os.listdir(directory):
        match = _TEMP_NAME.fullmatch(name) if name.startswith(".") else None
        if match is None:
            continue
        path = os.path.join(directory, name)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except FileNotFoundError:
            continue
        pid = live_pid(match["pid"] or "")
        if pid is not None and pid != me:
            continue  # e.g. `batchrun report` writing its page right now
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed
