"""Review findings on the hot-path rework (issue 13): each test fails on the code as reviewed.

Real loopback only: the built-in sandbox, and where a fault must be timed, a purpose-built aiohttp
proxy in front of it (no batchrun code is replaced).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from aiohttp import web
from helpers import ScaledClock, cli, job, jobs, ledger_rows, results, run, write_manifest

from batchrun.sandbox import Faults, Sandbox


class SubmitGate:
    """A loopback proxy in front of a sandbox. The first `refuse` submits answer 429 (Retry-After: 1);
    the next submit first calls `on_hold()` (the test's trigger), then is held `hold` real seconds before it
    is forwarded. Every POST seen after the trigger is counted."""

    def __init__(self, sandbox: Sandbox, *, refuse: int, on_hold, hold: float = 0.6):
        self.sandbox, self.refuse, self.on_hold, self.hold = sandbox, refuse, on_hold, hold
        self.submits = 0
        self.after_trigger = 0
        self.triggered = False
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> SubmitGate:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()
        await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        is_submit = request.method == "POST" and request.path.startswith("/v1/models/")
        if is_submit:
            self.submits += 1
            if self.triggered:
                self.after_trigger += 1
            if self.submits <= self.refuse:
                return web.json_response({"error_code": 429001, "error_message": "too many requests"}, status=429,
                                         headers={"Retry-After": "1"})
            if not self.triggered:
                self.triggered = True
                self.on_hold()
                await asyncio.sleep(self.hold)  # real time: the run's stop-request watcher polls every 0.2 s
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.sandbox.base_url + request.path_qs, data=body,
                                         headers=headers) as upstream:
            data = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items()
                    if k.lower() in ("content-type", "retry-after", "etag", "last-modified")}
            return web.Response(status=upstream.status, body=data, headers=kept)


async def test_no_submit_is_sent_after_the_run_stopped_submitting_while_submits_go_one_at_a_time(tmp_path: Path):
    """A 429 puts submits in single file (`SubmitPacer`): each waits for the answer to the one before. A
    stop that comes meanwhile (`batchrun cancel`'s request here; a first Ctrl-C is the same
    `stop_submitting`) must stop the jobs still waiting their turn. They are not stopped: each takes its
    turn after the stop, records an intent and POSTs, and so pays for a job the user asked not to start."""
    manifest = write_manifest(tmp_path, jobs(4), concurrency=4)
    out = tmp_path / "out"
    async with Sandbox(video_bytes=b"\x00\x00\x00\x18ftypmp42" + bytes(64)) as sandbox:
        # All four POST at once and are refused; then one at a time. The first of those triggers the stop.
        async with SubmitGate(sandbox, refuse=4, on_hold=lambda: (out / "cancel.request").touch()) as gate:
            outcome, said = await run(manifest, SimpleNamespace(base_url=gate.base_url), clock=ScaledClock(speed=100))
    assert gate.triggered
    assert "stopped submitting: 'batchrun cancel' asked" in "\n".join(outcome.lines)
    # Only the POST under way when the stop came may still be sent; the three others stay pending.
    assert gate.after_trigger == 0, f"{gate.after_trigger} submits were sent after the run stopped submitting"
    assert sandbox.jobs_created == 1
    assert outcome.counts == {"done": 1, "pending": 3}


QA_VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16


async def test_a_job_queued_ahead_by_the_run_itself_is_not_cancelled_for_waiting_its_turn(tmp_path: Path):
    """`queue_ahead: 3` with `concurrency: 1`: the run itself puts three jobs in the provider's queue behind
    its own render, so the last one waits three renders (60 s) before it starts. `job_timeout` (50 s
    here; 30 min by default, i.e. any long batch with a large `queue_ahead`) counts that wait from
    submission: the run cancels the job it chose to queue ahead ("still queued after ... min;
    cancelled", then held until `--retry-failed`) and abandons the one before it as timed out (exit 1).
    With `queue_ahead: 0` the same batch ends all done (each job then renders within its timeout)."""
    manifest = write_manifest(tmp_path, jobs(4), concurrency=1, queue_ahead=3, job_timeout=50,
                              poll_min_interval=1, poll_max_interval=5)
    clock = ScaledClock(speed=50)  # jobs wait together, as for real
    async with Sandbox(capacity=1, render_seconds=20.0, video_bytes=QA_VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
    states = {job_id: row["state"] for job_id, row in results(tmp_path / "out").items()}
    assert states == {f"clip-{i:02d}": "done" for i in range(4)}, (states, outcome.lines)
    assert outcome.exit_code == 0


async def test_an_adopted_request_id_joins_the_jobs_request_history(tmp_path: Path, monkeypatch):
    """The ledger keeps every request id a job ever had (`requests`, results.jsonl's `request_ids`): "nothing
    else ever deletes a request_id". `batchrun adopt` sets `jobs.request_id` only, so an adopted request is
    missing from the history of a job that had an earlier one, and the next intent of that job
    (`--retry-failed`) sets `request_id` to NULL: the adopted, paid-for request is then gone from the ledger."""
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "adopt-token")
    monkeypatch.delenv("RUNCOMFY_BASE_URL", raising=False)
    manifest = write_manifest(tmp_path, [job("a")], concurrency=1)
    out = tmp_path / "out"
    async with Sandbox(token="adopt-token", faults=Faults(fail_rate=1.0)) as sandbox:
        run_cli = ["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"]
        assert (await cli(run_cli))[0] == 1  # request r0 fails remotely
        (r0,) = sandbox.jobs
        sandbox.faults.fail_rate, sandbox.faults.lose_submit_answer = 0.0, 1
        assert (await cli([*run_cli, "--retry-failed"]))[0] == 1  # submitted again: r1, its answer lost
        assert ledger_rows(out)["a"]["state"] == "unknown"
        (r1,) = [rid for rid in sandbox.jobs if rid != r0]
        code, _, err = await cli(["adopt", str(manifest), "a", r1, "--base-url", sandbox.base_url])
        assert code == 0, err
        row = results(out)["a"]
        assert row["request_id"] == r1
        assert row["request_ids"] == [r0, r1], row["request_ids"]
