"""Fetch one output video: streamed to a .part file, resumed with Range, verified, renamed into place.

`download()` is one attempt. Whatever an earlier attempt, or a process that crashed, left in
`<dest>.part` is resumed with a Range request only when the server allows it and the file is still the
same one: the first answer's validator (a strong ETag, else Last-Modified) is kept beside the .part in
`<dest>.part.meta` and sent as `If-Range`. The caller owns the retry loop and calls again after a
`DownloadInterrupted`. The final name appears only once the whole file is on disk, fsynced, and its
first bytes are the container signature of the media kind expected (`batchrun.media`), so a file under
its final name is always complete and never an error page.

Finished files are made durable in batches (`_Durability`): the downloads of one event loop that finish
while a batch is being settled go together in the next one, one worker-thread trip that fsyncs each file,
renames it into place and fsyncs each directory once. `download()` returns only after its own file's
trip has ended, so a caller that records the file as done records a durable file.

A body sent with a Content-Encoding (gzip, deflate) although we asked for identity is decoded as it
streams (`batchrun.contentcoding`) and complete only once the encoded stream's end is read; such a body
cannot be resumed (a Range counts encoded bytes), so its next attempt starts over.

Error messages name the URL's host and path but never its query string: signed storage URLs carry
their signature there.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import hashlib
import json
import math
import os
import re
import stat
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from . import media
from .contentcoding import BodyDecoder, decoder_for
from .crashpoints import crashpoint
from .errors import (
    DiskFull,
    DownloadError,
    DownloadInterrupted,
    DownloadTooLarge,
    OutputNotMedia,
    OutputUrlExpired,
    OutputUrlRefused,
)
from .outputhosts import HostPolicy, refusal_of

__all__ = ["MAX_REDIRECTS", "Downloaded", "download", "meta_path", "part_path", "verify"]

MAX_REDIRECTS = 5
# A .part up to this size has no .meta written unless its attempt ends early (see `_Part.remember`):
# downloading it again costs less than recording its validator for every download.
RESUME_AFTER_BYTES = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_EXPIRED = frozenset({403, 404, 410})
# EFBIG too: a filesystem or RLIMIT_FSIZE cap on file size is as fatal to the run as a full disk.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_READ_BLOCK = 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class Downloaded:
    """A complete file under its final name: where it is, its size in bytes, its sha256 (lowercase hex), and
    its mtime (ns) and inode as `os.fstat` saw it once renamed into place (what batchrun.filecheck compares
    a done file with before it would hash it again)."""

    path: Path
    bytes: int
    sha256: str
    mtime_ns: int | None = field(default=None, compare=False)
    inode: int | None = field(default=None, compare=False)


def part_path(dest: Path) -> Path:
    """The file a download of `dest` accumulates in until it is complete: `dest` + ".part"."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def meta_path(dest: Path) -> Path:
    """Where the validator of `<dest>.part` is kept: `dest` + ".part.meta" (small JSON)."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part.meta")


def verify(path: Path, expected_bytes: int, expected_sha256: str, kind: str | None = None) -> bool:
    """True when `path` is a regular file (not a symlink) of exactly this size and sha256 whose first
    bytes are the container signature of media of `kind` ("video", "image", "audio"; None: any of them).

    Reads the file in blocks, so it suits large videos; run it in a thread from async code.
    False when the file is missing, unreadable, of another type, not media (an error page accepted by
    an older batchrun), or differs in any way.
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
            if size == 0 and not media.accepts(kind, block[: media.HEAD_BYTES]):
                return False
            sha.update(block)
            size += len(block)
        return 0 < size == expected_bytes and sha.hexdigest() == expected_sha256.lower()
    except OSError:
        return False
    finally:
        os.close(fd)


