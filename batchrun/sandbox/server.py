"""An emulator of RunComfy's Model API on loopback, with fault knobs, for tests and `--sandbox` runs.

It deliberately imports nothing from batchrun's client code, so tests never check the client
against itself: the contract lives here a second time, written from the API page.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import hashlib
import hmac
import json
import logging
import math
import random
import re
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from .model import MODEL_ID, MODELS, input_sha256, load_folder
from .queue import CANCELLED, COMPLETED, FAILED, FINISHED, IN_PROGRESS, IN_QUEUE, Job, SimQueue

__all__ = ["MODEL_ID", "Faults", "Sandbox", "input_sha256", "serve_forever"]

FAIL_MESSAGE = "content policy violation (sandbox)"
RANDOM_FAIL_MESSAGE = "generation failed (sandbox)"
VIDEO_NAME = "video.mp4"
# Room for a request carrying inline data: URI images (RunComfy's own clients cap one at 64 MiB).
MAX_BODY = 65 * 1024 * 1024
_NOT_JSON = object()
# Where the gate leaves the parsed submit body for the handler (RequestKey exists from aiohttp 3.11).
_INPUT: Any = web.RequestKey("sandbox_input", object) if hasattr(web, "RequestKey") else "sandbox_input"


@dataclass
class Faults:
    """What the sandbox gets wrong on purpose. Every knob is off by default except the fail marker.

    Rates are fractions in [0, 1] drawn from the sandbox's seeded RNG, one RNG per knob so that
    turning one knob on does not change what another one does.
    """

    rate_limit_every: int = 0  # every Nth authorised /v1/ call answers 429
    retry_after: str = "1"  # the Retry-After header of those 429s (seconds or an HTTP-date)
    error_5xx_rate: float = 0.0  # status/result/download calls answering 500 or 503
    http200_error_rate: float = 0.0  # status/result calls answering 200 with an error_code body
    url_ttl: float | None = None  # seconds an output URL stays valid; then /files answers 403
    cut_download_rate: float = 0.0  # downloads whose connection closes early...
    cut_after_bytes: int = 1024  # ...after this many body bytes (Content-Length stays full)
    cut_downloads: int = 0  # the first N video answers are cut like that, whatever the rate
    fail_marker: str = "[fail]"  # a prompt containing it ends `failed`; "" disables
    fail_rate: float = 0.0  # other jobs ending `failed` at random
    lose_submit_answer: int = 0  # the first N created jobs get a 502 non-JSON answer instead
    no_balance_after: int | None = None  # after N created jobs, submits answer 402 / 400002
    odd_statuses: bool = False  # in-progress jobs report `starting` then `processing`
    result_refused_until_finished: int | None = None  # unlike the docs, result answers this HTTP status
    # (e.g. 404 or 409) for an unfinished job instead of its current status
    # -- the storage host (what /files/... serves) --
    not_media_downloads: int = 0  # the first N download answers are 200 with the body below instead of the
    not_media_body: bytes = b"<html><body><h1>This link has expired</h1></body></html>"  # video, with a
    not_media_type: str = "text/html"  # correct Content-Length and this Content-Type
    download_encoding: str | None = None  # "gzip" or "deflate": the video is stored encoded and sent with
    # that Content-Encoding whatever the client asked (S3 objects with such metadata); Range counts encoded bytes
    replace_video_after: int | None = None  # after N download answers the file changes: new bytes, new ETag
    replacement_video: bytes | None = None  # ...these bytes (default: the video with its tail reversed)
    ignore_if_range: bool = False  # answer a Range from the current file even when If-Range names another
    cut_framing: str = "length"  # how a cut download is framed: "length" (Content-Length promised) or
    # "chunked" (no Content-Length; the connection closes mid-body, with no final chunk)
    output_host: str | None = None  # output URLs name this host instead of the sandbox's (e.g. "localhost",
    # "10.0.0.7", "[::1]"), same port
    redirect_downloads_to: str | None = None  # the storage host answers 302 to this base URL + the same path
    videos_per_job: int = 1  # a completed job's videos; over 1 they come as `output.videos` (a list)
    balance_error: int | None = None  # the balance call answers this HTTP status (e.g. 503) instead
    show_input: bool = False  # status and result answers also carry the job's `input` (the docs do not)
    # Answers that are negative at first and right a moment later (eventual consistency), per job:
    unknown_first_calls: int = 0  # its first N status/result calls answer 404 404001
    outputs_late_calls: int = 0  # its first N result calls once completed have no output and no error
    result_404_after_completion: int = 0  # its first N result calls once completed answer 404 404001
    # Time as the server tells it:
    clock_offset: float = 0.0  # the server's clock minus the true time, seconds (its Date header shows it)
    retry_after_in: float | None = None  # if set, 429s carry Retry-After as an HTTP-date this many
    # seconds after the server's own clock (instead of `retry_after`)
    stamps: str = "full"  # `created_at`/`finished_at` of a result: "full" (microseconds), "seconds" (cut to
    # whole seconds, as APIs that print `...T10:00:03Z` do) or "none" (left out)
    # An account-wide limit on submits: at most `submit_limit` jobs created per `submit_window` seconds
    # (a fixed window on the sandbox clock); more answer 429 with Retry-After = whole seconds until the
    # next window. 0 disables.
    submit_limit: int = 0
    submit_window: float = 10.0


def _sample_video() -> bytes:
    return resources.files("batchrun.sandbox").joinpath("sample.mp4").read_bytes()


# What a finished job of each output kind returns: (file name, result key, sample file, Content-Type).
# Video has its own path (`videos_per_job`, `replace_video_after`, `video_bytes`).
OTHER_OUTPUTS = {"image": ("image.png", "images", "sample.png", "image/png"),
                 "audio": ("audio.wav", "audio", "sample.wav", "audio/wav")}


def _error(status: int, code: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error_code": code, "error_message": message, **extra}, status=status)


class Sandbox:
    """An in-process emulator of RunComfy's Model API, served on a real loopback socket.

    ``render_seconds`` is a float (fixed), a pair ``(low, high)`` (uniform, drawn from the seeded RNG)
    or a callable ``(rng) -> float`` giving each job's render time; ``render_times()`` gives back the
    times drawn, in submit order, for a bench's exact ideal (`queue.ideal_makespan`).
    ``clock`` drives the simulation (tests pass a fake clock and advance it). Counters for tests:
    ``posts_total``, ``posts_by_input`` / ``posts_for()``, ``jobs_created``, ``jobs``,
    ``jobs_by_input`` / ``jobs_for()``, ``peak_in_flight``, ``calls``, ``polls_by_state``, ``faults_served``.

    The account's balance (``GET /prod/v2/balance``) starts at ``balance_usd`` and goes down by a
    job's price when its render completes (failed and cancelled jobs are free); a submit whose price
    the balance does not cover answers 402 / 400002. ``balance_usd`` small runs the account dry.
    """

    def __init__(
        self,
        capacity: int = 4,
        render_seconds: float | tuple[float, float] | Callable[[random.Random], float] = 0.0,
        faults: Faults | None = None,
        token: str | None = None,
        video_bytes: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        balance_usd: float = 100_000.0,
        models_dir: Path | None = None,
    ) -> None:
        self.faults = faults or Faults()
        self.balance_usd = float(balance_usd)
        self.render_seconds = render_seconds
        self.clock = clock
        self.video_bytes = _sample_video() if video_bytes is None else video_bytes
        # Every shipped model, and a user folder's (a manifest's `models_dir` or $BATCHRUN_MODELS), which win.
        self.models = {**MODELS, **(load_folder(Path(models_dir)) if models_dir is not None else {})}
        self.queue = SimQueue(capacity, on_finish=self._charge)
        self._token = token
        # Request ids are not drawn from these: see `_submit`.
        knobs = ("render", "fail", "5xx", "200err", "cut", "sig")
        self._rngs = {name: random.Random(f"{seed}/{name}") for name in knobs}
        self._sig_key = self._rngs["sig"].randbytes(16)
        # Map the sandbox clock (monotonic or fake) onto wall time for created_at / finished_at.
        self._clock0, self._wall0 = clock(), time.time()

        self.posts_total = 0
        self.posts_by_input: Counter[str] = Counter()
        self.jobs_created = 0
        self.jobs: dict[str, Job] = {}
        self.jobs_by_input: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.polls_by_state: Counter[str] = Counter()  # status and result calls, by the job's state then
        self.faults_served: Counter[str] = Counter()  # answers replaced by a fault, by kind
        self._api_calls = 0
        self._answers_lost = 0
        self._downloads_served = 0
        self._downloads_cut = 0
        self._stored: dict[int | str, tuple[bytes, bytes, str, str]] = {}  # by video version or kind
        self._window: tuple[float, int] = (float("-inf"), 0)  # (start, jobs created) of the submit window
        self._asked: Counter[tuple[str, str]] = Counter()  # (request id, phase) -> calls, for late answers

        self.base_url: str | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[web.middleware(self._gate_fn())])
        r = self.app.router
        r.add_post("/v1/models/{model_id:.+}", self._submit, name="submit")
        r.add_get("/v1/requests/{request_id}/status", self._status, name="status")
        r.add_get("/v1/requests/{request_id}/result", self._result, name="result")
        r.add_post("/v1/requests/{request_id}/cancel", self._cancel, name="cancel")
        r.add_get("/files/{request_id}/{name}", self._download, name="download")
        r.add_get("/prod/v2/balance", self._balance, name="balance")
        r.add_get("/v1/models", self._catalogue, name="catalogue")
        r.add_get("/v1/models/{model_id:.+}", self._model_entry, name="model")

    # -- counters ---------------------------------------------------------------------------

    @property
    def downloads_served(self) -> int:
        """Output downloads answered so far (any status): what a re-run that needs no file must leave at 0."""
        return self._downloads_served

    @property
    def peak_in_flight(self) -> int:
        return self.queue.peak_in_flight

    @property
    def in_flight(self) -> int:
        self.queue.advance(self.clock())
        return self.queue.in_flight

    def posts_for(self, input_dict: Any) -> int:
        """How many POSTs carried this input, whatever they were answered."""
        return self.posts_by_input[input_sha256(input_dict)]

    def jobs_for(self, input_dict: Any) -> int:
        """How many jobs (paid requests) were created for this input."""
        return self.jobs_by_input[input_sha256(input_dict)]

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the base URL."""
        kwargs = {} if access_log else {"access_log": None}
        self._runner = web.AppRunner(self.app, **kwargs)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_port = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _now(self) -> float:
        now = self.clock()
        self.queue.advance(now)
        return now

    def _iso(self, t: float | None) -> str | None:
        if t is None or self.faults.stamps == "none":
            return None
        wall = self._wall0 + (t - self._clock0)
        if self.faults.stamps == "seconds":
            wall = math.floor(wall)
        return datetime.fromtimestamp(wall, timezone.utc).isoformat()

    def render_times(self) -> list[float]:
        """Each created job's render time in seconds, in the order the jobs were created."""
        return [job.render_seconds for job in self.jobs.values()]

    def _base(self, request: web.Request) -> str:
        return self.base_url or str(request.url.origin())

    def _roll(self, knob: str, rate: float) -> bool:
        return rate > 0 and self._rngs[knob].random() < rate

    def _gate_fn(self) -> Callable:
        # aiohttp marks middlewares with an attribute, which a bound method cannot carry.
        async def gate(request: web.Request, handler: Callable) -> web.StreamResponse:
            return await self._gate(request, handler)

        return gate

    def _http_date(self, after: float = 0.0) -> str:
        """The server's clock (the sandbox clock on wall time, plus `clock_offset`) as an HTTP-date."""
        now = self._wall0 + (self.clock() - self._clock0) + self.faults.clock_offset
        return formatdate(now + after, usegmt=True)

    async def _gate(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        resp = await self._gate_checks(request, handler)
        if not resp.prepared:  # a streamed download has sent its headers already
            resp.headers["Date"] = self._http_date()
        return resp

    def _late(self, job: Job, phase: str, calls: int) -> bool:
        """Whether this call is one of the first `calls` of `job` in `phase` (then counted as a fault)."""
        key = (job.request_id, phase)
        if self._asked[key] >= calls:
            return False
        self._asked[key] += 1
        self.faults_served[phase] += 1
        return True

    async def _gate_checks(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Count every call, then apply auth and the rate limit to the /v1/ API."""
        kind = getattr(request.match_info.route, "name", None)
        if kind is None:
            return await handler(request)
        self.calls[kind] += 1
        if kind == "download":
            return await handler(request)
        if kind == "submit":
            self.posts_total += 1
            try:
                request[_INPUT] = json.loads(await request.read())
                self.posts_by_input[input_sha256(request[_INPUT])] += 1
            except ValueError:
                request[_INPUT] = _NOT_JSON
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip() or (
            self._token is not None and not hmac.compare_digest(given.strip(), self._token)
        ):
            return _error(401, 401001, "unauthorized: a valid 'Authorization: Bearer <token>' is required")
        if kind == "balance":  # the account API host: not part of the Model API's rate limit
            return await handler(request)
        self._api_calls += 1
        every = self.faults.rate_limit_every
        if every and self._api_calls % every == 0:
            self.faults_served["rate_limit"] += 1
            resp = _error(429, 429001, "rate limited (sandbox)")
            after = self.faults.retry_after_in
            resp.headers["Retry-After"] = self.faults.retry_after if after is None else self._http_date(after)
            return resp
        return await handler(request)

    def _job(self, request: web.Request) -> Job:
        job = self.jobs.get(request.match_info["request_id"])
        if job is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error_code": 404001, "error_message": "request not found"}),
                content_type="application/json",
            )
        return job

    def _server_fault(self, with_http200: bool) -> web.Response | None:
        if self._roll("5xx", self.faults.error_5xx_rate):
            self.faults_served["5xx"] += 1
            if self._rngs["5xx"].random() < 0.5:
                return _error(500, 500001, "internal error")
            return _error(503, 500001, "service unavailable")
        if with_http200 and self._roll("200err", self.faults.http200_error_rate):
            self.faults_served["http200_error"] += 1
            return _error(200, 500001, "internal error")
        return None

    def _urls(self, base: str, request_id: str) -> dict[str, str]:
        root = f"{base}/v1/requests/{request_id}"
        return {f"{kind}_url": f"{root}/{kind}" for kind in ("status", "result", "cancel")}

    def _shown_status(self, job: Job, now: float) -> str:
        if job.status == IN_PROGRESS and self.faults.odd_statuses:
            halfway = job.started_at + job.render_seconds / 2
            return "starting" if now < halfway else "processing"
        return job.status

    def _status_body(self, request: web.Request, job: Job, now: float) -> dict[str, Any]:
        body = {"request_id": job.request_id, "status": self._shown_status(job, now)}
        if job.status == IN_QUEUE:
            body["queue_position"] = self.queue.position(job)
        urls = self._urls(self._base(request), job.request_id)
        if self.faults.show_input:
            body["input"] = job.input
        return body | {"status_url": urls["status_url"], "result_url": urls["result_url"]}

    def _sign(self, path: str, expires: str) -> str:
        return hmac.new(self._sig_key, f"{path}?{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def _video_names(self) -> list[str]:
        stem, dot, ext = VIDEO_NAME.rpartition(".")
        return [VIDEO_NAME] + [f"{stem}-{n}{dot}{ext}" for n in range(2, self.faults.videos_per_job + 1)]

    def _kind(self, job: Job) -> str:
        model = self.models.get(job.model_id)
        return model.output_kind if model is not None else "video"

    def _output_names(self, job: Job) -> list[str]:
        kind = self._kind(job)
        return self._video_names() if kind == "video" else [OTHER_OUTPUTS[kind][0]]

    def _output(self, request: web.Request, job: Job, now: float) -> dict[str, Any]:
        kind = self._kind(job)
        if kind != "video":
            name, key = OTHER_OUTPUTS[kind][:2]
            url = self._video_url(request, job, now, name)
            return {key: [url] if key.endswith("s") else url}
        urls = [self._video_url(request, job, now, name) for name in self._video_names()]
        return {"video": urls[0]} if len(urls) == 1 else {"videos": urls}

    def _stored_other(self, kind: str) -> tuple[bytes, str, str]:
        """The sample file of an image or audio output, its ETag and Last-Modified."""
        cached = self._stored.get(kind)
        if cached is None:
            data = resources.files("batchrun.sandbox").joinpath(OTHER_OUTPUTS[kind][2]).read_bytes()
            cached = self._stored[kind] = (data, *self._encode(data, 0))
        return cached[1:]

    def _video_url(self, request: web.Request, job: Job, now: float, name: str = VIDEO_NAME) -> str:
        path = f"/files/{job.request_id}/{name}"
        job.urls_minted += 1
        base = self._base(request)
        if self.faults.output_host:
            base = f"http://{self.faults.output_host}:{base.rsplit(':', 1)[1]}"
        if self.faults.url_ttl is None:
            return base + path
        expires = f"{now + self.faults.url_ttl:.6f}"
        return f"{base}{path}?expires={expires}&sig={self._sign(path, expires)}"

    def _stored_video(self) -> tuple[bytes, str, str]:
        """The file the storage host holds now, its ETag and Last-Modified (both change with the file)."""
        after = self.faults.replace_video_after
        version = 1 if after is not None and self._downloads_served > after else 0
        cached = self._stored.get(version)
        if cached is None or cached[0] is not self.video_bytes:  # computed once per file, not per download
            source = self.video_bytes
            data = source if version == 0 else self.faults.replacement_video or source[:32] + source[32:][::-1]
            cached = self._stored[version] = (source, *self._encode(data, version))
        return cached[1:]

    def _encode(self, data: bytes, version: int) -> tuple[bytes, str, str]:
        encoding = self.faults.download_encoding
        if encoding == "gzip":
            data = gzip.compress(data, mtime=0)
        elif encoding == "deflate":
            data = zlib.compress(data)
        etag = f'"{hashlib.sha256(data).hexdigest()[:20]}"'
        return data, etag, email.utils.formatdate(self._wall0 - 86400 + version, usegmt=True)

    # -- the API ----------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.Response:
        model = self.models.get(request.match_info["model_id"])
        if model is None:
            return _error(400, 400001, f"unknown model: {request.match_info['model_id']}")
        body = request[_INPUT]
        if body is _NOT_JSON:
            detail = [{"loc": ["body"], "msg": "the body is not valid JSON", "type": "json_invalid"}]
            return _error(422, 422001, "validation error: the body is not valid JSON", detail=detail)
        problems = model.problems(body)
        if problems:
            first = problems[0]
            where = ".".join(map(str, first["loc"][1:])) or "body"
            return _error(422, 422001, f"validation error: {where}: {first['msg']}", detail=problems)
        limit = self.faults.no_balance_after
        if (limit is not None and self.jobs_created >= limit) or self.balance_usd < model.cost(body):
            return _error(402, 400002, "no remaining balance")

        now = self._now()
        if self.faults.submit_limit:
            window = self.faults.submit_window
            start = math.floor(now / window) * window
            used = self._window[1] if self._window[0] == start else 0
            if used >= self.faults.submit_limit:
                self.faults_served["submit_limit"] += 1
                resp = _error(429, 429001, "too many requests for this account (sandbox)")
                resp.headers["Retry-After"] = str(max(1, math.ceil(start + window - now)))
                return resp
            self._window = (start, used + 1)
        job = Job(
            # Random like RunComfy's, never from the seed: a sandbox started later (a resumed `--sandbox`
            # run, a restarted `batchrun sandbox`) must not hand out ids an earlier one already gave.
            request_id=str(uuid.uuid4()),
            model_id=model.model_id,
            input=body,
            input_sha256=input_sha256(body),
            render_seconds=self._render_time(),
            created_at=now,
            error=self._planned_error(body),
        )
        self.jobs[job.request_id] = job
        self.jobs_created += 1
        self.jobs_by_input[job.input_sha256] += 1
        self.queue.add(job, now)

        if self._answers_lost < self.faults.lose_submit_answer:
            # The job exists and will be billed, but the client never learns its id.
            self._answers_lost += 1
            job.lost_answer = True
            return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                                content_type="text/html")
        urls = self._urls(self._base(request), job.request_id)
        return web.json_response({"request_id": job.request_id, **urls})

    def _render_time(self) -> float:
        spec = self.render_seconds
        if isinstance(spec, tuple):
            seconds = self._rngs["render"].uniform(*spec)
        else:
            seconds = spec(self._rngs["render"]) if callable(spec) else spec
        return max(0.0, float(seconds))

    def _planned_error(self, body: dict[str, Any]) -> str | None:
        marker = self.faults.fail_marker
        prompts = [body.get("prompt", "")] + [seg.get("prompt", "") for seg in body.get("multi_prompt") or []]
        if marker and any(marker in p for p in prompts):
            return FAIL_MESSAGE
        if self._roll("fail", self.faults.fail_rate):
            return RANDOM_FAIL_MESSAGE
        return None

    def _charge(self, job: Job) -> None:
        if job.error is None:
            self.balance_usd -= self.models[job.model_id].cost(job.input)

    async def _catalogue(self, request: web.Request) -> web.Response:
        """GET /v1/models[?include_schema=true]: every registered model's entry."""
        with_schema = request.query.get("include_schema", "").lower() in ("true", "1")
        entries = [m.catalogue_entry(with_schema) for m in sorted(self.models.values(), key=lambda m: m.model_id)]
        return web.json_response({"models": entries})

    async def _model_entry(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model_id}: its price and input schema, as the catalogue publishes them."""
        model = self.models.get(request.match_info["model_id"])
        if model is None:
            return _error(400, 400001, f"unknown model: {request.match_info['model_id']}")
        return web.json_response(model.catalogue_entry(True))

    async def _balance(self, request: web.Request) -> web.Response:
        self._now()  # renders that ended by now are charged
        if self.faults.balance_error:
            self.faults_served["balance_error"] += 1
            return _error(self.faults.balance_error, 500001, "balance unavailable (sandbox)")
        usd = round(self.balance_usd, 6)
        return web.json_response({"balance_usd": usd, "balance_microdollars": round(usd * 1_000_000),
                                  "currency": "USD"})

    def _not_found_yet(self, job: Job) -> web.Response | None:
        if self._late(job, "unknown_first_calls", self.faults.unknown_first_calls):
            return _error(404, 404001, "request not found")
        return None

    async def _status(self, request: web.Request) -> web.Response:
        now = self._now()
        job = self._job(request)
        self.polls_by_state[job.status] += 1
        late = self._not_found_yet(job)
        if late:
            return late
        fault = self._server_fault(with_http200=True)
        return fault or web.json_response(self._status_body(request, job, now))

    async def _result(self, request: web.Request) -> web.Response:
        now = self._now()
        job = self._job(request)
        self.polls_by_state[job.status] += 1
        fault = self._not_found_yet(job) or self._server_fault(with_http200=True)
        if fault:
            return fault
        if job.status == COMPLETED and self._late(job, "result_404_after_completion",
                                                  self.faults.result_404_after_completion):
            return _error(404, 404001, "request not found")
        outputs_late = job.status == COMPLETED and self._late(job, "outputs_late_calls", self.faults.outputs_late_calls)
        if job.status not in FINISHED:
            refusal = self.faults.result_refused_until_finished
            if refusal:
                self.faults_served["result_refused"] += 1
                return _error(refusal, refusal, "result not ready")
            return web.json_response(self._status_body(request, job, now))
        body: dict[str, Any] = {
            "request_id": job.request_id,
            "status": job.status,
            "output": (self._output(request, job, now)
                       if job.status == COMPLETED and not outputs_late else None),
            "created_at": self._iso(job.created_at),
            "finished_at": self._iso(job.finished_at),
            "error": job.error if job.status == FAILED else None,
        }
        if self.faults.show_input:
            body["input"] = job.input
        if request.query.get("include_cost", "").lower() in ("true", "1"):
            body["cost"] = self.models[job.model_id].cost(job.input) if job.status == COMPLETED else 0.0
        return web.json_response(body)

    async def _cancel(self, request: web.Request) -> web.Response:
        now = self._now()
        job = self._job(request)
        if self.queue.cancel(job, now):
            return web.json_response({"request_id": job.request_id, "outcome": CANCELLED})
        return web.json_response({"request_id": job.request_id, "outcome": "not_cancellable",
                                  "status": self._shown_status(job, now)})

    # -- the storage host -------------------------------------------------------------------

    async def _download(self, request: web.Request) -> web.StreamResponse:
        now = self._now()
        job = self.jobs.get(request.match_info["request_id"])
        if job is None or job.status != COMPLETED or request.match_info["name"] not in self._output_names(job):
            return web.Response(status=404, text="NoSuchKey")
        fault = self._server_fault(with_http200=False)
        if fault:
            return fault
        if self.faults.url_ttl is not None:
            expires = request.query.get("expires", "")
            signed = hmac.compare_digest(request.query.get("sig", ""), self._sign(request.path, expires))
            if not signed or now > float(expires):
                return web.Response(status=403, text="AccessDenied: Request has expired")

        self._downloads_served += 1
        if self._downloads_served <= self.faults.not_media_downloads:
            self.faults_served["not_media"] += 1
            return web.Response(body=self.faults.not_media_body, headers={"Content-Type": self.faults.not_media_type})
        if self.faults.redirect_downloads_to:
            self.faults_served["redirect"] += 1
            raise web.HTTPFound(self.faults.redirect_downloads_to.rstrip("/") + request.path_qs)

        kind = self._kind(job)
        data, etag, modified = self._stored_video() if kind == "video" else self._stored_other(kind)
        total = len(data)
        content_type = "video/mp4" if kind == "video" else OTHER_OUTPUTS[kind][3]
        headers = {"Accept-Ranges": "bytes", "Content-Type": content_type, "ETag": etag, "Last-Modified": modified}
        if self.faults.download_encoding:
            headers["Content-Encoding"] = self.faults.download_encoding
        status, start, end = 200, 0, total - 1
        wanted = _parse_range(request.headers.get("Range"), total)
        if_range = request.headers.get("If-Range")
        if wanted is not None and if_range and if_range not in (etag, modified) and not self.faults.ignore_if_range:
            wanted = None  # RFC 9110: a Range whose If-Range names another file gets the whole new file
        if wanted == "unsatisfiable":
            return web.Response(status=416, headers={"Content-Range": f"bytes */{total}"})
        if wanted is not None:
            status, (start, end) = 206, wanted
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = data[start : end + 1]

        if request.method == "GET" and (self._downloads_cut < self.faults.cut_downloads
                                        or self._roll("cut", self.faults.cut_download_rate)):
            self._downloads_cut += 1
            self.faults_served["cut"] += 1
            # A dropped connection: the full Content-Length is promised, fewer bytes arrive.
            resp = web.StreamResponse(status=status, headers=headers)
            if self.faults.cut_framing == "chunked":
                resp.enable_chunked_encoding()
            else:
                resp.content_length = len(body)
            resp.force_close()
            await resp.prepare(request)
            await resp.write(body[: self.faults.cut_after_bytes])
            if self.faults.cut_framing == "chunked" and request.transport is not None:
                request.transport.close()  # before the final chunk: the body ends early, framing unfinished
            return resp
        return web.Response(status=status, body=body, headers=headers)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(header: str | None, total: int) -> tuple[int, int] | str | None:
    """One byte range as (first, last), "unsatisfiable", or None to send the whole file.

    Like most storage hosts, a header it cannot parse (or a multi-range) is ignored.
    """
    match = _RANGE.match((header or "").strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        return (max(0, total - n), total - 1) if n > 0 and total > 0 else "unsatisfiable"
    start = int(first)
    end = min(int(last), total - 1) if last else total - 1
    if start >= total:
        return "unsatisfiable"
    if end < start:
        return None
    return start, end


def serve_forever(host: str = "127.0.0.1", port: int = 8765, **kwargs: Any) -> None:
    """Serve a sandbox until Ctrl-C (`batchrun sandbox --port N`); kwargs go to ``Sandbox``."""

    access = logging.getLogger("aiohttp.access")
    if not access.handlers:
        access.addHandler(logging.StreamHandler(sys.stdout))
        access.setLevel(logging.INFO)

    async def main() -> None:
        sandbox = Sandbox(**kwargs)
        base = await sandbox.start(host, port, access_log=True)
        print(f"batchrun sandbox: RunComfy Model API emulator at {base}", flush=True)
        # A line to paste into a shell as it is: no <placeholder>, which a shell reads as a redirect.
        if kwargs.get("token"):
            print(f"  try: RUNCOMFY_BASE_URL={base} batchrun run MANIFEST  (with RUNCOMFY_API_TOKEN set to "
                  "the token this sandbox was given)", flush=True)
        else:
            print(f"  try: RUNCOMFY_BASE_URL={base} RUNCOMFY_API_TOKEN=sandbox batchrun run MANIFEST "
                  "(any token is accepted)", flush=True)
        print("  Ctrl-C to stop", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sandbox.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        print("sandbox stopped", flush=True)
