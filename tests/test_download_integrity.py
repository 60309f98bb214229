"""What batchrun.download accepts as a finished output, against a purpose-built server on real loopback sockets:
only media of the expected kind, decoded when the host encoded it, resumed only from the same file, and never
from an address the host policy refuses (directly, by name or through a redirect)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ipaddress
import random
import socket
import zlib
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from helpers import mp4

from batchrun.download import MAX_REDIRECTS, download, meta_path, part_path, verify
from batchrun.errors import (
    DownloadError,
    DownloadInterrupted,
    OutputNotMedia,
    OutputUrlExpired,
    OutputUrlRefused,
)
from batchrun.outputhosts import HostPolicy

FTYP = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
VIDEO = mp4(random.Random(7).randbytes(200_000))
NEWER = mp4(random.Random(8).randbytes(200_000))  # the same output, re-rendered: same size, other bytes
HALF = len(VIDEO) // 2
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x08\x00\x00\x00\x08\x08\x02\x00\x00\x00K\x6d\x29\xdc"
EXPIRED_PAGE = b"<html><body>This link has expired.</body></html>\n"
BODIES = {  # what a storage host sends instead of the video, with its Content-Type
    "expired-page": (EXPIRED_PAGE, "text/html"),
    "json-error": (b'{"error": "SignatureDoesNotMatch", "code": 403}', "application/json"),
    "s3-xml": (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", "application/xml"),
    "empty": (b"", "video/mp4"),
    "cut-header": (FTYP[:10], "video/mp4"),
    "png": (PNG, "video/mp4"),
    "escapes": (b"<html>\x1b[31mgone\x07\r\n" + b"x" * 5000 + b"</html>", "text/html"),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Host:
    """The storage host: what it serves, what it saw."""

    def __init__(self) -> None:
        self.base = ""
        self.port = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.part: Path | None = None  # the .part a cut waits on before dropping the connection
        self.served: dict[str, int] = {}

    def url(self, path: str) -> str:
        return self.base + path

    def seen(self, path: str, header: str) -> list[str | None]:
        return [h.get(header) for p, h in self.requests if p == path]

    def count(self, path: str) -> int:
        self.served[path] = self.served.get(path, 0) + 1
        return self.served[path]


def range_start(request: web.Request) -> int | None:
    value = request.headers.get("Range", "")
    return int(value[6:-1]) if value.startswith("bytes=") and value.endswith("-") else None


async def wait_for_part(host: Host, size: int) -> None:
    for _ in range(10_000):
        if host.part.exists() and host.part.stat().st_size >= size:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the client never stored the first part")


async def cut_after(request: web.Request, host: Host, data: bytes, headers: dict[str, str], *,
                    chunked: bool = False, stored: int = HALF) -> web.StreamResponse:
    """Send the first HALF bytes of `data`, wait until the client stored `stored` bytes, then drop the
    connection (a body it decodes stores fewer bytes than were sent)."""
    resp = web.StreamResponse(headers=headers)
    if chunked:
        resp.enable_chunked_encoding()
    else:
        resp.content_length = len(data)
    await resp.prepare(request)
    await resp.write(data[:HALF])
    await wait_for_part(host, stored)
    request.transport.close()
    return resp


def ranged_answer(request: web.Request, data: bytes, headers: dict[str, str]) -> web.Response:
    start = range_start(request)
    if start is None:
        return web.Response(body=data, headers=headers)
    return web.Response(status=206, body=data[start:],
                        headers={**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})


def make_app(host: Host) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler):
        host.requests.append((request.path, dict(request.headers)))
        return await handler(request)

    routes = web.RouteTableDef()

    @routes.get("/video.mp4")
    async def video(request):
        return web.Response(body=VIDEO, headers={"Content-Type": "video/mp4", "ETag": '"v1"'})

    @routes.get("/body/{what}")
    async def body(request):
        data, content_type = BODIES[request.match_info["what"]]
        return web.Response(body=data, headers={"Content-Type": content_type})

    @routes.get("/big-page")
    async def big_page(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.content_length = 50 * 1024 * 1024
        await resp.prepare(request)
        try:
            for _ in range(50):
                await resp.write(b"<p>" + b"x" * (1024 * 1024 - 3))
                host.count("/big-page MiB")
        except ConnectionError:
            pass
        finally:
            host.count("/big-page ended")
        return resp

    @routes.get("/encoded/{how}")
    async def encoded(request):
        how = request.match_info["how"]
        data = {"gzip": gzip.compress(VIDEO), "deflate": zlib.compress(VIDEO),
                "raw-deflate": zlib.compress(VIDEO)[2:-4], "gzip-members": gzip.compress(VIDEO[:1000])
                + gzip.compress(VIDEO[1000:]), "gzip-short": gzip.compress(VIDEO)[:-40]}[how]
        encoding = "deflate" if "deflate" in how else "gzip"
        return web.Response(body=data, headers={"Content-Encoding": encoding, "ETag": '"gz"'})

    @routes.get("/encoded-cut")
    async def encoded_cut(request):
        data = gzip.compress(VIDEO, compresslevel=0)  # stored: its first half decodes to bytes on disk
        if host.count("/encoded-cut") == 1:
            return await cut_after(request, host, data, {"Content-Encoding": "gzip", "ETag": '"gz"'}, stored=1)
        return ranged_answer(request, data, {"Content-Encoding": "gzip", "ETag": '"gz"'})

    @routes.get("/encoded-range")
    async def encoded_range(request):
        # The first answer is plain; once a part exists the host has switched to a gzip-stored object
        # that still answers Range (counting encoded bytes) under the same ETag.
        if host.count("/encoded-range") == 1:
            return await cut_after(request, host, VIDEO, {"ETag": '"same"'})
        return ranged_answer(request, gzip.compress(VIDEO), {"Content-Encoding": "gzip", "ETag": '"same"'})

    @routes.get("/compress")
    async def compress(request):
        return web.Response(body=VIDEO, headers={"Content-Encoding": "compress"})

    @routes.get("/changing/{mode}")
    async def changing(request):
        """The file is re-rendered between the first part and the resume."""
        mode = request.match_info["mode"]
        path = f"/changing/{mode}"
        first = host.count(path) == 1
        data = VIDEO if first else NEWER
        headers = {}
        if mode in ("etag", "ignores-if-range"):
            headers["ETag"] = '"v1"' if first else '"v2"'
        if mode == "last-modified":
            headers["Last-Modified"] = "Mon, 01 Jun 2026 10:00:00 GMT" if first else "Tue, 02 Jun 2026 10:00:00 GMT"
        if mode == "total":
            headers["ETag"] = '"same"'  # a host that does not change its ETag, but the size changed
            data = VIDEO if first else NEWER + b"tail"
        if mode == "weak":
            headers["ETag"] = 'W/"v1"' if first else 'W/"v2"'
        if first:
            return await cut_after(request, host, data, headers)
        if_range = request.headers.get("If-Range")
        stale = if_range is not None and if_range not in headers.values()
        if stale and mode != "ignores-if-range":
            return web.Response(body=data, headers=headers)
        return ranged_answer(request, data, headers)

    @routes.get("/same/{mode}")
    async def same(request):
        """The same file throughout, named by a strong ETag or only by Last-Modified."""
        mode = request.match_info["mode"]
        headers = {"ETag": '"v1"'} if mode == "etag" else {"Last-Modified": "Mon, 01 Jun 2026 10:00:00 GMT"}
        if host.count(f"/same/{mode}") == 1:
            return await cut_after(request, host, VIDEO, headers)
        return ranged_answer(request, VIDEO, headers)

    @routes.get("/chunked-cut")
    async def chunked_cut(request):
        if host.count("/chunked-cut") == 1:
            return await cut_after(request, host, VIDEO, {"ETag": '"v1"'}, chunked=True)
        return ranged_answer(request, VIDEO, {"ETag": '"v1"'})

    @routes.get("/short-206")
    async def short_206(request):
        """A 206 without Content-Length whose (complete, chunked) body stops short of what Content-Range says."""
        if host.count("/short-206") == 1:
            return await cut_after(request, host, VIDEO, {"ETag": '"v1"'})
        start = range_start(request) or 0
        resp = web.StreamResponse(status=206, headers={"ETag": '"v1"',
                                                       "Content-Range": f"bytes {start}-{len(VIDEO) - 1}/{len(VIDEO)}"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(VIDEO[start : start + 1000])
        await resp.write_eof()
        return resp

    @routes.get("/redirect")
    async def redirect(request):
        raise web.HTTPFound(request.query["to"])

    @routes.get("/hops/{n}")
    async def hops(request):
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=VIDEO)
        raise web.HTTPFound(f"/hops/{n - 1}")

    @routes.get("/status/403")
    async def refused(request):
        return web.Response(status=403, text="AccessDenied")

    app = web.Application(middlewares=[record])
    app.add_routes(routes)
    return app


@pytest.fixture
async def host():
    state = Host()
    runner = web.AppRunner(make_app(state))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.port = runner.addresses[0][1]
    state.base = f"http://127.0.0.1:{state.port}"
    yield state
    await runner.cleanup()


@pytest.fixture
def dest(tmp_path: Path, host: Host) -> Path:
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "shot-1.mp4"
    host.part = part_path(path)
    return path


def assert_nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert not part_path(dest).exists()
    assert not meta_path(dest).exists()


def assert_got(dest: Path, got, data: bytes) -> None:
    assert dest.read_bytes() == data
    assert (got.bytes, got.sha256) == (len(data), sha(data))
    assert not part_path(dest).exists() and not meta_path(dest).exists()
    assert verify(dest, got.bytes, got.sha256, "video")


# --- only media of the expected kind is published ------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "received"),
    [
        ("expired-page", f"an HTML page ({len(EXPIRED_PAGE)} bytes, Content-Type text/html): '<html><body>This link"),
        ("json-error", f"JSON ({len(BODIES['json-error'][0])} bytes, Content-Type application/json): '{{\"error\""),
        ("s3-xml", f"an XML document ({len(BODIES['s3-xml'][0])} bytes, Content-Type application/xml)"),
        ("empty", "an empty body (0 bytes, Content-Type video/mp4)"),
        ("cut-header", "a truncated or malformed container header (10 bytes, Content-Type video/mp4)"),
        ("png", "a PNG file (33 bytes, Content-Type video/mp4)"),
    ],
)
async def test_a_body_that_is_not_the_video_is_refused_and_nothing_is_kept(host, session, dest, what, received):
    with pytest.raises(OutputNotMedia) as caught:
        await download(session, host.url(f"/body/{what}"), dest, kind="video")
    assert isinstance(caught.value, OutputUrlExpired)  # handled like an expired URL: refreshed
    assert received in str(caught.value)
    assert str(caught.value).endswith("instead of a video")
    assert_nothing_left(dest)


async def test_the_message_is_capped_and_free_of_control_characters(host, session, dest):
    with pytest.raises(OutputNotMedia) as caught:
        await download(session, host.url("/body/escapes"), dest, kind="video")
    message = str(caught.value)
    assert len(message) < 300
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in message)
    assert "an HTML page" in message


async def test_a_large_page_is_abandoned_after_its_first_bytes(host, session, dest):
    with pytest.raises(OutputNotMedia, match="an HTML page"):
        await download(session, host.url("/big-page"), dest, kind="video", max_bytes=100 * 1024 * 1024)
    assert_nothing_left(dest)
    for _ in range(5000):
        if host.served.get("/big-page ended"):
            break
        await asyncio.sleep(0.001)
    assert host.served.get("/big-page ended")
    assert host.served.get("/big-page MiB", 0) < 25  # the client hung up long before the 50 MiB were sent


async def test_the_expected_kind_decides(host, session, dest):
    with pytest.raises(OutputNotMedia, match="a PNG file .* instead of a video"):
        await download(session, host.url("/body/png"), dest, kind="video")
    image = dest.with_name("shot-1.png")
    got = await download(session, host.url("/body/png"), image, kind="image")
    assert image.read_bytes() == PNG and verify(image, got.bytes, got.sha256, "image")
    assert not verify(image, got.bytes, got.sha256, "video")
    with pytest.raises(OutputNotMedia, match="an MP4 file .* instead of an image"):
        await download(session, host.url("/video.mp4"), dest, kind="image")


async def test_an_error_page_published_by_an_older_batchrun_is_removed(host, session, dest):
    dest.write_bytes(EXPIRED_PAGE)
    with pytest.raises(OutputUrlExpired):
        await download(session, host.url("/status/403"), dest, kind="video")
    assert not dest.exists()  # nothing broken stays under the final name, even when the new try fails
    assert_got(dest, await download(session, host.url("/video.mp4"), dest, kind="video"), VIDEO)


async def test_a_real_video_under_the_final_name_stays_when_a_new_try_fails(host, session, dest):
    dest.write_bytes(NEWER)
    with pytest.raises(OutputNotMedia):
        await download(session, host.url("/body/expired-page"), dest, kind="video")
    assert dest.read_bytes() == NEWER


def test_verify_checks_the_signature(tmp_path):
    page = tmp_path / "shot-1.mp4"
    page.write_bytes(EXPIRED_PAGE)  # size and sha256 recorded as if it were the video
    assert not verify(page, len(EXPIRED_PAGE), sha(EXPIRED_PAGE))
    assert not verify(page, len(EXPIRED_PAGE), sha(EXPIRED_PAGE), "video")
    good = tmp_path / "good.mp4"
    good.write_bytes(VIDEO)
    assert verify(good, len(VIDEO), sha(VIDEO), "video") and verify(good, len(VIDEO), sha(VIDEO))
    assert not verify(good, len(VIDEO), sha(VIDEO), "image")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert not verify(empty, 0, sha(b""))


# --- encoded bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["gzip", "deflate", "raw-deflate", "gzip-members"])
async def test_an_encoded_body_is_decoded_and_verified(host, session, dest, how):
    got = await download(session, host.url(f"/encoded/{how}"), dest, kind="video")
    assert_got(dest, got, VIDEO)
    assert host.seen(f"/encoded/{how}", "Accept-Encoding") == ["identity"]


async def test_an_encoded_stream_that_ends_early_is_not_complete(host, session, dest):
    with pytest.raises(DownloadInterrupted, match="before the end of its gzip stream"):
        await download(session, host.url("/encoded/gzip-short"), dest, kind="video")
    assert_nothing_left(dest)


async def test_a_cut_encoded_body_starts_over_instead_of_resuming(host, session, dest):
    with pytest.raises(DownloadInterrupted):
        await download(session, host.url("/encoded-cut"), dest, kind="video")
    assert not meta_path(dest).exists()  # no validator kept: decoded bytes cannot be resumed with a Range
    assert_got(dest, await download(session, host.url("/encoded-cut"), dest, kind="video"), VIDEO)
    assert host.seen("/encoded-cut", "Range") == [None, None]


async def test_an_encoded_answer_to_a_range_is_not_stitched(host, session, dest):
    with pytest.raises(DownloadInterrupted):
        await download(session, host.url("/encoded-range"), dest, kind="video")
    assert part_path(dest).read_bytes() == VIDEO[:HALF]
    assert_got(dest, await download(session, host.url("/encoded-range"), dest, kind="video"), VIDEO)
    assert host.seen("/encoded-range", "Range") == [None, f"bytes={HALF}-", None]


async def test_an_encoding_batchrun_cannot_decode_is_named(host, session, dest):
    with pytest.raises(DownloadError, match="cannot decode: compress"):
        await download(session, host.url("/compress"), dest, kind="video")
    assert_nothing_left(dest)


# --- resuming only the same file -----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "validator"), [("etag", '"v1"'), ("last-modified", "Mon, 01 Jun 2026 10:00:00 GMT")])
async def test_resume_names_the_file_with_if_range(host, session, dest, mode, validator):
    with pytest.raises(DownloadInterrupted):
        await download(session, host.url(f"/same/{mode}"), dest, kind="video")
    assert_got(dest, await download(session, host.url(f"/same/{mode}"), dest, kind="video"), VIDEO)
    assert host.seen(f"/same/{mode}", "Range") == [None, f"bytes={HALF}-"]
    assert host.seen(f"/same/{mode}", "If-Range") == [None, validator]


@pytest.mark.parametrize(
    ("mode", "ranges"),
    [
        ("etag", [None, f"bytes={HALF}-"]),  # the host honours If-Range: 200 with the new file
        ("last-modified", [None, f"bytes={HALF}-"]),
        ("ignores-if-range", [None, f"bytes={HALF}-", None]),  # 206 of another ETag: batchrun starts over
        ("total", [None, f"bytes={HALF}-", None]),  # same ETag, another total size: starts over
        ("weak", [None, None]),  # a weak ETag cannot name the file for a Range: no resume at all
    ],
)
async def test_a_file_that_changed_between_parts_is_never_stitched(host, session, dest, mode, ranges):
    with pytest.raises(DownloadInterrupted):
        await download(session, host.url(f"/changing/{mode}"), dest, kind="video")
    got = await download(session, host.url(f"/changing/{mode}"), dest, kind="video")
    assert_got(dest, got, NEWER + b"tail" if mode == "total" else NEWER)
    assert host.seen(f"/changing/{mode}", "Range") == ranges


async def test_a_part_without_a_validator_starts_over(host, session, dest):
    part_path(dest).write_bytes(VIDEO[:5000])  # left by an older batchrun: which file it came from is unknown
    assert_got(dest, await download(session, host.url("/video.mp4"), dest, kind="video"), VIDEO)
    assert host.seen("/video.mp4", "Range") == [None]


async def test_a_chunked_body_cut_mid_way_is_not_complete(host, session, dest):
    with pytest.raises(DownloadInterrupted):
        await download(session, host.url("/chunked-cut"), dest, kind="video")
    assert not dest.exists()
    assert part_path(dest).read_bytes() == VIDEO[:HALF]
    assert_got(dest, await download(session, host.url("/chunked-cut"), dest, kind="video"), VIDEO)
    assert host.seen("/chunked-cut", "Range") == [None, f"bytes={HALF}-"]


async def _close_delimited(body: bytes):
    """A storage host that sends `body` with neither Content-Length nor chunked framing: the end of the
    body is where it closes the connection (HTTP/1.1 allows it), so a cut looks like an end."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


