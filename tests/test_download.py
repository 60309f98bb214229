"""Tests for batchrun.download against a purpose-built aiohttp server on a real loopback socket."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers import mp4

from batchrun.download import (
    RESUME_AFTER_BYTES,
    Downloaded,
    _parse_content_range,
    _parse_retry_after,
    download,
    meta_path,
    part_path,
    verify,
)
from batchrun.errors import (
    DiskFull,
    DownloadError,
    DownloadInterrupted,
    DownloadTooLarge,
    OutputUrlExpired,
)

FTYP = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"  # an MP4's first box
DATA = mp4(random.Random(20240601).randbytes(300_000 - len(FTYP) - 8))
SHA = hashlib.sha256(DATA).hexdigest()
HALF = len(DATA) // 2
ETAG = '"data-v1"'  # what every handler below names DATA by
BIG_DATA = mp4(random.Random(7).randbytes(RESUME_AFTER_BYTES * 2))
PIECE = 100_000  # what the /partial server sends per answer
REPO = Path(__file__).resolve().parents[1]


class Server:
    """What the handlers saw, and knobs the tests turn."""

    def __init__(self) -> None:
        self.base = ""
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.watch: Path | None = None  # the .part /cut waits on before dropping the connection
        self.cut_done = False
        self.release = asyncio.Event()
        self.big_sent = 0  # bytes /big-hang.mp4 sends before it waits for `release`

    def url(self, path: str) -> str:
        return self.base + path

    def ranges(self, path: str) -> list[str | None]:
        return [h.get("Range") for p, h in self.requests if p == path]


def range_start(request: web.Request) -> int | None:
    match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
    return int(match[1]) if match else None


def partial(start: int, end: int) -> web.Response:
    """A 206 carrying DATA[start:end]."""
    return web.Response(
        status=206, body=DATA[start:end], headers={"Content-Range": f"bytes {start}-{end - 1}/{len(DATA)}",
                                                   "ETag": ETAG}
    )


def whole() -> web.Response:
    return web.Response(body=DATA, content_type="video/mp4", headers={"ETag": ETAG})


def crashed_part(dest: Path, data: bytes, if_range: str = ETAG, total: int | None = len(DATA)) -> None:
    """What a killed process leaves: the .part and, beside it, the validator of the file it came from."""
    part_path(dest).write_bytes(data)
    meta_path(dest).write_text(json.dumps({"if_range": if_range, "total": total}))


async def wait_until(predicate, limit: float = 10.0) -> None:
    """Yield to the loop until `predicate()` holds: a condition wait, not a fixed delay."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