async def download(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    *,
    kind: str | None = None,
    hosts: HostPolicy | None = None,
    max_bytes: int = 2 * 1024**3,
    chunk_size: int = 256 * 1024,
    timeout: float = 300.0,
) -> Downloaded:
    """Download `url` to `dest` in one attempt, resuming `<dest>.part` if an earlier attempt left one.

    `kind` is the media the output must be ("video", "image", "audio"; None: any of them), judged from the
    bytes, not from Content-Type. A file already at `dest` that is not such media (an error page saved by
    an older batchrun) is removed first, so nothing broken stays under the final name. `hosts`, when given,
    is checked on the URL and on each of at most MAX_REDIRECTS redirects, and `session` must be one made by
    `hosts.session()` (its resolver checks names). `timeout` bounds each HTTP request of the attempt, body
    included; a timeout keeps the .part, so the next attempt continues where this one stopped. `session`
    must carry no credentials: the storage host is not the API (ValueError otherwise).

    Raises:
        DownloadInterrupted: connection lost, timeout, short body, 408/429/5xx; the .part is kept.
            `retry_after` holds the server's Retry-After when it sent one.
        OutputUrlExpired: 403/404/410 from the storage host; the .part is kept for the fresh URL.
        OutputNotMedia (an OutputUrlExpired): the body is not media of `kind` (an HTML "link expired" page,
            JSON, an empty or cut header...); nothing is kept, the message says what was received.
        OutputUrlRefused: the URL or a redirect points at an address `hosts` refuses, or is not http(s).
        DownloadTooLarge: over `max_bytes` by header or by bytes received; the .part is removed.
        DiskFull: no space (or quota, or file-size limit) while writing; the .part is removed so
            that the ledger and log can still be written.
        DownloadError: anything else, e.g. a symlink or a non-regular file at the .part path, a
            directory at `dest`, an unexpected HTTP status, too many redirects, an undecodable body.
    """
    _refuse_credentials(session)
    if hosts is not None and not hosts.applies_to(session):
        raise ValueError("download() with `hosts` needs a session made by hosts.session(): names are checked there")
    dest = Path(dest)
    where = _redact(url)
    if _check_dest(dest):
        _drop_non_media(dest, kind)
    part = await _Part.open(part_path(dest))
    try:
        if part.size > max_bytes:
            part.discard()
            raise DownloadTooLarge(f"{part.path} already holds {part.size} bytes, over the {max_bytes}-byte cap")
        await _fetch(session, url, where, part, _Limits(kind, hosts, max_bytes, chunk_size, timeout))
        return await part.commit(dest)
    except BaseException:
        if part.size == 0:
            # Nothing worth resuming: leave no empty .part behind (e.g. after a 403 on the first try).
            with contextlib.suppress(DownloadError):
                part.discard()
        elif part.foreign:
            # Left as found, but without our validator: it would vouch for another file's bytes, and the next
            # attempt would resume from them (a planted prefix recorded as the video).
            with contextlib.suppress(OSError):
                os.unlink(part.meta)
        elif not part.discarded:
            # The bytes kept are resumed by the next attempt: it needs their validator on disk. Without
            # it (a full disk), that attempt starts over, which costs a download, never a payment.
            with contextlib.suppress(DownloadError):
                part.keep_validator()
        raise
    finally:
        part.close()


@dataclass(frozen=True)
class _Limits:
    kind: str | None
    hosts: HostPolicy | None
    max_bytes: int
    chunk_size: int
    timeout: float


