"""Fetch one output video: streamed to a .part file, resumed with Range, verified, renamed into place.

`download()` is one attempt. Whatever an earlier attempt, or a process that crashed, left in
`<dest>.part` is resumed with a Range request when the server allows it; the caller owns the retry
loop and calls again after a `DownloadInterrupted`. The final name appears only once the whole file
is on disk and fsynced, so a file under its final name is always complete.

Error messages name the URL's host and path but never its query string: signed storage URLs carry
their signature there.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import hashlib
import math
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import TypeVar

import aiohttp
from yarl import URL

from .crashpoints import crashpoint
from .errors import DiskFull, DownloadError, DownloadInterrupted, DownloadTooLarge, OutputUrlExpired

__all__ = ["Downloaded", "download", "part_path", "verify"]

_EXPIRED = frozenset({403, 404, 410})
# EFBIG too: a filesystem or RLIMIT_FSIZE cap on file size is as fatal to the run as a full disk.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_READ_BLOCK = 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class Downloaded:
    """A complete file under its final name: where it is, its size in bytes, its sha256 (lowercase hex)."""

    path: Path
    bytes: int
    sha256: str


def part_path(dest: Path) -> Path:
    """The file a download of `dest` accumulates in until it is complete: `dest` + ".part"."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def verify(path: Path, expected_bytes: int, expected_sha256: str) -> bool:
    """True when `path` is a regular file (not a symlink) of exactly this size and sha256.

    Reads the file in blocks, so it suits large videos; run it in a thread from async code.
    False when the file is missing, unreadable, of another type, or differs in any way.
    """
    try:
        # O_NONBLOCK so that a FIFO planted at the path cannot hang us; fstat rejects it below.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != expected_bytes:
            return False
        sha = hashlib.sha256()
        size = 0
        while block := os.read(fd, _READ_BLOCK):
            sha.update(block)
            size += len(block)
        return size == expected_bytes and sha.hexdigest() == expected_sha256.lower()
    except OSError:
        return False
    finally:
        os.close(fd)


async def download(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    *,
    max_bytes: int = 2 * 1024**3,
    chunk_size: int = 256 * 1024,
    timeout: float = 300.0,
) -> Downloaded:
    """Download `url` to `dest` in one attempt, resuming `<dest>.part` if an earlier attempt left one.

    `timeout` bounds each HTTP request of the attempt, body included; a timeout keeps the .part, so
    the next attempt continues where this one stopped. `session` must carry no credentials: the
    storage host is not the API (ValueError otherwise).

    Raises:
        DownloadInterrupted: connection lost, timeout, short body, 408/429/5xx; the .part is kept.
            `retry_after` holds the server's Retry-After when it sent one.
        OutputUrlExpired: 403/404/410 from the storage host; the .part is kept for the fresh URL.
        DownloadTooLarge: over `max_bytes` by header or by bytes received; the .part is removed.
        DiskFull: no space (or quota, or file-size limit) while writing; the .part is removed so
            that the ledger and log can still be written.
        DownloadError: anything else, e.g. a symlink or a non-regular file at the .part path, a
            directory at `dest`, an unexpected HTTP status.
    """
    _refuse_credentials(session)
    dest = Path(dest)
    where = _redact(url)
    _check_dest(dest)
    part = await _Part.open(part_path(dest))
    try:
        if part.size > max_bytes:
            part.discard()
            raise DownloadTooLarge(f"{part.path} already holds {part.size} bytes, over the {max_bytes}-byte cap")
        await _fetch(session, url, where, part, max_bytes, chunk_size, timeout)
        return await part.commit(dest)
    except BaseException:
        if part.size == 0:
            # Nothing worth resuming: leave no empty .part behind (e.g. after a 403 on the first try).
            with contextlib.suppress(DownloadError):
                part.discard()
        raise
    finally:
        part.close()