def make_app(state: Server) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler):
        state.requests.append((request.path, dict(request.headers)))
        return await handler(request)

    async def plain(request):
        return whole()

    async def ranged(request):
        start = range_start(request)
        if start is None:
            return whole()
        if start >= len(DATA):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(DATA)}"})
        return partial(start, len(DATA))

    async def wrong_offset(request):
        if range_start(request) is not None:
            return partial(0, len(DATA))  # 206, but not from where we asked
        return whole()

    async def piecewise(request):
        start = range_start(request) or 0
        return partial(start, min(start + PIECE, len(DATA)))

    async def cut(request):
        if state.cut_done:
            return await ranged(request)
        state.cut_done = True
        resp = web.StreamResponse(headers={"ETag": ETAG})
        resp.content_length = len(DATA)
        await resp.prepare(request)
        await resp.write(DATA[:HALF])
        # Drop the connection only once the client has stored the first half, so the resume point is exact.
        await wait_until(lambda: state.watch.exists() and state.watch.stat().st_size >= HALF)
        request.transport.close()
        return resp

    async def hang(request):
        resp = web.StreamResponse()
        resp.content_length = len(DATA)
        await resp.prepare(request)
        await resp.write(DATA[:HALF])
        await state.release.wait()
        return resp

    async def big_hang(request):
        # BIG_DATA's first BIG_SENT bytes with its ETag, then nothing until released (a process killed there).
        resp = web.StreamResponse(headers={"ETag": ETAG})
        resp.content_length = len(BIG_DATA)
        await resp.prepare(request)
        for start in range(0, state.big_sent, 64 * 1024):
            await resp.write(BIG_DATA[start:min(start + 64 * 1024, state.big_sent)])
        await state.release.wait()
        return resp

    async def held(request):
        # All of DATA with its ETag, the last 1,000 bytes only once released.
        resp = web.StreamResponse(headers={"ETag": ETAG})
        resp.content_length = len(DATA)
        await resp.prepare(request)
        await resp.write(DATA[:-1000])
        await state.release.wait()
        await resp.write(DATA[-1000:])
        return resp

    async def chunked(request):
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for offset in range(0, len(DATA), 16_384):
                await resp.write(DATA[offset : offset + 16_384])
        except ConnectionError:
            pass  # the client hung up on purpose
        return resp

    async def status(request):
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.Response(status=int(request.match_info["code"]), text="nope", headers=headers)

    app = web.Application(middlewares=[record])
    app.router.add_get("/plain.mp4", plain)
    app.router.add_get("/ranged.mp4", ranged)
    app.router.add_get("/ignore-range.mp4", plain)
    app.router.add_get("/wrong-offset.mp4", wrong_offset)
    app.router.add_get("/partial.mp4", piecewise)
    app.router.add_get("/cut.mp4", cut)
    app.router.add_get("/hang.mp4", hang)
    app.router.add_get("/big-hang.mp4", big_hang)
    app.router.add_get("/chunked.mp4", chunked)
    app.router.add_get("/held.mp4", held)
    app.router.add_get("/status/{code}", status)
    return app


@pytest.fixture
async def server():
    state = Server()
    runner = web.AppRunner(make_app(state))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    yield state
    state.release.set()
    await runner.cleanup()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "out" / "job.mp4"


@pytest.fixture(autouse=True)
def _out_dir(dest: Path) -> None:
    dest.parent.mkdir()


def assert_complete(result: Downloaded, dest: Path) -> None:
    placed = dest.stat()  # the stat recorded at download is the file's under its final name
    assert result == Downloaded(dest, len(DATA), SHA, placed.st_mtime_ns, placed.st_ino)
    assert dest.read_bytes() == DATA
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA
    assert not part_path(dest).exists()
    assert not meta_path(dest).exists()


def assert_nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert not part_path(dest).exists()
    assert not meta_path(dest).exists()


# --- happy paths and resuming -------------------------------------------------------------------


async def test_plain_download(server, session, dest):
    result = await download(session, server.url("/plain.mp4"), dest)
    assert_complete(result, dest)
    [(_, headers)] = server.requests
    assert "Range" not in headers
    assert "Authorization" not in headers
    assert verify(dest, len(DATA), SHA)


async def test_replaces_an_existing_file(server, session, dest):
    dest.write_bytes(b"old, damaged video")
    assert_complete(await download(session, server.url("/plain.mp4"), dest), dest)


async def test_resumes_a_part_left_by_a_crashed_process(server, session, dest):
    crashed_part(dest, DATA[:12_345])
    result = await download(session, server.url("/ranged.mp4"), dest)
    assert_complete(result, dest)  # the sha256 covers the bytes that were already there
    assert server.ranges("/ranged.mp4") == ["bytes=12345-"]


async def test_server_ignoring_range_starts_over(server, session, dest):
    crashed_part(dest, b"x" * 5000)  # wrong bytes: they must not survive
    result = await download(session, server.url("/ignore-range.mp4"), dest)
    assert_complete(result, dest)
    assert server.ranges("/ignore-range.mp4") == ["bytes=5000-"]


async def test_206_at_the_wrong_offset_starts_over_without_range(server, session, dest):
    crashed_part(dest, b"x" * 5000)
    result = await download(session, server.url("/wrong-offset.mp4"), dest)
    assert_complete(result, dest)
    assert server.ranges("/wrong-offset.mp4") == ["bytes=5000-", None]