async def _fetch(session: aiohttp.ClientSession, url: str, where: str, part: _Part, limits: _Limits) -> None:
    """Stream the body into `part`, with a Range request if it holds bytes of a file we can name (If-Range)."""
    ranged = part.size > 0 and part.if_range is not None
    while True:
        # identity: Range offsets and Content-Length must count the stored bytes, not a compressed form.
        headers = {"Accept-Encoding": "identity"}
        if ranged:
            headers["Range"] = f"bytes={part.size}-"
            headers["If-Range"] = part.if_range
        try:
            async with _follow(session, url, where, headers, limits) as resp:
                plan = _plan(resp, part, part.size if ranged else None, where)
                if plan is None:
                    # The server cannot resume these bytes (or they belong to another file): start over.
                    part.restart()
                    ranged = False
                    continue
                start, total, encoding = plan
                if total is not None and total > limits.max_bytes:
                    part.discard()
                    raise DownloadTooLarge(f"{where} is {total} bytes, over the {limits.max_bytes}-byte cap")
                if start != part.size:
                    part.restart()  # a 200 answer (to our Range, or to a plain request): the whole file
                if start == 0:
                    # Before any byte of this body lands: the validator a later attempt resumes against.
                    part.remember(None if encoding else _validator(resp.headers), total)
                await _stream(resp, part, total, decoder_for(encoding, where), where, limits)
                return
        except (aiohttp.InvalidURL, aiohttp.TooManyRedirects) as exc:
            raise DownloadError(f"cannot download {where}: {_describe(exc, limits.timeout)}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            refused = refusal_of(exc)
            if refused is not None:
                raise OutputUrlRefused(f"{where}: {refused}; refused because the API is not on a private "
                                       "network") from None
            # `from None`: aiohttp's own exceptions may print the full signed URL.
            raise DownloadInterrupted(
                f"download of {where} interrupted at {part.size} bytes: {_describe(exc, limits.timeout)}"
            ) from None


@contextlib.asynccontextmanager
async def _follow(session: aiohttp.ClientSession, url: str, where: str, headers: dict[str, str],
                  limits: _Limits) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET `url`, following at most MAX_REDIRECTS redirects ourselves so that `limits.hosts` checks each hop."""
    target = URL(url)
    for hop in range(MAX_REDIRECTS + 1):
        if limits.hosts is not None:
            limits.hosts.check_url(target, f"{where} (redirected to {_redact(str(target))})" if hop else where)
        resp = await session.get(target, headers=headers, allow_redirects=False, auto_decompress=False,
                                 timeout=aiohttp.ClientTimeout(total=limits.timeout), raise_for_status=False)
        location = resp.headers.get("Location") if resp.status in _REDIRECTS else None
        if location is None:
            try:
                yield resp
            finally:
                resp.release()
            return
        resp.release()
        try:
            target = target.join(URL(location))
        except (TypeError, ValueError):
            shown = location if len(location) <= 200 else location[:197] + "..."
            raise DownloadError(f"{where} redirected to an unusable Location {shown!r}") from None
    raise DownloadError(f"{where} redirected more than {MAX_REDIRECTS} times")


def _plan(resp: aiohttp.ClientResponse, part: _Part, offset: int | None,
          where: str) -> tuple[int, int | None, str | None] | None:
    """Decide what to do with an answer: (offset its body starts at, expected total size or None, its
    Content-Encoding or None for identity).

    `offset` is where our Range started, None when we sent none. Returns None when the answer to a
    Range request cannot continue the .part (another offset, another file, an encoded range), so the
    caller should start over. Raises for every status that carries no usable body.
    """
    status = resp.status
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    encoding = None if encoding in ("", "identity") else encoding
    if status == 200:
        return 0, None if encoding else resp.content_length, encoding
    if status == 206:
        parsed = _parse_content_range(resp.headers.get("Content-Range"))
        expected_start = offset or 0
        if offset is not None and (encoding or not part.same_file(resp.headers, parsed)):
            return None
        if parsed is None or parsed[0] != expected_start:
            if offset is not None:
                return None
            raise DownloadError(f"{where} answered 206 with an unusable Content-Range to a plain request")
        total = parsed[2]
        if encoding:
            total = None  # the range counts encoded bytes; the decoder says when the body is whole
        elif total is None and resp.content_length is not None:
            total = expected_start + resp.content_length
        return expected_start, total, encoding
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
    decoder: BodyDecoder | None,
    where: str,
    limits: _Limits,
) -> None:
    checked = part.size >= media.HEAD_BYTES  # a resumed part's head was checked when it was written
    async for raw in resp.content.iter_chunked(limits.chunk_size):
        for chunk in decoder.feed(raw) if decoder else (raw,):
            part.write(chunk)
            crashpoint("mid_download")
            if part.size > limits.max_bytes:
                part.discard()
                raise DownloadTooLarge(f"{where} sent more than the {limits.max_bytes}-byte cap")
            if total is not None and part.size > total:
                # Bytes we cannot place: nothing in the .part can be trusted any more.
                part.discard()
                raise DownloadInterrupted(f"{where} sent more than the {total} bytes it announced")
            if not checked and part.size >= media.HEAD_BYTES:
                checked = True  # early, so a large page that is not media is not downloaded whole
                _check_media(part, resp, total, where, limits.kind)
    if decoder is not None and not decoder.finished:
        # The framing said the body was whole, but the encoded stream did not end: cut short.
        part.restart()
        raise DownloadInterrupted(f"download of {where} ended before the end of its {decoder.encoding} stream")
    if total is not None and part.size != total:
        raise DownloadInterrupted(f"download of {where} ended at {part.size} of {total} bytes")
    _check_media(part, resp, total, where, limits.kind)
    if total is None:
        # No length was given: the body ended where the connection closed, which may be early. An mp4's
        # own box sizes say where it ends.
        fd = os.open(part.path, os.O_RDONLY | os.O_NOFOLLOW)  # the .part's own fd is write-only
        try:
            end = media.declared_end(lambda offset, n: os.pread(fd, n, offset), part.size)
        finally:
            os.close(fd)
        if end is not None and end > part.size:
            raise DownloadInterrupted(f"download of {where} ended at {part.size} bytes, without a length; the "
                                      f"file's own structure says {end}")


_KIND_NAMES = {"video": "a video", "image": "an image", "audio": "an audio file"}


def _check_media(part: _Part, resp: aiohttp.ClientResponse, total: int | None, where: str,
                 kind: str | None) -> None:
    if media.accepts(kind, part.head):
        return
    size = total if total is not None else part.size
    what = media.describe(part.head, size, resp.headers.get("Content-Type"))
    part.discard()
    raise OutputNotMedia(f"{where} sent {what} instead of {_KIND_NAMES.get(kind or '', 'a media file')}")


def _validator(headers: Any) -> str | None:
    """What If-Range can name this file by: a strong ETag, else a Last-Modified date; None without one."""
    etag = (headers.get("ETag") or "").strip()
    if etag.startswith('"') and etag.endswith('"') and len(etag) >= 2 and len(etag) <= 1024:
        return etag
    modified = (headers.get("Last-Modified") or "").strip()
    try:
        if modified and len(modified) <= 64 and email.utils.parsedate_to_datetime(modified) is not None:
            return modified
    except (TypeError, ValueError):
        pass
    return None


def _drop_non_media(dest: Path, kind: str | None) -> None:
    """Remove a regular file at `dest` that is not media of `kind`: not a result, only in the way."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # gone since, or unreadable: commit decides
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or media.accepts(kind, os.pread(fd, media.HEAD_BYTES, 0)):
            return
    except OSError:
        return
    finally:
        os.close(fd)
    try:
        os.unlink(dest)
    except OSError as exc:
        raise DownloadError(f"cannot remove {dest}, which is not a media file: {exc.strerror}") from exc


class _Part:
    """The open .part file, with its size, the running sha256 and the first bytes of what it holds, and
    the validator (If-Range value) and total size of the file those bytes came from, kept in its .meta."""

    def __init__(self, path: Path, fd: int, size: int, sha: hashlib._Hash, head: bytes = b"",
                 if_range: str | None = None, total: int | None = None):
        self.path = path
        self.meta = path.with_name(path.name + ".meta")
        self.fd = fd
        self.size = size
        self.sha = sha
        self.head = head
        self.if_range = if_range
        self.total = total
        self.meta_pending = False  # a validator held in memory, not yet in .meta (see `remember`)
        self.discarded = False  # removed (`discard`): nothing left to resume
        self.written: tuple[int, int] | None = None  # (st_dev, st_ino) of the file written, set by `commit`
        self.foreign = False  # the .part path was found to hold another file: nothing there is ours to resume

    @classmethod
    async def open(cls, path: Path) -> _Part:
        fd, created = _open_part(path)
        if created:  # empty, at offset 0: nothing to read back
            return cls(path, fd, 0, hashlib.sha256())
        try:
            size = os.fstat(fd).st_size
            sha, head = hashlib.sha256(), b""
            if size:
                sha, size = await _with_fd_in_thread(fd, _hash_prefix, size)
                head = os.pread(fd, min(size, media.HEAD_BYTES), 0)
            os.lseek(fd, size, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise DownloadError(f"cannot read {path}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        part = cls(path, fd, size, sha, head)
        if size:
            part.if_range, part.total = _read_meta(part.meta)
        return part

    def same_file(self, headers: Any, content_range: tuple[int, int, int | None] | None) -> bool:
        """Whether a 206 answer is a range of the file the .part holds: its ETag (or Last-Modified) and its
        total size, where it states them, match what the first answer said. Servers that ignore If-Range
        are caught here."""
        validator = self.if_range or ""
        if validator.startswith('"'):
            sent = (headers.get("ETag") or "").strip()
            if sent and sent != validator:
                return False
        else:
            sent = (headers.get("Last-Modified") or "").strip()
            if sent and sent != validator:
                return False
        total = content_range[2] if content_range else None
        return self.total is None or total is None or total == self.total

    def remember(self, if_range: str | None, total: int | None) -> None:
        """Record what later attempts resume against; None forgets it (they start over).

        Called before any byte of the body lands. The .meta file is written only once the .part is about
        to hold more than `RESUME_AFTER_BYTES`, or when the attempt ends with bytes kept (`keep_validator`):
        most outputs arrive whole in one go, and a process killed before either point leaves a small
        .part without .meta, which the next attempt simply downloads again from the start."""
        self.if_range, self.total = if_range, total
        self.meta_pending = False
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.meta)  # never a validator of other bytes beside the ones about to come
        except OSError as exc:
            raise self._storage_error(exc, "record the validator of") from exc
        self.meta_pending = if_range is not None

    def keep_validator(self) -> None:
        """Write the .meta now if it is still pending (the bytes received so far are worth resuming)."""
        if self.meta_pending:
            self._write_meta()

    def _write_meta(self) -> None:
        self.meta_pending = False
        try:
            fd = os.open(self.meta, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, json.dumps({"if_range": self.if_range, "total": self.total}).encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._storage_error(exc, "record the validator of") from exc

    def write(self, data: bytes) -> None:
        if self.meta_pending and self.size + len(data) > RESUME_AFTER_BYTES:
            self._write_meta()  # before these bytes: a .part this large always has its validator on disk
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise self._storage_error(exc, "write") from exc
        self.sha.update(data)
        if len(self.head) < media.HEAD_BYTES:
            self.head += data[: media.HEAD_BYTES - len(self.head)]
        self.size += len(data)

    def restart(self) -> None:
        try:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
        except OSError as exc:
            raise self._storage_error(exc, "truncate") from exc
        self.size = 0
        self.sha = hashlib.sha256()
        self.head = b""
        self.remember(None, None)

    async def commit(self, dest: Path) -> Downloaded:
        """Make the bytes durable, then give them their final name, durably too (in a batch with the other
        downloads finishing now: see `_Durability`).

        The fd's stat is taken here, on the loop's thread, once the last byte is written: the mtime and inode
        an fsync and a rename leave as they are, and the ones recorded. That the .part is still this file
        is checked by the trip, after the fsync and just before the rename (`_sync_and_rename`): a check
        made any earlier leaves the fsync's length for another file to be put in its place. The fd goes
        with the batch, which closes it after its trip: a caller cancelled meanwhile cannot close it under
        the worker thread (a reused descriptor number could be another file)."""
        try:
            held = os.fstat(self.fd)
        except OSError as exc:
            raise self._storage_error(exc, "finish") from exc
        self.written = (held.st_dev, held.st_ino)
        fd, self.fd = self.fd, -1
        try:
            await _Durability.of(asyncio.get_running_loop()).settle(self, fd, dest)
        except OSError as exc:
            raise self._storage_error(exc, "finish") from exc
        return Downloaded(dest, self.size, self.sha.hexdigest(), held.st_mtime_ns, held.st_ino)

    def _sync_and_rename(self, fd: int, dest: Path) -> None:
        """fsync, then rename the .part to `dest` (the directory is synced by the caller). Runs in the
        durability worker thread: only calls that wait for the disk, or must follow one, are made here
        (each call there lets go of the interpreter lock and takes it back from the loop's thread, a few
        futex calls every time).

        The .part must still be the file written (`written`, its fd's identity): else DownloadError, and
        nothing is renamed. `dest` was checked when the download began (`_check_dest`); a directory put
        there since makes the rename fail, with the same message. (Anything else put there since, a FIFO
        say, is replaced as a file or a link would be: the rename never writes through it.)"""
        os.fsync(fd)
        named = os.lstat(self.path)
        if (named.st_dev, named.st_ino) != self.written:
            self.foreign = True
            raise DownloadError(f"{self.path} was replaced by something else during the download")
        try:
            os.replace(self.path, dest)
        except IsADirectoryError as exc:
            raise _refused_dest(dest, None) from exc
        if self.if_range is not None and not self.meta_pending:  # else no validator file was written
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.meta)

    def discard(self) -> None:
        self.discarded = True
        self.close()
        for path in (self.path, self.meta):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise DownloadError(f"cannot remove {path}: {exc.strerror}") from exc

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


def _read_meta(path: Path) -> tuple[str | None, int | None]:
    """The If-Range value and total size kept beside a .part; (None, None) when absent or unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None, None
    try:
        data = json.loads(os.read(fd, 4096)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (OSError, ValueError):
        data = None
    finally:
        os.close(fd)
    if not isinstance(data, dict):
        return None, None
    if_range, total = data.get("if_range"), data.get("total")
    # It goes into a request header: printable ASCII only.
    if not isinstance(if_range, str) or not if_range or not all(" " <= ch <= "~" for ch in if_range):
        return None, None
    return if_range, total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None


def _open_part(path: Path) -> tuple[int, bool]:
    """Open the .part for writing, creating it if absent; never through a symlink or into a non-file.
    Returns the fd and whether it was just created (then it is empty)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), True  # less the umask
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
    return fd, False


def _require_regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise DownloadError(f"{path} is a symlink; refusing to write through it")
    if not stat.S_ISREG(st.st_mode):
        raise DownloadError(f"{path} exists and is not a regular file; refusing to use it")


def _check_dest(dest: Path) -> bool:
    """Refuse a final path that os.replace cannot or should not take over; True when a regular file is
    there (which `_drop_non_media` looks at), False when nothing or a symlink is."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise DownloadError(f"cannot inspect {dest}: {exc.strerror}") from exc
    # A symlink is fine: os.replace swaps the link itself and never writes through it.
    if stat.S_ISREG(st.st_mode):
        return True
    if stat.S_ISLNK(st.st_mode):
        return False
    raise _refused_dest(dest, st.st_mode)


def _refused_dest(dest: Path, mode: int | None) -> DownloadError:
    kind = "a directory" if mode is None or stat.S_ISDIR(mode) else "not a regular file"
    return DownloadError(f"{dest} is {kind}; refusing to replace it with the download")


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


class _Durability:
    """Settles finished downloads of one event loop in batches: one worker-thread trip per batch, which
    fsyncs each file, renames it into place, then fsyncs each directory once. Self-clocking: the first
    file starts a trip at the end of this turn of the loop; files finishing while a trip runs wait and go
    together in the next one. Each file's waiter gets its own outcome (None, or its error); a failed
    directory sync fails every file of that directory in the batch.

    Each directory is opened once, on the loop's thread, and kept open for the loop's life (closed once
    the loop is gone and this object with it): not an open and a close in each trip, each of which costs
    the worker thread the interpreter lock back. As with the ledger's own open file, a run's output
    directory moved away mid-run is synced where it went."""

    _per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Durability] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        # Weakly: the loop is this object's key in `_per_loop`, which a strong reference would keep alive
        # (and its directories open) for the life of the process.
        self._loop = weakref.ref(loop)
        self._queue: list[tuple[_Part, int, Path, asyncio.Future]] = []
        self._busy = False
        self.trips = 0  # worker-thread trips made, for tests and benchmarks
        self.files = 0  # files settled
        self._dirs: dict[Path, int] = {}  # an open fd of each directory
        weakref.finalize(self, _close_dirs, self._dirs)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        assert loop is not None, "used only from its own running loop"
        return loop

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Durability:
        found = cls._per_loop.get(loop)
        if found is None:
            found = cls._per_loop[loop] = cls(loop)
        return found

    def settle(self, part: _Part, fd: int, dest: Path) -> asyncio.Future:
        """A future done once `part` is durable under the name `dest` (OSError/DownloadError if not).
        `fd` is the .part's, closed once its batch's trip is over."""
        waiter = self.loop.create_future()
        if dest.parent not in self._dirs:
            # Not opened (too many open files, say): the trip opens it for itself, and says why if it cannot.
            with contextlib.suppress(OSError):
                self._dirs[dest.parent] = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._queue.append((part, fd, dest, waiter))
        if not self._busy:
            self._busy = True
            self.loop.call_soon(self._start)
        return waiter

    def _start(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            self._busy = False
            return
        self.trips += 1
        self.files += len(batch)
        trip = self.loop.run_in_executor(None, _settle_batch, [entry[:3] for entry in batch], dict(self._dirs))
        trip.add_done_callback(lambda done: self._finished(batch, done))

    def _finished(self, batch: list, done: asyncio.Future) -> None:
        if not done.cancelled():  # (never is: nothing cancels it; a thread still running would use them)
            # Closed here rather than in the thread: a call there lets go of the interpreter lock and
            # takes it back from this thread, which costs futex calls; here, with the thread idle, none.
            for _, fd, *_ in batch:
                with contextlib.suppress(OSError):
                    os.close(fd)
        try:
            outcomes = done.result()
        except BaseException as exc:  # noqa: BLE001 - handed to every file of the batch
            outcomes = [exc] * len(batch)
        for (*_, waiter), outcome in zip(batch, outcomes, strict=True):
            if waiter.done():
                continue
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)
        self._start()


def _settle_batch(batch: list[tuple[_Part, int, Path]], dirs: dict[Path, int]) -> list[BaseException | None]:
    """In a worker thread: each file synced and renamed, then each directory synced once (`dirs`: the fds
    of those open already). Each file's outcome: None, or its error. Only calls that must wait for the
    disk run here (`_Durability` opens and closes the fds)."""
    outcomes: list[BaseException | None] = []
    directories: dict[Path, list[int]] = {}
    for i, (part, fd, dest) in enumerate(batch):
        try:
            part._sync_and_rename(fd, dest)
            outcomes.append(None)
            directories.setdefault(dest.parent, []).append(i)
        except Exception as exc:  # noqa: BLE001 - this file's own outcome
            outcomes.append(exc)
    for directory, members in directories.items():
        try:
            _fsync_dir(directory, dirs.get(directory))
        except DownloadError as exc:
            for i in members:
                outcomes[i] = exc
    return outcomes


def _fsync_dir(directory: Path, fd: int | None) -> None:
    """Make the renames in `directory` (open as `fd`, or None: opened here) durable. Some filesystems
    cannot fsync a directory; nothing more to do there."""
    try:
        if fd is not None:
            os.fsync(fd)
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise DownloadError(f"cannot sync directory {directory}: {exc.strerror}") from exc


def _close_dirs(dirs: dict[Path, int]) -> None:
    for fd in dirs.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def _refuse_credentials(session: aiohttp.ClientSession) -> None:
    if session.auth is not None or "Authorization" in session.headers:
        raise ValueError("download() needs a session without Authorization: the storage host is not the API")


def _redact(url: str) -> str:
    """The URL without query, fragment or user info, for messages; at most 200 characters."""
    try:
        shown = str(URL(url).with_query(None).with_fragment(None).with_user(None))
    except (TypeError, ValueError):
        return "<invalid URL>"
    return shown if len(shown) <= 200 else shown[:197] + "..."


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
