"""`batchrun adopt`: an `unknown` job gets the request id a person found on RunComfy's Generations page,
is checked with the result call, and is collected by the next run without a second payment."""

from __future__ import annotations

import re

import pytest
from helpers import cli as _main
from helpers import job, ledger_rows, results, write_manifest

from batchrun.sandbox import Faults, Sandbox

TOKEN = "adopt-token"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    monkeypatch.delenv("RUNCOMFY_BASE_URL", raising=False)


def _lost_request(sandbox: Sandbox, prompt: str) -> str:
    """The request id a person would find on the Generations page for the job with this prompt."""
    (request_id,) = [rid for rid, j in sandbox.jobs.items() if j.lost_answer and j.input["prompt"] == prompt]
    return request_id


async def _run(manifest, sandbox, *flags):
    return await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight", *flags])


async def test_an_adopted_unknown_job_is_collected_without_paying_again(tmp_path):
    manifest = write_manifest(tmp_path, [job("lost", prompt="The woman turns and smiles; waves crash below."),
                                         job("fine")], concurrency=1)
    out = tmp_path / "out"
    async with Sandbox(token=TOKEN, faults=Faults(lose_submit_answer=1)) as sandbox:
        code, _, stderr = await _run(manifest, sandbox)
        assert code == 1, stderr
        assert ledger_rows(out)["lost"]["state"] == "unknown"

        # status shows what it takes to find the request by hand: when it was sent, and the prompt.
        code, status, _ = await _main(["status", str(manifest)])
        submitted = ledger_rows(out)["lost"]["submitted_at"]
        assert re.search(rf"lost +unknown: .*\n +submitted {submitted[:10]} {submitted[11:19]} UTC; "
                         r"prompt: 'The woman turns and smiles; waves crash below\.'", status), status
        assert "batchrun adopt" in status

        request_id = _lost_request(sandbox, "The woman turns and smiles; waves crash below.")
        code, stdout, stderr = await _main(["adopt", str(manifest), "lost", request_id, "--base-url", sandbox.base_url])
        assert code == 0, stderr
        assert f"lost: adopted request {request_id}" in stdout
        assert results(out)["lost"]["state"] == "queued" and results(out)["lost"]["request_id"] == request_id

        created, posts = sandbox.jobs_created, sandbox.posts_total
        code, stdout, stderr = await _run(manifest, sandbox)
        assert code == 0, stderr
        assert "1 to resume" in stderr
        assert (sandbox.jobs_created, sandbox.posts_total) == (created, posts) == (2, 2)
        row = results(out)["lost"]
        assert row["state"] == "done" and row["request_id"] == request_id and row["submissions"] == 1
        assert (out / "lost.mp4").read_bytes() == sandbox.video_bytes
        assert f"adopt: lost: attached request {request_id}" in (out / "run.log").read_text()


async def test_adopt_refuses_what_it_cannot_vouch_for(tmp_path):
    manifest = write_manifest(tmp_path, [job("a", prompt="a lighthouse at dusk"), job("b", prompt="a fox in snow"),
                                         job("done")], concurrency=1)
    out = tmp_path / "out"
    async with Sandbox(token=TOKEN, faults=Faults(lose_submit_answer=2, show_input=True)) as sandbox:
        await _run(manifest, sandbox)
        before = ledger_rows(out)
        assert (before["a"]["state"], before["b"]["state"], before["done"]["state"]) == ("unknown", "unknown", "done")
        a_request, b_request = _lost_request(sandbox, "a lighthouse at dusk"), _lost_request(sandbox, "a fox in snow")

        async def adopt(*args: str) -> tuple[int, str]:
            code, _, stderr = await _main(["adopt", str(out), *args, "--base-url", sandbox.base_url])
            return code, stderr

        refusals = {
            "input": await adopt("a", b_request),
            "not found": await adopt("a", "0f3c1a52-0000-4000-8000-000000000000"),
            "owned": await adopt("a", before["done"]["request_id"]),
            "not unknown": await adopt("done", a_request),
            "no such job": await adopt("nobody", a_request),
            "not an id": await adopt("a", "../../v1/models"),
        }
        assert all(code == 2 for code, _ in refusals.values())
        assert "a: not adopted: request" in refusals["input"][1] and "different prompt" in refusals["input"][1]
        assert "the API does not know request" in refusals["not found"][1]
        assert "already belongs to job done" in refusals["owned"][1]
        assert "it is done with request" in refusals["not unknown"][1]
        assert "no such job" in refusals["no such job"][1]
        assert "does not look like a request id" in refusals["not an id"][1]
        assert ledger_rows(out) == before

        # A CSV of pairs: the same request twice is refused the second time; the rest are attached.
        pairs = tmp_path / "found.csv"
        pairs.write_text(f"job,request_id\na,{a_request}\nb,{a_request}\n", encoding="utf-8")
        code, stderr = await adopt("--csv", str(pairs))
        assert code == 2 and f"b: not adopted: request {a_request} already belongs to job a" in stderr
        pairs.write_text(f"b,{b_request}\n", encoding="utf-8")
        assert (await adopt("--csv", str(pairs)))[0] == 0
        created = sandbox.jobs_created
        code, _, stderr = await _run(manifest, sandbox)
        assert code == 0, stderr
        assert sandbox.jobs_created == created
        assert {r["request_id"] for r in results(out).values() if r["id"] in "ab"} == {a_request, b_request}


async def test_adopt_input_errors_name_their_place(tmp_path):
    manifest = write_manifest(tmp_path, [job("a")])
    async with Sandbox(token=TOKEN) as sandbox:
        await _run(manifest, sandbox)
        pairs = tmp_path / "found.csv"
        pairs.write_text("job,request_id\na\n", encoding="utf-8")
        code, _, stderr = await _main(["adopt", str(manifest), "--csv", str(pairs), "--base-url", sandbox.base_url])
        assert code == 2 and f"{pairs}:2: expected two columns" in stderr
        code, _, stderr = await _main(["adopt", str(manifest), "a", "--base-url", sandbox.base_url])
        assert code == 2 and "give JOB REQUEST_ID" in stderr
        code, _, stderr = await _main(["adopt", str(tmp_path / "nothing-here"), "a", "r1"])
        assert code == 2 and "no such manifest or output directory" in stderr
        assert results(tmp_path / "out")["a"]["state"] == "done"