async def test_416_starts_over_without_range(server, session, dest):
    crashed_part(dest, b"x" * (len(DATA) + 10), total=None)
    result = await download(session, server.url("/ranged.mp4"), dest)
    assert_complete(result, dest)
    assert server.ranges("/ranged.mp4") == [f"bytes={len(DATA) + 10}-", None]


async def test_cut_body_is_kept_and_resumed(server, session, dest):
    server.watch = part_path(dest)
    with pytest.raises(DownloadInterrupted):
        await download(session, server.url("/cut.mp4"), dest)
    assert not dest.exists()
    assert part_path(dest).read_bytes() == DATA[:HALF]

    result = await download(session, server.url("/cut.mp4"), dest)
    assert_complete(result, dest)
    assert server.ranges("/cut.mp4") == [None, f"bytes={HALF}-"]
    assert server.requests[-1][1]["If-Range"] == ETAG  # resumed only if it is still the same file


async def test_a_small_part_left_without_its_validator_is_downloaded_again_whole(server, session, dest):
    part_path(dest).write_bytes(DATA[:HALF])  # a kill before the validator was due: no .meta beside it
    result = await download(session, server.url("/ranged.mp4"), dest)
    assert_complete(result, dest)
    assert server.ranges("/ranged.mp4") == [None]  # no Range without a validator naming those bytes
    assert not meta_path(dest).exists()


