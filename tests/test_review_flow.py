"""The issue's "done when", end to end: run a manifest with `takes: 3`, pick one take per input in the
review app, re-roll two inputs, run again, and copy the winners out with their prompts."""

from __future__ import annotations

import csv
import io

import aiohttp
from helpers import cli, job, results, run, write_manifest

from batchrun.manifest import load_manifest
from batchrun.review_app import ReviewServer
from batchrun.sandbox import Sandbox


async def test_takes_review_reroll_run_copy(tmp_path, session: aiohttp.ClientSession):
    manifest = write_manifest(tmp_path, [job("dawn", prompt="Boats at dawn"), job("noon", prompt="Gulls at noon"),
                                         job("dusk", prompt="Lights at dusk")])
    text = manifest.read_text(encoding="utf-8").replace("defaults:\n", "defaults:\n  takes: 3\n")
    manifest.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.jobs_created == 9

        async with ReviewServer(out, load_manifest(manifest)) as server:
            base, token = server.url.split("/?")[0], server.app.token

            async def post(path, body):
                async with session.post(f"{base}{path}?token={token}", json=body) as answer:
                    assert answer.status == 200, await answer.text()
                    return await answer.json()

            for winner in ("dawn-t2", "noon", "dusk-t3"):
                await post("/api/decide", {"id": winner, "decision": "picked", "rating": 5})
            await post("/api/decide", {"id": "noon", "note": "keep the gull on the left"})
            assert (await post("/api/reroll", {"id": "dawn", "takes": 1}))["asked"] == ["dawn-t4"]
            assert (await post("/api/reroll", {"id": "dusk-t2", "takes": 2}))["asked"] == ["dusk-t4", "dusk-t5"]
        # Given only the output dir, the app reviews but cannot re-roll (the inputs are the manifest's).
        async with ReviewServer(out, None) as server:
            async with session.post(f"{server.url.split('/?')[0]}/api/reroll?token={server.app.token}",
                                    json={"id": "dawn"}) as answer:
                assert answer.status == 409

        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.jobs_created == 12
        rows = results(out)
        assert rows["dusk-t5"]["state"] == "done" and rows["dusk-t5"]["take"] == 5
        assert sum(r["submissions"] for r in rows.values()) == 12  # never paid twice for one take

    dest = tmp_path / "winners"
    code, said, err = await cli(["copy", str(manifest), str(dest), "--picked"])
    assert code == 0, err
    picks = list(csv.DictReader(io.StringIO((dest / "picks.csv").read_text(encoding="utf-8"))))
    assert [(p["id"], p["prompt"], p["take"], p["rating"], p["note"], p["files"]) for p in picks] == [
        ("dawn-t2", "Boats at dawn", "2", "5", "", "dawn-t2.mp4"),
        ("noon", "Gulls at noon", "1", "5", "keep the gull on the left", "noon.mp4"),
        ("dusk-t3", "Lights at dusk", "3", "5", "", "dusk-t3.mp4"),
    ]
    assert sorted(p.name for p in dest.iterdir()) == ["dawn-t2.mp4", "dusk-t3.mp4", "noon.mp4", "picks.csv"]
