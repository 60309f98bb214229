"""Preflight of a manifest's image URLs: can RunComfy fetch each one, and would Kling accept the image?

Checked before paying for jobs that would fail: the URL answers 2xx to an anonymous GET (many hosts
refuse HEAD, so a GET of the first 64 KiB with ``Range``), within 5 redirects and no loop; it serves an
image (not a web page; ``application/octet-stream`` is fine when the bytes are an image) of a format Kling
accepts, no larger than 50 MiB (from ``Content-Range`` or ``Content-Length``, so a huge file is refused
without downloading it), and, where the header is in those first bytes, each side at least 300 px with an
aspect ratio within 1:2.5 and 2.5:1 (the same rules as local files, `batchrun.imageinfo`).

No credentials are ever sent: pass a session of its own, not the API client's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

import aiohttp
from yarl import URL

from batchrun import imageinfo, schema
from batchrun.errors import Problem
from batchrun.manifest import Manifest

PREFIX_BYTES = imageinfo.HEADER_BYTES
MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}
_HEADERS = {
    "Range": f"bytes=0-{PREFIX_BYTES - 1}",
    "Accept": "image/*,*/*;q=0.8",
    "Accept-Encoding": "identity",  # the bytes as stored, to read the image's header
    "User-Agent": "batchrun-preflight (image URL check)",
}
_BINARY_TYPES = {"application/octet-stream", "binary/octet-stream", "application/binary", "application/unknown"}
_HTML_TYPES = {"text/html", "application/xhtml+xml"}
_CONTENT_RANGE = re.compile(r"bytes\s+(?:\d+-\d+|\*)/(\d+|\*)", re.IGNORECASE)


@dataclass(frozen=True)
class ImageCheck:
    """What preflight found at one URL. `problem` says why it is not `ok`; `bytes` is the file's total
    size when the server said; `width`/`height` when the header was within the first 64 KiB."""

    url: str
    ok: bool
    problem: str | None = None
    content_type: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None


def image_urls(manifest: Manifest) -> list[str]:
    """The distinct remote https:// image URLs of the manifest's jobs, in manifest order."""
    urls: dict[str, None] = {}
    for job in manifest.jobs:
        for _, value in schema.image_values(manifest.model_of(job), job.input):
            if value[:8].lower() == "https://":
                urls.setdefault(value)
    return list(urls)


async def check_urls(
    urls: Iterable[str],
    *,
    session: aiohttp.ClientSession,
    concurrency: int = 8,
    timeout: float = 15.0,
    max_bytes: int = 50 * 1024**2,
    cached: Mapping[str, ImageCheck] | None = None,
) -> dict[str, ImageCheck]:
    """Check each distinct URL once, at most `concurrency` at a time, each within `timeout` seconds
    (redirects and reading included). URLs in `cached` are not fetched again. The result is in the
    order of `urls`. Never raises for a bad URL: its ImageCheck says what is wrong."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if "Authorization" in session.headers:  # CIMultiDict: any case
        raise ValueError("preflight sends no credentials: pass a session without an Authorization header")
    order = list(dict.fromkeys(urls))
    results: dict[str, ImageCheck] = {url: cached[url] for url in order if cached and url in cached}
    todo = iter([url for url in order if url not in results])

    async def worker() -> None:
        for url in todo:  # a shared iterator: each URL is taken by one worker
            results[url] = await _check(url, session, timeout, max_bytes)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(order) - len(results)))))
    return {url: results[url] for url in order}


def problem_for(model, path: tuple, check: ImageCheck) -> str | None:
    """What is wrong with `check`'s image for `model`'s field at `path`, or None. `check_urls` judges an
    image's size by Kling's limits; a failure of those alone is judged again by the model's own
    (``rules.image_limits``, ``rules.validations``: see `schema.image_limit_problems`)."""
    failed = None if check.ok else check.problem or "the image URL failed its check"
    if check.width is None or check.height is None:
        return failed
    kling = "; ".join(f"the file at this URL {p}" for p in imageinfo.size_problems(check.width, check.height))
    if failed is not None and check.problem != kling:
        return failed  # not (only) its size: unreachable, not an image...
    own = schema.image_limit_problems(model, path, check.width, check.height, check.bytes)
    return "; ".join(f"the file at this URL {p}" for p in own) or None


def problems_for(manifest: Manifest, checks: Mapping[str, ImageCheck]) -> list[Problem]:
    """A located problem for each job field whose image URL failed its check (once per place: an URL in
    `defaults` or in a matrix is reported where it is written, not once per job)."""
    problems: list[Problem] = []
    seen: set[tuple] = set()
    for job in manifest.jobs:
        model = manifest.model_of(job)
        for path, value in schema.image_values(model, job.input):
            check = checks.get(value)
            problem = None if check is None else problem_for(model, path, check)
            if problem is None:
                continue
            file, line, column, where = job.locate(path)
            key = (file, line, column, where, problem)
            if key not in seen:
                seen.add(key)
                problems.append(Problem(file, line, column, where, problem))
    manifest_file = str(manifest.path)
    problems.sort(key=lambda p: (p.file != manifest_file, p.file, p.line, p.column))
    return problems


# --- one URL --------------------------------------------------------------------------------------


async def _check(url: str, session: aiohttp.ClientSession, timeout: float, max_bytes: int) -> ImageCheck:
    try:
        return await asyncio.wait_for(_fetch(url, session, max_bytes), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return ImageCheck(url, False, f"the image URL did not answer within {timeout:g} s")
    except aiohttp.ClientConnectorCertificateError as exc:
        return ImageCheck(url, False, f"the image URL's TLS certificate is not valid: {exc.certificate_error}")
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror if exc.os_error and exc.os_error.strerror else str(exc.os_error or exc)
        return ImageCheck(url, False, f"cannot connect to {exc.host}: {reason}")
    except aiohttp.ClientSSLError as exc:
        return ImageCheck(url, False, f"TLS failed with the image URL's host: {exc}")
    except aiohttp.InvalidURL:
        return ImageCheck(url, False, "the image URL is not a valid URL")
    except aiohttp.ClientError as exc:
        return ImageCheck(url, False, f"the image URL could not be fetched: {type(exc).__name__}: {exc}"[:300])


def _status_problem(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    answer = f"the image URL answers HTTP {status}{' ' + phrase if phrase else ''}"
    if status in (401, 403):
        return answer + ": the host must let anyone fetch it (no login, cookies or bot blocking)"
    if status in (404, 410):
        return answer + ": check the address"
    if status == 429 or status >= 500:
        return answer + " (the host may be busy or down; try again later)"
    return answer


async def _fetch(url: str, session: aiohttp.ClientSession, max_bytes: int) -> ImageCheck:
    visited = [URL(url)]
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(visited[-1], headers=_HEADERS, allow_redirects=False) as response:
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    return ImageCheck(url, False, f"the image URL redirects (HTTP {response.status}) without "
                                                  "saying where")
                target = response.url.join(URL(location))
                if target in visited:
                    return ImageCheck(url, False, f"the image URL redirects in a loop (back to {target})")
                if target.scheme not in ("http", "https"):
                    return ImageCheck(url, False, f"the image URL redirects to {str(target)[:100]}, not to a "
                                                  "web address")
                visited.append(target)
                continue
            if not 200 <= response.status < 300:
                return ImageCheck(url, False, _status_problem(response.status))
            return await _judge(url, response, max_bytes)
    return ImageCheck(url, False, f"the image URL redirects more than {MAX_REDIRECTS} times")


def _total_size(response: aiohttp.ClientResponse) -> int | None:
    """The whole file's size: from Content-Range for a partial answer, else Content-Length."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        return int(match.group(1)) if match and match.group(1).isdigit() else None
    length = response.headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None