@pytest.mark.parametrize("sent", [RESUME_AFTER_BYTES // 2, RESUME_AFTER_BYTES + 64 * 1024])
async def test_a_large_part_always_has_its_validator_on_disk(server, session, dest, sent):
    """What a process killed mid-download leaves: past RESUME_AFTER_BYTES, the .part's validator is
    beside it, so the next process resumes; below, no .meta (the next one starts over)."""
    server.big_sent = sent
    task = asyncio.create_task(download(session, server.url("/big-hang.mp4"), dest))
    await wait_until(lambda: part_path(dest).exists() and part_path(dest).stat().st_size >= sent)
    kept = json.loads(meta_path(dest).read_text()) if meta_path(dest).exists() else None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    if sent > RESUME_AFTER_BYTES:
        assert kept == {"if_range": ETAG, "total": len(BIG_DATA)}
    else:
        assert kept is None


async def test_short_206_is_interrupted_and_later_attempts_finish(server, session, dest):
    url = server.url("/partial.mp4")
    for done in (PIECE, 2 * PIECE):
        with pytest.raises(DownloadInterrupted, match=f"ended at {done} of {len(DATA)} bytes"):
            await download(session, url, dest)
        assert part_path(dest).read_bytes() == DATA[:done]
        assert not dest.exists()
    assert_complete(await download(session, url, dest), dest)
    assert server.ranges("/partial.mp4") == [None, f"bytes={PIECE}-", f"bytes={2 * PIECE}-"]


async def test_timeout_keeps_the_part(server, session, dest):
    with pytest.raises(DownloadInterrupted, match="interrupted"):
        await download(session, server.url("/hang.mp4"), dest, timeout=0.1)
    assert not dest.exists()
    assert DATA.startswith(part_path(dest).read_bytes())


# --- HTTP errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [403, 404, 410])
async def test_refused_url_is_expired(server, session, dest, code):
    with pytest.raises(OutputUrlExpired, match=str(code)):
        await download(session, server.url(f"/status/{code}"), dest)
    assert_nothing_left(dest)


async def test_expired_url_keeps_a_part_for_the_refreshed_url(server, session, dest):
    crashed_part(dest, DATA[:1000])
    with pytest.raises(OutputUrlExpired):
        await download(session, server.url("/status/403"), dest)
    assert part_path(dest).read_bytes() == DATA[:1000]
    assert_complete(await download(session, server.url("/ranged.mp4"), dest), dest)


@pytest.mark.parametrize(
    ("code", "query", "retry_after"),
    [(503, "?retry_after=7", 7.0), (429, "?retry_after=1.5", 1.5), (500, "", None), (408, "", None)],
)
async def test_transient_statuses(server, session, dest, code, query, retry_after):
    with pytest.raises(DownloadInterrupted) as caught:
        await download(session, server.url(f"/status/{code}{query}"), dest)
    assert caught.value.kind == "interrupted"
    assert caught.value.retry_after == retry_after
    assert not dest.exists()


async def test_other_status_is_a_plain_download_error(server, session, dest):
    with pytest.raises(DownloadError, match="HTTP 400") as caught:
        await download(session, server.url("/status/400"), dest)
    assert type(caught.value) is DownloadError
    assert_nothing_left(dest)


async def test_messages_never_show_the_query_string(server, session, dest):
    secret = "?X-Amz-Signature=SECRETSIG&token=SECRETTOK"
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}/v.mp4"
        urls = [server.url(p) for p in ("/status/403", "/status/503", "/status/400")] + [refused]
        for url in urls:
            with pytest.raises(DownloadError) as caught:
                await download(session, url + secret, dest)
            # Not in the message, nor anywhere in the traceback a log might print.
            assert "SECRET" not in "".join(traceback.format_exception(caught.value))
            assert url.split("/", 3)[3] in str(caught.value)  # the path is still named


async def test_session_with_credentials_is_refused(server, dest):
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer api-token"}) as s:
        with pytest.raises(ValueError, match="Authorization"):
            await download(s, server.url("/plain.mp4"), dest)
    assert server.requests == []
    assert_nothing_left(dest)


# --- size cap -----------------------------------------------------------------------------------


async def test_content_length_over_cap(server, session, dest):
    crashed_part(dest, DATA[:10])  # even a resumable .part goes: the file cannot be kept
    with pytest.raises(DownloadTooLarge):
        await download(session, server.url("/ignore-range.mp4"), dest, max_bytes=len(DATA) - 1)
    assert_nothing_left(dest)


async def test_body_over_cap_without_content_length(server, session, dest):
    with pytest.raises(DownloadTooLarge):
        await download(session, server.url("/chunked.mp4"), dest, max_bytes=50_000, chunk_size=4096)
    assert_nothing_left(dest)


async def test_chunked_body_without_length_is_accepted(server, session, dest):
    assert_complete(await download(session, server.url("/chunked.mp4"), dest), dest)


async def test_existing_part_over_cap(server, session, dest):
    part_path(dest).write_bytes(DATA[:2000])
    with pytest.raises(DownloadTooLarge):
        await download(session, server.url("/ranged.mp4"), dest, max_bytes=1000)
    assert_nothing_left(dest)
    assert server.requests == []


# --- what sits at the .part and final paths ------------------------------------------------------


@pytest.mark.parametrize("target_exists", [True, False])
async def test_symlink_at_part_is_never_written_through(server, session, dest, tmp_path, target_exists):
    outside = tmp_path / "precious.bin"
    if target_exists:
        outside.write_bytes(b"precious")
    part_path(dest).symlink_to(outside)
    with pytest.raises(DownloadError, match="symlink"):
        await download(session, server.url("/plain.mp4"), dest)
    if target_exists:
        assert outside.read_bytes() == b"precious"
    else:
        assert not outside.exists()
    assert part_path(dest).is_symlink()
    assert not dest.exists()
    assert server.requests == []


async def test_hard_linked_part_is_refused(server, session, dest, tmp_path):
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"precious")
    os.link(outside, part_path(dest))
    with pytest.raises(DownloadError, match="hard link"):
        await download(session, server.url("/ranged.mp4"), dest)
    assert outside.read_bytes() == b"precious"
    assert not dest.exists()


async def test_fifo_at_part_is_refused_without_blocking(server, session, dest):
    os.mkfifo(part_path(dest))
    with pytest.raises(DownloadError, match="not a regular file"):
        await download(session, server.url("/plain.mp4"), dest)
    assert not dest.exists()