async def _fetch(
    session: aiohttp.ClientSession,
    url: str,
    where: str,
    part: _Part,
    max_bytes: int,
    chunk_size: int,
    timeout: float,
) -> None:
    """Stream the body into `part`, with a Range request if it already holds bytes."""
    ranged = part.size > 0
    while True:
        # identity: Range offsets and Content-Length must count the stored bytes, not a compressed form.
        headers = {"Accept-Encoding": "identity"}
        if ranged:
            headers["Range"] = f"bytes={part.size}-"
        try:
            async with session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout), raise_for_status=False
            ) as resp:
                plan = _plan(resp, part.size if ranged else None, where)
                if plan is None:
                    # The server cannot resume these bytes: start over with a plain request.
                    part.restart()
                    ranged = False
                    continue
                start, total = plan
                if total is not None and total > max_bytes:
                    part.discard()
                    raise DownloadTooLarge(f"{where} is {total} bytes, over the {max_bytes}-byte cap")
                if start != part.size:
                    part.restart()  # a 200 answer to our Range: its body is the whole file
                await _stream(resp, part, total, where, max_bytes, chunk_size)
                return
        except (aiohttp.InvalidURL, aiohttp.TooManyRedirects) as exc:
            raise DownloadError(f"cannot download {where}: {_describe(exc, timeout)}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # `from None`: aiohttp's own exceptions may print the full signed URL.
            raise DownloadInterrupted(
                f"download of {where} interrupted at {part.size} bytes: {_describe(exc, timeout)}"
            ) from None


def _plan(resp: aiohttp.ClientResponse, offset: int | None, where: str) -> tuple[int, int | None] | None:
    """Decide what to do with an answer: (offset its body starts at, expected total size or None).

    `offset` is where our Range started, None when we sent none. Returns None when the answer
    to a Range request cannot continue the .part, so the caller should start over. Raises for
    every status that carries no usable body.
    """
    status = resp.status
    if status in (200, 206):
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadError(f"{where} sent a {encoding}-encoded body although we asked for identity")
    if status == 200:
        return 0, resp.content_length
    if status == 206:
        parsed = _parse_content_range(resp.headers.get("Content-Range"))
        expected_start = offset or 0
        if parsed is None or parsed[0] != expected_start:
            if offset is not None:
                return None
            raise DownloadError(f"{where} answered 206 with an unusable Content-Range to a plain request")
        total = parsed[2]
        if total is None and resp.content_length is not None:
            total = expected_start + resp.content_length
        return expected_start, total
    if status == 416 and offset is not None:
        return None
    if status in _EXPIRED:
        raise OutputUrlExpired(f"{where} answered HTTP {status}: the output URL expired or is not valid")
    if status in (408, 429) or 500 <= status <= 599:
        retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
        raise DownloadInterrupted(f"{where} answered HTTP {status}", retry_after=retry_after)
    raise DownloadError(f"{where} answered HTTP {status}")


async def _stream(
    resp: aiohttp.ClientResponse,
    part: _Part,
    total: int | None,
    where: str,
    max_bytes: int,
    chunk_size: int,
) -> None:
    async for chunk in resp.content.iter_chunked(chunk_size):
        part.write(chunk)
        crashpoint("mid_download")
        if part.size > max_bytes:
            part.discard()
            raise DownloadTooLarge(f"{where} sent more than the {max_bytes}-byte cap")
        if total is not None and part.size > total:
            # Bytes we cannot place: nothing in the .part can be trusted any more.
            part.discard()
            raise DownloadInterrupted(f"{where} sent more than the {total} bytes it announced")
    if total is not None and part.size != total:
        raise DownloadInterrupted(f"download of {where} ended at {part.size} of {total} bytes")


class _Part:
    """The open .part file, with its size and the running sha256 of what it holds."""

    def __init__(self, path: Path, fd: int, size: int, sha: hashlib._Hash):
        self.path = path
        self.fd = fd
        self.size = size
        self.sha = sha

    @classmethod
    async def open(cls, path: Path) -> _Part:
        fd = _open_part(path)
        try:
            size = os.fstat(fd).st_size
            sha = hashlib.sha256()
            if size:
                sha, size = await _with_fd_in_thread(fd, _hash_prefix, size)
            os.lseek(fd, size, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise DownloadError(f"cannot read {path}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, sha)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise self._storage_error(exc, "write") from exc
        self.sha.update(data)
        self.size += len(data)

    def restart(self) -> None:
        try:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
        except OSError as exc:
            raise self._storage_error(exc, "truncate") from exc
        self.size = 0
        self.sha = hashlib.sha256()

    async def commit(self, dest: Path) -> Downloaded:
        """Make the bytes durable, then give them their final name, durably too."""
        try:
            # One trip to a worker thread for the fsyncs and the rename: each trip costs GIL hand-offs.
            await _with_fd_in_thread(self.fd, self._sync_and_rename, dest)
        except OSError as exc:
            raise self._storage_error(exc, "finish") from exc
        self.close()
        return Downloaded(dest, self.size, self.sha.hexdigest())

    def _sync_and_rename(self, fd: int, dest: Path) -> None:
        os.fsync(fd)
        held, named = os.fstat(fd), os.lstat(self.path)
        if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
            raise DownloadError(f"{self.path} was replaced by something else during the download")
        _check_dest(dest)
        os.replace(self.path, dest)
        _fsync_dir(dest.parent)

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DownloadError(f"cannot remove {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _storage_error(self, exc: OSError, doing: str) -> DownloadError:
        if exc.errno in _NO_SPACE:
            # Free the space at once: the ledger and run.log still need to record why we stopped.
            self.discard()
            return DiskFull(f"cannot {doing} {self.path}: {exc.strerror}; the partial file was removed")
        return DownloadError(f"cannot {doing} {self.path}: {exc.strerror}")


def _open_part(path: Path) -> int:
    """Open the .part for writing, creating it if absent; never through a symlink or into a non-file."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)  # less the umask
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise DiskFull(f"cannot create {path}: {exc.strerror}") from exc
        raise DownloadError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        # lstat first: opening a FIFO for writing would block; O_NOFOLLOW still guards the race.
        _require_regular(path, os.lstat(path))
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DownloadError(f"{path} is a symlink; refusing to write through it") from exc
        raise DownloadError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        _require_regular(path, st)
        if st.st_nlink != 1:
            # A hard link would let our writes land in a file somewhere else.
            raise DownloadError(f"{path} has {st.st_nlink} hard links; refusing to write to it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise DownloadError(f"{path} is a symlink; refusing to write through it")
    if not stat.S_ISREG(st.st_mode):
        raise DownloadError(f"{path} exists and is not a regular file; refusing to use it")


def _check_dest(dest: Path) -> None:
    """Refuse a final path that os.replace cannot or should not take over."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DownloadError(f"cannot inspect {dest}: {exc.strerror}") from exc
    # A symlink is fine: os.replace swaps the link itself and never writes through it.
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    raise DownloadError(f"{dest} is {kind}; refusing to replace it with the download")


def _hash_prefix(fd: int, size: int) -> tuple[hashlib._Hash, int]:
    sha = hashlib.sha256()
    done = 0
    while done < size:
        block = os.pread(fd, min(_READ_BLOCK, size - done), done)
        if not block:
            break  # shorter than fstat said: hash what is there and resume from its end
        sha.update(block)
        done += len(block)
    return sha, done


async def _with_fd_in_thread(fd: int, func: Callable[..., T], *args: object) -> T:
    # The thread gets its own duplicate: if we are cancelled meanwhile, the caller closes `fd`
    # while the thread may still be using it, and a reused descriptor number could be another file.
    dup = os.dup(fd)

    def run():
        try:
            return func(dup, *args)
        finally:
            os.close(dup)

    return await asyncio.to_thread(run)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable. Some filesystems cannot fsync a directory; nothing more to do there."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise DownloadError(f"cannot sync directory {directory}: {exc.strerror}") from exc


def _refuse_credentials(session: aiohttp.ClientSession) -> None:
    if session.auth is not None or "Authorization" in session.headers:
        raise ValueError("download() needs a session without Authorization: the storage host is not the API")


def _redact(url: str) -> str:
    """The URL without query, fragment or user info, for messages."""
    try:
        return str(URL(url).with_query(None).with_fragment(None).with_user(None))
    except (TypeError, ValueError):
        return "<invalid URL>"


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):
        return f"timed out after {timeout:g}s"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    # aiohttp messages may quote the request URL: drop anything that looks like a query or user info.
    text = re.sub(r"(?<=\S)\?[^\s'\"<>]+", "", text)
    return re.sub(r"//[^/\s@'\"]+@", "//", text)


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes START-END/TOTAL` as (start, end, total or None for `*`); None when unusable."""
    match = _CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if match is None:
        return None
    start, end = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if end < start or (total is not None and end >= total):
        return None
    return start, end, total


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date); None if absent or bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)  # HTTP dates are GMT
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