@pytest.mark.parametrize("cut", [2 / 3, 0.5, 0.1], ids=["two-thirds", "half", "a-tenth"])
async def test_a_body_without_a_length_that_ends_early_is_not_complete(session, dest, cut):
    server = await _close_delimited(VIDEO[: int(len(VIDEO) * cut)])
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v.mp4"
    try:
        with pytest.raises(DownloadInterrupted, match=f"structure says {len(VIDEO)}"):
            await download(session, url, dest, kind="video")
    finally:
        server.close()
        await server.wait_closed()
    assert not dest.exists()


async def test_a_whole_body_without_a_length_is_complete(session, dest):
    server = await _close_delimited(VIDEO)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v.mp4"
    try:
        assert_got(dest, await download(session, url, dest, kind="video"), VIDEO)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_206_shorter_than_its_content_range_is_not_complete(host, session, dest):
    with pytest.raises(DownloadInterrupted):
        await download(session, host.url("/short-206"), dest, kind="video")
    with pytest.raises(DownloadInterrupted, match=f"ended at {HALF + 1000} of {len(VIDEO)} bytes"):
        await download(session, host.url("/short-206"), dest, kind="video")
    assert not dest.exists()
    assert part_path(dest).read_bytes() == VIDEO[: HALF + 1000]


