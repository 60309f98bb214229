"""A RunComfy-like API on a real loopback socket whose answers a test scripts, call by call.

Unlike the sandbox (a faithful emulator), this server exists to misbehave: every answer can be
replaced by a test's `script(call, job, request)`, which returns a `web.Response` or None for the
default answer. It remembers the bearer token it was sent (`token_seen`), so a script can echo it
back, and counts what a user's bill would show: POSTs per prompt and jobs created.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

VIDEO = resources.files("batchrun.sandbox").joinpath("sample.mp4").read_bytes()

Script = Callable[[str, "Job | None", web.Request], Awaitable[web.StreamResponse | None]]


@dataclass
class Job:
    request_id: str
    prompt: str
    calls: Counter[str] = field(default_factory=Counter)  # status/result/cancel calls for this job


def json_answer(status: int, body: Any, **headers: str) -> web.Response:
    text = body if isinstance(body, str) else json.dumps(body)
    return web.Response(status=status, text=text, content_type="application/json", headers=headers)


class HostileApi:
    """`async with HostileApi(script) as api:` serves on 127.0.0.1; `api.base_url` is the API base.

    Default answers: a submit creates a job (`req-N`) and answers its request id; status answers
    `completed`; result answers `completed` with one video at `/files/<id>/video.mp4` and a cost.
    """

    def __init__(self, script: Script | None = None):
        self.script = script
        self.jobs: dict[str, Job] = {}
        self.posts_by_prompt: Counter[str] = Counter()
        self.token_seen = ""
        self._ids = itertools.count(1)
        app = web.Application()
        app.router.add_post("/v1/models/{model:.*}", self._submit)
        app.router.add_get("/v1/requests/{rid}/{call:status|result}", self._job_call)
        app.router.add_post("/v1/requests/{rid}/{call:cancel}", self._job_call)
        app.router.add_get("/files/{rid}/{name}", self._file)
        self._server = TestServer(app)
        self.base_url = ""

    async def __aenter__(self) -> HostileApi:
        await self._server.start_server()
        self.base_url = str(self._server.make_url("")).rstrip("/")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.close()

    def posts_for(self, job_id: str) -> int:
        """POSTs whose prompt names `job_id` (tests use `helpers.job`, whose prompt ends with `(id)`)."""
        return sum(n for prompt, n in self.posts_by_prompt.items() if prompt.endswith(f"({job_id})"))

    def _remember_token(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme == "Bearer" and token:
            self.token_seen = token

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        self._remember_token(request)
        prompt = str((await request.json()).get("prompt", ""))
        self.posts_by_prompt[prompt] += 1
        job = Job(f"req-{next(self._ids)}", prompt)
        self.jobs[job.request_id] = job  # created before the answer: what a lost answer would leave
        scripted = await self.script("submit", job, request) if self.script else None
        return scripted or json_answer(200, {"request_id": job.request_id})

    async def _job_call(self, request: web.Request) -> web.StreamResponse:
        self._remember_token(request)
        call = request.match_info["call"]
        job = self.jobs.get(request.match_info["rid"])
        if job is not None:
            job.calls[call] += 1
        scripted = await self.script(call, job, request) if self.script else None
        if scripted is not None:
            return scripted
        if job is None:
            return json_answer(404, {"error_code": 404001, "error_message": "request not found"})
        if call == "status":
            return json_answer(200, {"request_id": job.request_id, "status": "completed"})
        if call == "cancel":
            return json_answer(200, {"request_id": job.request_id, "outcome": "not_cancellable"})
        return json_answer(200, self.result_body(job))

    def result_body(self, job: Job, **changes: Any) -> dict[str, Any]:
        body = {"request_id": job.request_id, "status": "completed",
                "output": {"video": f"{self.base_url}/files/{job.request_id}/video.mp4"}, "cost": 0.42,
                "created_at": "2026-01-01T10:00:00Z", "finished_at": "2026-01-01T10:01:00Z"}
        return body | changes

    async def _file(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["rid"])
        scripted = await self.script("download", job, request) if self.script else None
        if scripted is not None:
            return scripted
        return web.Response(body=VIDEO, content_type="video/mp4")