async def _read_prefix(response: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    while len(data) < limit:
        chunk = await response.content.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def _judge(url: str, response: aiohttp.ClientResponse, max_bytes: int) -> ImageCheck:
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower() or None
    total = _total_size(response)

    def result(problem: str | None = None, facts: imageinfo.ImageFacts | None = None) -> ImageCheck:
        width, height = (facts.width, facts.height) if facts else (None, None)
        return ImageCheck(url, problem is None, problem, content_type, total, width, height)

    if total is not None and total > max_bytes:
        response.close()  # drop the connection: nothing of a huge body is read
        return result(f"the file at this URL is {total / 2**20:,.1f} MiB; images may be at most "
                      f"{max_bytes / 2**20:g} MiB")
    if content_type in _HTML_TYPES:
        response.close()
        return result(f"the image URL serves a web page ({content_type}), not an image: link the image file itself")
    prefix = await _read_prefix(response, PREFIX_BYTES)
    if not response.content.at_eof():
        response.close()  # the server ignored Range: stop the transfer here
    facts = imageinfo.inspect(prefix)
    if content_type and not content_type.startswith("image/") and content_type not in _BINARY_TYPES:
        return result(f"the image URL serves {content_type}, not an image", facts)
    problems = imageinfo.image_problems(facts)
    if problems:
        text = "; ".join(f"the file at this URL {problem}" for problem in problems)
        if not facts.accepted and content_type:
            text += f" (served as {content_type})"
        return result(text, facts)
    return result(None, facts)


# --- for callers: a whole manifest ------------------------------------------------------------------


async def check_manifest(
    manifest: Manifest,
    *,
    cached: Mapping[str, ImageCheck] | None = None,
    ssl: object = None,
    concurrency: int = 8,
    timeout: float = 15.0,
) -> dict[str, ImageCheck]:
    """Check every distinct image URL of `manifest` with a session of its own (no credentials).
    `ssl` goes to aiohttp's connector (tests pass a context that trusts their own CA)."""
    connector = aiohttp.TCPConnector(ssl=ssl if ssl is not None else True)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await check_urls(image_urls(manifest), session=session, concurrency=concurrency, timeout=timeout,
                                cached=cached)


def doomed_jobs(manifest: Manifest, checks: Mapping[str, ImageCheck]) -> dict[str, str]:
    """Job id → why an image URL of it failed preflight (the first such reason)."""
    doomed: dict[str, str] = {}
    for job in manifest.jobs:
        model = manifest.model_of(job)
        for path, value in schema.image_values(model, job.input):
            check = checks.get(value)
            problem = None if check is None else problem_for(model, path, check)
            if problem is not None and job.id not in doomed:
                field = "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)
                doomed[job.id] = f"{field.lstrip('.')}: {problem}"
    return doomed