async def test_symlink_at_dest_is_replaced_not_followed(server, session, dest, tmp_path):
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"precious")
    dest.symlink_to(outside)
    assert_complete(await download(session, server.url("/plain.mp4"), dest), dest)
    assert not dest.is_symlink()
    assert outside.read_bytes() == b"precious"


async def test_directory_at_dest_is_refused(server, session, dest):
    dest.mkdir()
    with pytest.raises(DownloadError, match="directory"):
        await download(session, server.url("/plain.mp4"), dest)
    assert dest.is_dir()
    assert not part_path(dest).exists()


async def test_directory_made_at_dest_during_the_download_is_refused_and_the_bytes_kept(server, session, dest):
    fetching = asyncio.create_task(download(session, server.url("/held.mp4"), dest))
    await wait_until(lambda: part_path(dest).exists() and part_path(dest).stat().st_size >= len(DATA) - 1000)
    dest.mkdir()
    server.release.set()
    with pytest.raises(DownloadError, match="is a directory; refusing to replace it"):
        await fetching
    assert dest.is_dir() and part_path(dest).read_bytes() == DATA  # nothing lost, nothing placed
    dest.rmdir()
    assert_complete(await download(session, server.url("/ranged.mp4"), dest), dest)
    assert server.ranges("/ranged.mp4")[0] == f"bytes={len(DATA)}-"  # the kept bytes were offered for resuming


@pytest.mark.parametrize("planted", ["file", "symlink"])
async def test_a_part_replaced_during_the_download_is_never_renamed_into_place(server, session, dest, tmp_path,
                                                                               planted):
    fetching = asyncio.create_task(download(session, server.url("/held.mp4"), dest))
    await wait_until(lambda: part_path(dest).exists() and part_path(dest).stat().st_size >= len(DATA) - 1000)
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"precious")
    part_path(dest).unlink()
    if planted == "file":
        part_path(dest).write_bytes(b"someone else's bytes")
    else:
        part_path(dest).symlink_to(outside)
    server.release.set()
    with pytest.raises(DownloadError, match="replaced by something else during the download"):
        await fetching
    assert not dest.exists() and not dest.is_symlink()
    assert outside.read_bytes() == b"precious"
    if planted == "file":
        assert part_path(dest).read_bytes() == b"someone else's bytes"