# --- addresses the output may not reach -----------------------------------------------------------------


class Names(AbstractResolver):
    """A hosts file for tests: names resolve without DNS."""

    def __init__(self, table: dict[str, str]):
        self.table = table

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        address = self.table[host]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": family, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


def only_127_0_0_1(address) -> bool:
    """127.0.0.1 plays the public internet; every other address is what it really is."""
    return address == ipaddress.ip_address("127.0.0.1")


@pytest.fixture
async def guarded():
    """A policy that treats the test host (127.0.0.1) as public, and its download session."""
    policy = HostPolicy(allowed=only_127_0_0_1, resolver=Names({"cdn.test": "127.0.0.1", "intranet.test": "10.0.0.5",
                                                                "metadata.test": "169.254.169.254",
                                                                "six.test": "::1"}))
    async with policy.session() as session:
        yield policy, session


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:{port}/video.mp4", "127.0.0.1, a loopback address"),
        ("http://[::1]:{port}/video.mp4", "::1, a loopback address"),
        ("http://localhost:{port}/video.mp4", "resolves to .*, a loopback address"),
    ],
)
async def test_a_public_policy_refuses_loopback_urls_before_connecting(host, dest, url, message):
    policy = HostPolicy()
    async with policy.session() as session:
        with pytest.raises(OutputUrlRefused, match=message):
            await download(session, url.format(port=host.port), dest, kind="video", hosts=policy)
    assert host.requests == []
    assert_nothing_left(dest)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("http://127.0.0.2:{port}/video.mp4", "127.0.0.2, a loopback address"),
        ("http://[::1]:{port}/video.mp4", "::1, a loopback address"),
        ("http://10.0.0.5/video.mp4", "10.0.0.5, a private address"),
        ("http://intranet.test:{port}/video.mp4", "intranet.test resolves to 10.0.0.5, a private address"),
        ("http://metadata.test/latest", "169.254.169.254, a link-local address"),
        ("http://six.test:{port}/video.mp4", "::1, a loopback address"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
async def test_a_redirect_to_a_refused_address_is_refused(host, dest, guarded, target, message):
    policy, session = guarded
    url = host.url("/redirect?to=" + target.format(port=host.port))
    with pytest.raises(OutputUrlRefused, match=message) as caught:
        await download(session, url + "&sig=SECRET", dest, kind="video", hosts=policy)
    assert "SECRET" not in str(caught.value)
    assert [path for path, _ in host.requests] == ["/redirect"]
    assert_nothing_left(dest)


async def test_allowed_hops_and_names_connect_to_what_was_checked(host, dest, guarded):
    policy, session = guarded
    url = host.url(f"/redirect?to=http://cdn.test:{host.port}/video.mp4")
    assert_got(dest, await download(session, url, dest, kind="video", hosts=policy), VIDEO)
    assert [path for path, _ in host.requests] == ["/redirect", "/video.mp4"]


async def test_redirects_are_limited(host, session, dest):
    assert_got(dest, await download(session, host.url(f"/hops/{MAX_REDIRECTS}"), dest, kind="video"), VIDEO)
    dest.unlink()
    with pytest.raises(DownloadError, match=f"more than {MAX_REDIRECTS} times"):
        await download(session, host.url(f"/hops/{MAX_REDIRECTS + 1}"), dest, kind="video")
    assert_nothing_left(dest)


async def test_a_policy_needs_its_own_session(host, session, dest):
    with pytest.raises(ValueError, match="hosts.session"):
        await download(session, host.url("/video.mp4"), dest, hosts=HostPolicy())
    assert host.requests == []



async def test_a_long_url_is_named_capped_in_messages(host, session, dest):
    url = host.url("/body/expired-page") + "/" * 3 + "x" * 5000
    with pytest.raises(DownloadError) as caught:
        await download(session, url, dest, kind="video")
    assert len(str(caught.value)) < 400 and "..." in str(caught.value)
