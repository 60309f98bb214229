"""Whole runs against an API that answers badly on purpose (`hostile_api.HostileApi` on loopback).

What a user would check is asserted: POSTs the server counted per job, states in results.jsonl and
the ledger, what run.log, the console and the report say, and that the token is in none of them.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from helpers import cli as _main
from helpers import job, jobs, ledger_rows, results, run, write_manifest
from hostile_api import HostileApi, Job, json_answer

TOKEN = "sk-ECHO-5e1f0a7c"
NASTY = "\x1b[31mred\x1b[0m\x1b]0;title\x07\x9b2J\u202eevil\u2066\r\nFAKE LOG LINE\x00"


def forbidden_in(text: str) -> list[str]:
    """Control characters that must never reach a file or a terminal from a server."""
    return [ch for ch in ("\x1b", "\x07", "\x9b", "\u202e", "\u2066", "\x00") if ch in text]


# -- submits: only a certain refusal is sent again -------------------------------------------------

async def _hang_up(request: web.Request) -> web.Response:
    request.transport.close()  # the body was read: the job may exist
    await asyncio.sleep(0.05)
    return web.Response()


SUBMIT_ANSWERS = {
    "5xx-with-a-4xx-code": lambda: json_answer(500, {"error_code": 400002, "error_message": "no balance"}),
    "503-with-retry-after": lambda: json_answer(503, {"message": "busy"}, **{"Retry-After": "1"}),
    "502-html": lambda: web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html"),
    "200-not-json": lambda: web.Response(status=200, text="ok"),
    "200-truncated-json": lambda: web.Response(status=200, text='{"request_id": "r', content_type="application/json"),
    "200-without-request-id": lambda: json_answer(200, {"status": "in_queue"}),
    "200-dot-dot-id": lambda: json_answer(200, {"request_id": ".."}),
    "200-slash-id": lambda: json_answer(200, {"request_id": "a/b"}),
    "200-huge-id": lambda: json_answer(200, {"request_id": "r" * 5000}),
    "303-see-other": lambda: web.Response(status=303, headers={"Location": "/v1/requests/x/status"}),
}


@pytest.mark.parametrize("answer", [*SUBMIT_ANSWERS, "reset-after-sending"])
async def test_a_submit_that_may_have_created_a_job_is_never_sent_again(tmp_path, answer):
    async def script(call: str, job: Job | None, request: web.Request):
        if call != "submit":
            return None
        return await _hang_up(request) if answer == "reset-after-sending" else SUBMIT_ANSWERS[answer]()

    manifest = write_manifest(tmp_path, [job("a"), job("b")])
    async with HostileApi(script) as api:
        for _ in range(3):
            outcome, said = await run(manifest, api)
            assert outcome.exit_code == 1, said
        assert [api.posts_for("a"), api.posts_for("b")] == [1, 1]
    rows = results(tmp_path / "out")
    assert {rows[j]["state"] for j in "ab"} == {"unknown"}
    assert all(rows[j]["submissions"] == 1 for j in "ab")
    assert "may or may not have been created" in rows["a"]["error"]["message"]


@pytest.mark.parametrize("answer", ["503-with-retry-after", "reset-after-sending", "200-not-json"])
async def test_submits_that_keep_getting_no_usable_answer_stop_submitting(tmp_path, answer):
    """An API that takes POSTs but answers none usably: each may have created a job, so after a few in a
    row batchrun stops sending more instead of leaving the whole batch `unknown`."""
    accept_first = {"n": 1}

    async def script(call: str, job: Job | None, request: web.Request):
        if call != "submit":
            return None
        if accept_first["n"]:  # one accepted submit first: the count is of unanswered ones *in a row*
            accept_first["n"] -= 1
            return None
        return await _hang_up(request) if answer == "reset-after-sending" else SUBMIT_ANSWERS[answer]()

    manifest = write_manifest(tmp_path, jobs(8), concurrency=1)
    async with HostileApi(script) as api:
        outcome, said = await run(manifest, api)
        assert sum(api.posts_by_prompt.values()) == 1 + 3  # then no more POSTs
    assert outcome.exit_code == 1
    rows = results(tmp_path / "out")
    states = sorted(row["state"] for row in rows.values())
    assert states == ["done"] + ["pending"] * 4 + ["unknown"] * 3
    assert any(line.startswith("stopped submitting: 3 submits in a row") for line in outcome.lines), outcome.lines
    pending = [row for row in rows.values() if row["state"] == "pending"]
    assert all("got no usable answer" in row["error"]["message"] for row in pending)


async def test_a_2xx_naming_a_request_is_created_whatever_else_it_says(tmp_path):
    async def script(call: str, job: Job | None, request: web.Request):
        if call == "submit":  # created, but the answer also says the token has expired
            return json_answer(200, {"request_id": job.request_id, "error_code": 400004,
                                     "error_message": "token expired"})
        return None

    manifest = write_manifest(tmp_path, [job("a"), job("b"), job("c")], concurrency=1)
    async with HostileApi(script) as api:
        codes = [(await run(manifest, api))[0].exit_code for _ in range(3)]
        posts = [api.posts_for(j) for j in "abc"]
    # Every run records the job it paid for first, collects it, and stops submitting (exit 3).
    assert codes == [3, 3, 3] and posts == [1, 1, 1]
    rows = results(tmp_path / "out")
    assert [rows[j]["state"] for j in "abc"] == ["done"] * 3
    assert [rows[j]["request_id"] for j in "abc"] == ["req-1", "req-2", "req-3"]


async def test_a_4xx_refusal_is_sent_again_and_creates_one_job(tmp_path):
    refused: set[str] = set()

    async def script(call: str, job: Job | None, request: web.Request):
        if call == "submit" and job.prompt not in refused:
            refused.add(job.prompt)
            del api.jobs[job.request_id]  # a refusal creates nothing
            return json_answer(429, {"error_code": 429001, "message": "slow down"}, **{"Retry-After": "0"})
        return None

    manifest = write_manifest(tmp_path, [job("a")])
    async with HostileApi(script) as api:
        outcome, said = await run(manifest, api)
        assert outcome.exit_code == 0, said
        assert api.posts_for("a") == 2 and len(api.jobs) == 1
    assert results(tmp_path / "out")["a"]["submissions"] == 2  # SPEC: POSTs sent, refused ones included


# -- answers the parser must survive ---------------------------------------------------------------

def poisoned_result(api: HostileApi, job: Job, kind: str) -> web.Response | None:
    """The answer that once stranded a paid job, by kind; None for the usual one."""
    if kind == "naive-created-at":
        return json_answer(200, api.result_body(job, created_at="2026-01-01T10:00:00"))
    if kind == "finished-at-overflow":
        return json_answer(200, api.result_body(job, finished_at="0001-01-01T00:00:00+01:00"))
    if kind == "cost-1e308":
        return json_answer(200, api.result_body(job, cost="1e308"))
    if kind == "cost-nan":
        return web.Response(text=json.dumps(api.result_body(job, cost=float("nan"))), content_type="application/json")
    if kind == "cost-negative":
        return json_answer(200, api.result_body(job, cost=-3))
    if kind == "huge-error-with-escapes":
        return json_answer(200, api.result_body(job, status="failed", output=None, error="x" * 270_000 + NASTY))
    if job.calls["result"] + job.calls["status"] > 1:
        return None  # the kinds below are served once; the next answer is the usual one
    if kind == "queue-position-superscript":
        return json_answer(200, {"request_id": job.request_id, "status": "in_queue", "queue_position": "²"})
    if kind == "error-code-superscript":
        return json_answer(200, {"error_code": "²", "message": "odd"})
    if kind == "nested-1000-deep":
        return web.Response(text='{"a":' * 1000 + "1" + "}" * 1000, content_type="application/json")
    if kind == "status-with-escapes":
        return json_answer(200, {"request_id": job.request_id, "status": "in_progress" + NASTY})
    return None


POISONS = ["naive-created-at", "finished-at-overflow", "cost-1e308", "cost-nan", "cost-negative",
           "queue-position-superscript", "error-code-superscript", "nested-1000-deep", "status-with-escapes",
           "huge-error-with-escapes"]


ONCE = ["queue-position-superscript", "error-code-superscript", "nested-1000-deep", "status-with-escapes"]


async def test_no_answer_stops_collection_or_prints_a_traceback(tmp_path):
    async def script(call: str, job: Job | None, request: web.Request):
        if call in ("status", "result") and job is not None:
            return poisoned_result(api, job, job.prompt.split()[0])
        return None

    # Concurrency 1 and a budget just over every job's estimate: a cost of 1e308 must not use it up.
    manifest = write_manifest(tmp_path, [job(p, prompt=f"{p} ({p})") for p in POISONS] + [job("plain")],
                              concurrency=1, budget_usd=5)
    out = tmp_path / "out"
    async with HostileApi(script) as api:
        outcome, said = await run(manifest, api)
        # An answer served once that cannot be read is asked again in the same run, like a transient one.
        first = results(out)
        assert {p for p in ONCE if first[p]["state"] != "done"} == set(), {p: first[p]["state"] for p in ONCE}
        outcome2, said2 = await run(manifest, api)  # what the first run left is collected now
        assert all(api.posts_for(p) == 1 for p in POISONS)
    rows = results(out)
    assert rows["plain"]["state"] == "done"
    assert rows["huge-error-with-escapes"]["state"] == "failed"
    assert {p for p in POISONS if rows[p]["state"] != "done"} == {"huge-error-with-escapes"}
    for kind in ("cost-1e308", "cost-nan", "cost-negative"):
        assert rows[kind]["cost_source"] == "estimate" and rows[kind]["cost_usd"] == pytest.approx(0.42)
        assert rows[kind]["cost_flag"]
    assert outcome2.spent_usd < 10
    for kind in ("naive-created-at", "finished-at-overflow"):
        assert rows[kind]["finished_at"].endswith("Z")
    error = rows["huge-error-with-escapes"]["error"]["message"]
    assert len(error) <= 300 and error.startswith("xxx")
    texts = {"run.log": (out / "run.log").read_text("utf-8"), "results.jsonl": (out / "results.jsonl").read_text(),
             "report.html": (out / "report.html").read_text("utf-8"), "console": said + said2,
             "closing lines": "\n".join(outcome.lines + outcome2.lines)}
    ledger = json.dumps(ledger_rows(out), ensure_ascii=False)
    for name, text in [*texts.items(), ("ledger", ledger)]:
        assert "Traceback" not in text, name
        assert not forbidden_in(text), (name, forbidden_in(text))
        assert "FAKE LOG LINE" not in text.replace(" FAKE LOG LINE", ""), name  # never at a line's start
        assert "x" * 1000 not in text, name


# -- the token never leaves the process, whatever the server echoes --------------------------------

def _echo_script(api: HostileApi):
    async def script(call: str, job: Job | None, request: web.Request):
        token = api.token_seen
        kind = job.prompt.split()[0] if job else ""
        if call == "submit":
            if kind == "id":
                return json_answer(200, {"request_id": f"{job.request_id}-{token}"})
            if kind == "refused":
                return json_answer(422, {"error_code": 422001, "error_message": f"bad token {token}" + NASTY})
            if kind == "auth":
                return json_answer(200, {"request_id": job.request_id, "error_code": 400004,
                                         "error_message": f"token {token} expired"})
            return None
        if call == "download" and kind == "location":
            return web.Response(status=302, headers={"Location": f"http://[{token}/video.mp4"})
        if call == "download" and kind == "host":  # a URL library lowercases the host: the token too
            return web.Response(status=302, headers={"Location": f"gopher://{token}/x"})
        if call in ("status", "result") and job is not None:
            if kind == "status" and job.calls["status"] + job.calls["result"] == 1:
                return json_answer(200, {"request_id": job.request_id, "status": f"in_progress {token}"})
            if kind == "status":
                return json_answer(200, api.result_body(job, status="failed", error=f"{token} broke", output=None))
            if kind == "url":
                url = f"{api.base_url}/files/{job.request_id}/{token}.mp4"
                return json_answer(200, api.result_body(job, output={"video": url}, cost=token))
            if kind == "redirect" and call == "result":
                return web.Response(status=307, headers={"Location": f"https://elsewhere.example/{token}"})
        return None

    return script


async def test_a_server_echoing_the_token_never_gets_it_into_files_or_output(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    kinds = ["id", "refused", "status", "url", "location", "redirect", "auth", "host"]
    manifest = write_manifest(tmp_path, [job(k, prompt=f"{k} ({k})") for k in kinds], concurrency=1,
                              max_attempts=2, poll_max_interval=0.2)  # the CLI waits for real
    out = tmp_path / "out"
    said = []
    async with HostileApi() as api:
        api.script = _echo_script(api)
        for extra in ([], ["--resubmit-unknown", "--retry-failed"]):
            code, stdout, stderr = await _main(["run", "--no-preflight", "--no-progress", str(manifest),
                                                "--base-url", api.base_url, *extra])
            said += [stdout, stderr]
            assert code in (1, 3), stderr
        code, stdout, stderr = await _main(["status", str(manifest)])
        said += [stdout, stderr]
        code, stdout, stderr = await _main(["report", str(manifest)])
        said += [stdout, stderr]
        assert api.token_seen == TOKEN  # the server did see it, and echoed it everywhere it could
    rows = results(out)
    assert rows["id"]["state"] == "unknown" and "***" in rows["id"]["error"]["message"]
    assert rows["refused"]["state"] == "failed" and "bad token ***" in rows["refused"]["error"]["message"]
    assert rows["status"]["error"]["message"].startswith("*** broke")
    assert rows["url"]["error"]["kind"] == "malformed" and rows["url"]["request_id"] == "req-4"  # kept, asked again
    assert rows["location"]["error"]["kind"] == "download" and "***" in rows["location"]["error"]["message"]
    assert "elsewhere.example/***" in rows["redirect"]["error"]["message"]
    assert rows["auth"]["state"] == "done"
    assert any("stopped by the API: submit: HTTP 200, code 400004" in text and "token *** expired" in text
               for text in said)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"ledger.sqlite", "results.jsonl", "report.html", "run.log"} <= {p.name for p in files}
    for path in files:
        assert TOKEN.lower().encode() not in path.read_bytes().lower(), path  # in any letter case
    for text in said:
        assert TOKEN.lower() not in text.lower()
        assert not forbidden_in(text)

