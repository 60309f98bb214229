"""Preflight of image URLs against a local HTTPS server over real loopback sockets (no network).

The server's certificate comes from a throwaway CA made by `trustme`; the client session trusts only it.
"""

from __future__ import annotations

import asyncio
import functools
import io
import ssl
import textwrap
import time
from collections import Counter

import aiohttp
import pytest
import trustme
from aiohttp import web
from PIL import Image

from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest
from batchrun.preflight import ImageCheck, check_urls, doomed_jobs, image_urls, problems_for

GIB2 = 2 * 1024**3


@functools.cache
def image(size, fmt="PNG", noise=False) -> bytes:
    out = io.BytesIO()
    if noise:
        import os

        picture = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        picture = Image.new("RGB", size, (30, 120, 200))
    picture.save(out, fmt)
    return out.getvalue()


class Host:
    """The test server's handlers and what they saw."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.headers: list[dict] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.huge_sent = 0
        self.huge_done = asyncio.Event()
        self.released = asyncio.Event()
        self.png = image((640, 480))
        self.jpeg = image((800, 600), "JPEG")
        self.webp = image((1200, 700), "WEBP", noise=True)  # past the first 64 KiB
        self.small = image((200, 200))
        self.wide = image((3000, 400))
        self.gif = image((400, 400), "GIF")

    def app(self) -> web.Application:
        def serve(make):  # aiohttp wants coroutine handlers
            async def handler(request):
                return make(request)
            return handler

        app = web.Application(middlewares=[self.record])
        app.router.add_get("/good.png", serve(lambda r: self.ranged(r, self.png, "image/png")))
        app.router.add_get("/good.jpg", serve(lambda r: self.full(self.jpeg, "image/jpeg")))
        app.router.add_get("/big.webp", serve(lambda r: self.ranged(r, self.webp, "image/webp")))
        app.router.add_get("/octet", serve(lambda r: self.ranged(r, self.png, "application/octet-stream")))
        app.router.add_get("/octet-text", serve(lambda r: self.full(b"hello, no image", "application/octet-stream")))
        app.router.add_get("/small.png", serve(lambda r: self.ranged(r, self.small, "image/png")))
        app.router.add_get("/wide.png", serve(lambda r: self.ranged(r, self.wide, "image/png")))
        app.router.add_get("/anim.gif", serve(lambda r: self.full(self.gif, "image/gif")))
        app.router.add_get("/json", serve(lambda r: self.full(b'{"a": 1}', "application/json")))
        app.router.add_get("/page", serve(lambda r: self.full(b"<!doctype html><html>login</html>", "text/html")))
        app.router.add_get("/missing.png", serve(lambda r: web.Response(status=404, text="no")))
        app.router.add_get("/forbidden.png", serve(lambda r: web.Response(status=403, text="no")))
        app.router.add_get("/error.png", serve(lambda r: web.Response(status=503, text="down")))
        app.router.add_get("/loop1", self.redirect("/loop2"))
        app.router.add_get("/loop2", self.redirect("/loop1"))
        app.router.add_get("/moved.png", self.redirect("/hop/1", permanent=True))
        app.router.add_get("/hop/{n}", self.hop)
        app.router.add_get("/far/{n}", self.far)
        app.router.add_get("/slow.png", self.slow)
        app.router.add_get("/huge.png", self.huge)
        app.router.add_get("/huge-ranged.png", self.huge_ranged)
        app.router.add_get("/busy/{n}", self.busy)
        return app

    @staticmethod
    def redirect(location: str, permanent: bool = False):
        async def handler(request):
            raise (web.HTTPMovedPermanently if permanent else web.HTTPFound)(location)
        return handler

    @web.middleware
    async def record(self, request, handler):
        self.hits[request.path] += 1
        self.headers.append(dict(request.headers))
        return await handler(request)

    @staticmethod
    def full(data: bytes, content_type: str) -> web.Response:
        return web.Response(body=data, content_type=content_type)

    @staticmethod
    def ranged(request: web.Request, data: bytes, content_type: str) -> web.Response:
        """Honours `Range: bytes=0-N` as most storage hosts do."""
        header = request.headers.get("Range", "")
        if not header.startswith("bytes=0-"):
            return web.Response(body=data, content_type=content_type)
        end = min(int(header.removeprefix("bytes=0-")), len(data) - 1)
        return web.Response(status=206, body=data[: end + 1], content_type=content_type,
                            headers={"Content-Range": f"bytes 0-{end}/{len(data)}"})

    async def hop(self, request):  # /hop/1 -> /hop/2 -> ... -> /good.png after 3 hops
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/hop/{n + 1}" if n < 3 else "/good.png")

    async def far(self, request):  # one redirect too many
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/far/{n + 1}" if n < 6 else "/good.png")

    async def slow(self, request):
        try:  # until the test ends (at most 5 s)
            await asyncio.wait_for(self.released.wait(), 5)
        except asyncio.TimeoutError:
            pass
        return self.full(self.png, "image/png")

    async def busy(self, request):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.05)
        self.in_flight -= 1
        return self.ranged(request, self.png, "image/png")

    async def huge(self, request):
        """Says 2 GiB (ignoring Range) and streams zeros for as long as the client reads."""
        response = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": str(GIB2)})
        await response.prepare(request)
        zeros = bytes(64 * 1024)
        try:
            await response.write(self.png[:64])
            self.huge_sent += 64
            while self.huge_sent < GIB2:
                await response.write(zeros)
                self.huge_sent += len(zeros)
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self.huge_done.set()
        return response

    async def huge_ranged(self, request):
        data = self.png[:64] + bytes(64 * 1024 - 64)
        return web.Response(status=206, body=data, content_type="image/png",
                            headers={"Content-Range": f"bytes 0-{len(data) - 1}/{GIB2}"})


@functools.cache
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client): a certificate for 127.0.0.1 from a throwaway CA, and a client trusting only that CA."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


@pytest.fixture
async def host():
    server_context, client_context = tls_contexts()
    served = Host()
    runner = web.AppRunner(served.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = runner.addresses[0][1]
    served.base = f"https://127.0.0.1:{port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as session:
        served.session = session
        yield served
    served.released.set()
    await runner.cleanup()


async def check(host, *paths, **options) -> dict[str, ImageCheck]:
    found = await check_urls([host.base + p for p in paths], session=host.session, **options)
    return {url.removeprefix(host.base): result for url, result in found.items()}


# --- good images ----------------------------------------------------------------------------------


async def test_good_images(host):
    found = await check(host, "/good.png", "/good.jpg", "/big.webp", "/octet", "/moved.png")
    b = host.base
    assert found["/good.png"] == ImageCheck(b + "/good.png", True, None, "image/png", len(host.png), 640, 480)
    assert found["/good.jpg"] == ImageCheck(b + "/good.jpg", True, None, "image/jpeg", len(host.jpeg), 800, 600)
    assert found["/big.webp"] == ImageCheck(b + "/big.webp", True, None, "image/webp", len(host.webp), 1200, 700)
    assert len(host.webp) > 64 * 1024  # its size came from the first 64 KiB only
    assert found["/octet"].ok and found["/octet"].content_type == "application/octet-stream"
    assert found["/moved.png"].ok and (found["/moved.png"].width, found["/moved.png"].height) == (640, 480)
    assert host.hits["/hop/3"] == 1


async def test_requests_carry_a_range_and_no_credentials(host):
    await check(host, "/good.png")
    assert host.headers and all("Authorization" not in h for h in host.headers)
    assert host.headers[0]["Range"] == "bytes=0-65535"


async def test_a_session_with_credentials_is_refused(host):
    async with aiohttp.ClientSession(headers={"authorization": "Bearer secret"}) as session:
        with pytest.raises(ValueError, match="without an Authorization header"):
            await check_urls([host.base + "/good.png"], session=session)
    assert not host.hits


# --- bad URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, problem",
    [
        ("/missing.png", "the image URL answers HTTP 404 Not Found: check the address"),
        ("/forbidden.png", "the image URL answers HTTP 403 Forbidden: the host must let anyone fetch it (no login, "
                           "cookies or bot blocking)"),
        ("/error.png", "the image URL answers HTTP 503 Service Unavailable (the host may be busy or down; try again "
                       "later)"),
        ("/page", "the image URL serves a web page (text/html), not an image: link the image file itself"),
        ("/json", "the image URL serves application/json, not an image"),
        ("/octet-text", "the file at this URL is not an image (jpg, png, bmp or webp) (served as "
                        "application/octet-stream)"),
        ("/anim.gif", "the file at this URL is a GIF image; Kling accepts jpg, png, bmp or webp (served as image/gif)"),
        ("/small.png", "the file at this URL is 200x200 px; Kling needs each side to be at least 300 px"),
        ("/wide.png", "the file at this URL is 3000x400 px, an aspect ratio of 7.50:1; Kling accepts from 1:2.5 "
                      "to 2.5:1"),
        ("/far/1", "the image URL redirects more than 5 times"),
    ],
)
async def test_problems(host, path, problem):
    found = (await check(host, path))[path]
    assert (found.ok, found.problem) == (False, problem)


async def test_redirect_loop(host):
    found = (await check(host, "/loop1"))["/loop1"]
    assert (found.ok, found.problem) == (False, f"the image URL redirects in a loop (back to {host.base}/loop1)")
    assert host.hits["/loop1"] == 1 and host.hits["/loop2"] == 1


async def test_slow_host_times_out(host):
    started = time.perf_counter()
    found = (await check(host, "/slow.png", "/good.png", timeout=0.3))
    assert time.perf_counter() - started < 2
    assert (found["/slow.png"].ok, found["/slow.png"].problem) == (False, "the image URL did not answer within 0.3 s")
    assert found["/good.png"].ok


async def test_huge_file_is_refused_without_downloading_it(host):
    started = time.perf_counter()
    found = await check(host, "/huge.png", "/huge-ranged.png")
    assert time.perf_counter() - started < 5
    for path in ("/huge.png", "/huge-ranged.png"):
        assert found[path].ok is False and found[path].bytes == GIB2
        assert found[path].problem == "the file at this URL is 2,048.0 MiB; images may be at most 50 MiB"
    await asyncio.wait_for(host.huge_done.wait(), 5)  # the server noticed the client leave
    assert host.huge_sent < 16 * 2**20, f"{host.huge_sent:,} bytes were sent"


async def test_unreachable_host():
    async with aiohttp.ClientSession() as session:
        found = await check_urls(["https://127.0.0.1:9/a.png"], session=session, timeout=5)
    result = found["https://127.0.0.1:9/a.png"]
    assert not result.ok and result.problem.startswith("cannot connect to 127.0.0.1: ")


async def test_untrusted_certificate(host):
    async with aiohttp.ClientSession() as session:  # trusts the system's CAs, not the test CA
        found = await check_urls([host.base + "/good.png"], session=session)
    assert found[host.base + "/good.png"].problem.startswith("the image URL's TLS certificate is not valid")


# --- each URL once, at most `concurrency` at a time, cache ----------------------------------------


async def test_each_url_once_within_the_concurrency_cap(host):
    paths = [f"/busy/{i}" for i in range(12)]
    found = await check(host, *paths, *paths[:5], concurrency=3)
    assert list(found) == paths
    assert all(result.ok for result in found.values())
    assert all(host.hits[p] == 1 for p in paths)
    assert host.most_in_flight == 3


async def test_cached_urls_are_not_fetched_again(host):
    cached = {host.base + "/good.png": ImageCheck(host.base + "/good.png", True, width=1, height=1)}
    found = await check(host, "/good.png", "/small.png", cached=cached)
    assert found["/good.png"] is cached[host.base + "/good.png"]
    assert host.hits["/good.png"] == 0 and host.hits["/small.png"] == 1


# --- located problems for a manifest --------------------------------------------------------------


async def test_problems_for_a_manifest(host, tmp_path):
    b = host.base
    (tmp_path / "images.csv").write_text(
        f"id,prompt,start_image_url\nrow-a,x,{b}/forbidden.png\nrow-b,y,{b}/good.png\n")
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(f"""\
        defaults:
          start_image_url: {b}/missing.png
        jobs_from: images.csv
        jobs:
          - id: one
            prompt: a
          - id: two
            prompt: b
          - id: beach
            matrix:
              prompt: [c, d]
              start_image_url: [{b}/good.png, {b}/small.png]
          - id: three
            prompt: e
            start_image_url: {b}/page
            elements:
              - frontal_image_url: {b}/good.png
                reference_image_urls: [{b}/wide.png, {b}/slow.png]
        """))
    manifest = load_manifest(path)
    urls = image_urls(manifest)
    assert urls == [f"{b}/missing.png", f"{b}/good.png", f"{b}/small.png", f"{b}/page", f"{b}/wide.png",
                    f"{b}/slow.png", f"{b}/forbidden.png"]
    checks = await check_urls(urls, session=host.session, timeout=0.5)
    assert [str(p).removeprefix(f"{tmp_path}/") for p in problems_for(manifest, checks)] == [
        "m.yaml:2:20: defaults.start_image_url: the image URL answers HTTP 404 Not Found: check the address",
        f"m.yaml:12:{25 + len(b) + 11}: jobs[2].matrix.start_image_url[1]: the file at this URL is 200x200 px; "
        "Kling needs each side to be at least 300 px",
        "m.yaml:15:22: jobs[3] (id=three).start_image_url: the image URL serves a web page (text/html), not an "
        "image: link the image file itself",
        "m.yaml:18:32: jobs[3] (id=three).elements[0].reference_image_urls[0]: the file at this URL is 3000x400 "
        "px, an aspect ratio of 7.50:1; Kling accepts from 1:2.5 to 2.5:1",
        f"m.yaml:18:{32 + len(b) + 11}: jobs[3] (id=three).elements[0].reference_image_urls[1]: the image URL did "
        "not answer within 0.5 s",
        "images.csv:2:3: jobs_from[0] (id=row-a).start_image_url: the image URL answers HTTP 403 Forbidden: the "
        "host must let anyone fetch it (no login, cookies or bot blocking)",
    ]
    assert all(p.severity == "error" for p in problems_for(manifest, checks))
    assert problems_for(manifest, {}) == []


def test_image_urls_skip_local_files_and_data_uris(tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (400, 400)).save(out, "PNG")
    (tmp_path / "a.png").write_bytes(out.getvalue())
    path = tmp_path / "m.yaml"
    path.write_text("jobs:\n  - {prompt: p, start_image_url: a.png}\n"
                    "  - {prompt: q, start_image_url: 'HTTPS://e.com/x.png'}\n"
                    "  - {prompt: r, start_image_url: 'https://e.com/x.png', elements: [{video_url: "
                    "'https://e.com/v.mp4'}]}\n")
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:  # pragma: no cover - a clearer failure than the traceback
        pytest.fail(str(exc.problems))
    assert image_urls(manifest) == ["HTTPS://e.com/x.png", "https://e.com/x.png"]


def test_problems_for_after_the_manifest_changed_point_at_each_job_line(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("jobs:\n  - id: a\n    prompt: p\n    start_image_url: https://e.com/x.png\n")
    manifest = load_manifest(path)
    checks = {"https://e.com/x.png": ImageCheck("https://e.com/x.png", False, "gone")}
    assert [str(p) for p in problems_for(manifest, checks)] == [f"{path}:4:22: jobs[0] (id=a).start_image_url: gone"]
    path.write_text("# edited since\n" + path.read_text())
    again = load_manifest(path)
    path.write_text("# and again\n" + path.read_text())  # `again` was loaded before this edit
    assert [str(p) for p in problems_for(again, checks)] == [f"{path}:3:1: jobs[0] (id=a).start_image_url: gone"]


async def test_an_images_size_is_judged_by_each_jobs_own_model(host, tmp_path):
    b = host.base
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(f"""\
        jobs:
          - id: kling
            model: kling/kling-3.0/pro/image-to-video
            prompt: a
            start_image_url: {b}/small.png
          - id: banana
            model: google/nano-banana-2-lite/edit
            prompt: b
            image_urls: [{b}/small.png, {b}/wide.png]
          - id: seedream
            model: bytedance/seedream-5.0-pro/image-to-image
            prompt: c
            image: [{b}/wide.png, {b}/page]
        """), encoding="utf-8")
    manifest = load_manifest(path)
    checks = await check_urls(image_urls(manifest), session=host.session, timeout=5)
    assert [str(p).removeprefix(f"{tmp_path}/") for p in problems_for(manifest, checks)] == [
        "m.yaml:5:22: jobs[0] (id=kling).start_image_url: the file at this URL is 200x200 px; Kling needs each "
        "side to be at least 300 px",
        f"m.yaml:13:{13 + len(b) + 11}: jobs[2] (id=seedream).image[1]: the image URL serves a web page "
        "(text/html), not an image: link the image file itself",
    ]
    assert sorted(doomed_jobs(manifest, checks)) == ["kling", "seedream"]