async def test_a_part_replaced_while_it_is_being_made_durable_is_never_renamed_into_place(server, session, dest,
                                                                                          tmp_path):
    # The swap lands after the last byte and the loop's own stat, in the durability trip's thread, before
    # its fsync and rename: the window a check made before the fsync would leave open (found by a tester
    # swapping a 300 MB download's .part while it synced).
    impostor = tmp_path / "impostor.bin"
    impostor.write_bytes(b"someone else's bytes")

    class SwapFirst(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            def swapped_then_run():
                if part_path(dest).exists():
                    os.replace(impostor, part_path(dest))
                return fn(*args, **kwargs)
            return super().submit(swapped_then_run)

    loop = asyncio.get_running_loop()
    executor = SwapFirst(max_workers=1)
    loop.set_default_executor(executor)
    try:
        with pytest.raises(DownloadError, match="replaced by something else during the download"):
            await download(session, server.url("/ranged.mp4"), dest)
    finally:
        executor.shutdown(wait=True)
    assert not dest.exists() and not dest.is_symlink()
    assert part_path(dest).read_bytes() == b"someone else's bytes"  # left as found, never renamed into place
    # Nor resumed from: the next attempt has no validator for those bytes, fetches the whole file again
    # and records the server's bytes, not a planted prefix and the server's tail.
    assert not meta_path(dest).exists()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    assert_complete(await download(session, server.url("/ranged.mp4"), dest), dest)
    assert server.ranges("/ranged.mp4")[-1] is None


# --- disk full ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 64 KiB tmpfs, so that writes fail with a real ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tiny tmpfs needs root; the RLIMIT_FSIZE test covers the disk-full path")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the RLIMIT_FSIZE test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_on_a_real_tiny_filesystem(server, session, tiny_fs):
    target = tiny_fs / "job.mp4"
    with pytest.raises(DiskFull) as caught:
        await download(session, server.url("/plain.mp4"), target)
    assert caught.value.kind == "disk_full"
    assert_nothing_left(target)  # the .part is removed to give the space back


CHILD = r"""
import asyncio, json, resource, signal, sys
from pathlib import Path

import aiohttp

from batchrun.download import download, part_path
from batchrun.errors import DownloadError

url, dest, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

async def main():
    async with aiohttp.ClientSession() as session:
        try:
            await download(session, url, dest)
            error = None
        except DownloadError as exc:
            error = type(exc).__name__
    print(json.dumps({"error": error, "part": part_path(dest).exists(), "dest": dest.exists()}))

asyncio.run(main())
"""


async def test_disk_full_under_a_file_size_limit(server, dest):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, server.url("/plain.mp4"), str(dest), "65536",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()
    assert json.loads(out) == {"error": "DiskFull", "part": False, "dest": False}


# --- verify and helpers -------------------------------------------------------------------------


def test_verify(tmp_path):
    good = tmp_path / "good.mp4"
    good.write_bytes(DATA)
    assert verify(good, len(DATA), SHA)
    assert verify(good, len(DATA), SHA.upper())
    assert not verify(good, len(DATA) - 1, SHA)
    assert not verify(good, len(DATA), hashlib.sha256(b"other").hexdigest())
    assert not verify(tmp_path / "missing.mp4", len(DATA), SHA)

    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 1]))  # same size, one bit off
    assert not verify(damaged, len(DATA), SHA)

    link = tmp_path / "link.mp4"
    link.symlink_to(good)
    assert not verify(link, len(DATA), SHA)
    assert not verify(tmp_path, len(DATA), SHA)

    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    assert not verify(fifo, 0, hashlib.sha256(b"").hexdigest())


def test_part_path():
    assert part_path(Path("/o/job-2.mp4")) == Path("/o/job-2.mp4.part")


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("bytes 10-99/100", (10, 99, 100)),
        ("bytes 0-0/*", (0, 0, None)),
        ("bytes 10-99/50", None),
        ("bytes 20-10/100", None),
        ("bytes */100", None),
        ("items 0-1/2", None),
        (None, None),
    ],
)
def test_parse_content_range(header, parsed):
    assert _parse_content_range(header) == parsed


def test_parse_retry_after():
    assert _parse_retry_after("12") == 12.0
    assert _parse_retry_after("-3") == 0.0
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert _parse_retry_after("soon") is None
    assert _parse_retry_after("nan") is None
    assert _parse_retry_after(None) is None


def test_a_finished_event_loop_leaves_no_file_of_its_downloads_open(tmp_path):
    # Durability keeps each output directory open while its loop lives (one open, not one per batch),
    # and nothing once the loop is gone: a long-lived process running loop after loop leaks no fds.
    import gc

    async def one_run(folder: Path) -> None:
        async def plain(request):
            return whole()

        app = web.Application()  # no middleware: aiohttp caches those with their app, and the app its loop
        app.router.add_get("/plain.mp4", plain)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession() as session:
                for name in ("a.mp4", "b.mp4"):
                    assert_complete(await download(session, f"http://{host}:{port}/plain.mp4", folder / name),
                                    folder / name)
        finally:
            await runner.cleanup()

    def open_under(folder: Path) -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(str(folder)):
                    found.append(target)
        return found

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to list open files")
    folders = [tmp_path / f"run-{i}" for i in range(3)]
    for folder in folders:
        folder.mkdir()
        asyncio.run(one_run(folder))
    gc.collect()
    assert [open_under(folder) for folder in folders] == [[], [], []]
