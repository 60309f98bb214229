"""The review server over real loopback sockets: who may read and write, what a decision and a re-roll
store, and that the run afterwards submits exactly the asked takes."""

from __future__ import annotations

import signal
import sqlite3
import urllib.error
import urllib.request

import aiohttp
import pytest
from helpers import cli, job, ledger_rows, run, write_manifest
from proc_helpers import start
from review_batch import count_run, make_reviewed_batch

from batchrun.manifest import load_manifest
from batchrun.review_app import ReviewApp, ReviewServer
from batchrun.sandbox import Sandbox


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return make_reviewed_batch(tmp_path_factory.mktemp("review"))


async def test_every_request_needs_the_session_token_and_loopback_host(batch, session: aiohttp.ClientSession):
    out = batch.parent / "out"
    async with ReviewServer(out, load_manifest(batch)) as server:
        base = server.url.split("/?")[0]
        token = server.app.token
        for path in ("/", "/api/jobs", "/media/cliff.mp4", "/assets/review.js"):
            async with session.get(base + path) as r:
                assert r.status == 403, path
            async with session.get(f"{base}{path}?token=wrong{token}") as r:
                assert r.status == 403, path
        async with session.post(f"{base}/api/decide", json={"id": "cliff", "decision": "picked"}) as r:
            assert r.status == 403
        async with session.post(f"{base}/api/decide?token={token}", json={"id": "cliff", "decision": "picked"},
                                headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with session.post(f"{base}/api/decide?token={token}", data="id=cliff&decision=picked",
                                headers={"Content-Type": "application/x-www-form-urlencoded"}) as r:
            assert r.status == 415
        async with session.get(f"{base}/?token={token}", headers={"Host": "attacker.example"}) as r:
            assert r.status == 421
        assert ledger_rows(out)["cliff"]["decision"] is None
        # Only recorded outputs are served: no other file of the output dir, no path outside it.
        for path in ("/media/ledger.sqlite", "/media/..%2Fbatch.yaml", "/media/cliff.json"):
            async with session.get(f"{base}{path}?token={token}") as r:
                assert r.status == 404, path
        async with session.get(f"{base}/?token={token}") as r:
            assert r.status == 200 and "default-src 'none'" in r.headers["Content-Security-Policy"]
            page = await r.text()
        assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere


async def test_decisions_and_rerolls_are_stored_and_the_next_run_submits_exactly_them(batch, session):
    out = batch.parent / "out"
    async with ReviewServer(out, load_manifest(batch)) as server:
        base, token = server.url.split("/?")[0], server.app.token

        async def post(path, body):
            async with session.post(f"{base}{path}?token={token}", json=body) as r:
                return r.status, await r.json()

        assert await post("/api/decide", {"id": "harbor-t2", "decision": "picked", "rating": 5}) == (
            200, {"id": "harbor-t2", "decision": "picked", "rating": 5, "note": None})
        assert (await post("/api/decide", {"id": "harbor", "rating": 9}))[0] == 400
        assert (await post("/api/decide", {"id": "nope", "decision": "picked"}))[0] == 404
        assert (await post("/api/decide", {"id": "harbor", "decision": "maybe"}))[0] == 400
        assert await post("/api/reroll", {"id": "cliff-t2", "takes": 2}) == (200, {"asked": ["cliff-t3", "cliff-t4"]})
        async with session.get(f"{base}/api/jobs?token={token}") as r:
            groups = {g["id"]: g for g in (await r.json())["groups"]}
        assert [(t["id"], t["state"]) for t in groups["cliff"]["takes"]] == [
            ("cliff", "done"), ("cliff-t2", "done"), ("cliff-t3", "asked"), ("cliff-t4", "asked")]
        assert groups["harbor"]["image"].startswith("/start/harbor?token=")
    assert ledger_rows(out)["harbor-t2"]["decision"] == "picked"
    assert await count_run(batch) == 2
    assert await count_run(batch) == 0
    rows = ledger_rows(out)
    assert rows["cliff-t4"]["state"] == "done" and rows["cliff-t4"]["take"] == 4
    code, said, _ = await cli(["export", str(out), "--picked"])
    assert code == 0 and '"id": "harbor-t2"' in said and said.count("\n") == 1


@pytest.fixture
def own_batch(tmp_path):
    return make_reviewed_batch(tmp_path)


async def test_a_reroll_the_ledger_refuses_is_a_400_saying_why_not_a_crash(own_batch, session):
    """A trigger added by hand refuses new takes: the page gets the reason, the server keeps serving."""
    batch = own_batch
    out = batch.parent / "out"
    conn = sqlite3.connect(out / "ledger.sqlite")
    conn.execute("CREATE TRIGGER no_rerolls BEFORE INSERT ON rerolls BEGIN SELECT RAISE(ABORT, 'closed by hand'); END")
    conn.commit()
    conn.close()
    async with ReviewServer(out, load_manifest(batch)) as server:
        base, token = server.url.split("/?")[0], server.app.token
        async with session.post(f"{base}/api/reroll?token={token}", json={"id": "cliff", "takes": 1}) as r:
            assert r.status == 400 and "closed by hand" in (await r.json())["error"]
        async with session.get(f"{base}/api/jobs?token={token}") as r:
            assert r.status == 200


async def test_review_without_a_ledger_is_a_usage_error(tmp_path):
    code, _, err = await cli(["review", str(tmp_path)])
    assert code == 2 and "no ledger" in err


async def test_inputs_with_videos_come_first(tmp_path):
    manifest = write_manifest(tmp_path, [job("storm", prompt="storm [fail]"), job("calm", takes=2)])
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
    app = ReviewApp(tmp_path / "out", load_manifest(manifest))
    try:
        groups = app.jobs()["groups"]
    finally:
        app.close()
    assert [(g["id"], [t["id"] for t in g["takes"]]) for g in groups] == [("calm", ["calm", "calm-t2"]),
                                                                          ("storm", ["storm"])]
    assert groups[1]["takes"][0]["error"] and not groups[1]["takes"][0]["videos"]


def test_batchrun_review_prints_its_url_and_stops_on_ctrl_c(batch):
    proc = start("review", str(batch), cwd=batch.parent)
    try:
        first = proc.stdout.readline()
        url = first.split(": ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and "?token=" in url, first
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200 and b"review.js" in answer.read()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url.split("?")[0], timeout=10)
        assert refused.value.code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "every decision is in the ledger" in out and "Traceback" not in err
