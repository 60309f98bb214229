"""A user's edits never orphan a paid render, and what a run refuses or finds damaged is said where users look:
the closing lines, `status`, `plan` and results.jsonl."""

from __future__ import annotations

import io
import json

from helpers import FakeClock, job, jobs, model_input, results, run, write_manifest
from helpers import cli as _main

from batchrun.plan import RunOptions
from batchrun.sandbox import Sandbox

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8
SLOW = {"poll_min_interval": 1, "poll_max_interval": 5}


async def _in_flight(tmp_path, sandbox, clock, job_list):
    """A run that leaves (max_wait) while its jobs are still queued or rendering remotely."""
    manifest = write_manifest(tmp_path, job_list, concurrency=len(job_list), max_wait=5, **SLOW)
    outcome, _ = await run(manifest, sandbox, clock=clock)
    assert outcome.exit_code == 1
    rows = results(tmp_path / "out")
    assert all(r["state"] in ("queued", "running") and r["request_id"] for r in rows.values()), rows
    return rows


async def test_an_edited_running_job_is_still_collected_with_the_input_it_was_made_with(tmp_path):
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(capacity=8, render_seconds=50, video_bytes=VIDEO, clock=clock) as sandbox:
        before = await _in_flight(tmp_path, sandbox, clock, [job("voice", "a voice over the sea"), job("calm")])
        # The user edits the prompt of the job that is rendering, and runs again.
        manifest = write_manifest(tmp_path, [job("voice", "a whisper over the sea"), job("calm")], **SLOW)
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1, said
        assert sandbox.posts_total == 2  # nothing paid twice, the new input not paid for unasked
        rows = results(out)
        voice = rows["voice"]
        assert voice["state"] == "done" and voice["request_id"] == before["voice"]["request_id"]
        assert voice["input_sha256"] == before["voice"]["input_sha256"]
        assert (out / "voice.mp4").read_bytes() == VIDEO
        provenance = json.loads((out / "voice.json").read_text())
        assert provenance["input"]["prompt"] == "a voice over the sea"  # what the render was made with
        assert "input changed after it was submitted" in voice["refusal"]
        assert rows["calm"]["refusal"] is None
        text = "\n".join(outcome.lines)
        assert "1 job refused" in outcome.lines[0]
        assert "collected 1 render made with its previous input: voice" in text
        assert "refused: jobs[0] (id=voice): its input changed" in text

        code, shown, _ = await _main(["status", str(manifest)])
        assert "voice  refused (the ledger's job is done): jobs[0] (id=voice)" in shown

        # Renamed as advised: the new input runs as a job of its own; the old render stays voice's.
        manifest = write_manifest(tmp_path, [job("voice-v2", "a whisper over the sea"), job("calm")], **SLOW)
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        assert sandbox.posts_total == 3
        assert sandbox.posts_for(model_input(manifest, "voice-v2")) == 1
        rows = results(out)
        assert rows["voice"]["refusal"] is None and rows["voice"]["state"] == "done"
        assert rows["voice-v2"]["state"] == "done"
        assert (out / "voice.mp4").read_bytes() == VIDEO and json.loads((out / "voice.json").read_text())[
            "input"]["prompt"] == "a voice over the sea"


async def test_a_running_job_renamed_or_removed_from_the_manifest_is_collected_and_said(tmp_path):
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(capacity=8, render_seconds=50, video_bytes=VIDEO, clock=clock) as sandbox:
        before = await _in_flight(tmp_path, sandbox, clock, jobs(3))
        # clip-01 is renamed (its input edited too), clip-02 removed.
        manifest = write_manifest(tmp_path, [job("clip-00"), job("narration", "a new line")], **SLOW)
        code, shown, _ = await _main(["plan", str(manifest)])
        assert code == 0
        assert "no longer in the manifest (2, kept in the ledger): clip-01 (" in shown
        assert f"to collect: clip-02, no longer in the manifest (request {before['clip-02']['request_id']}" in shown
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0, said
        assert sandbox.posts_total == 4
        rows = results(out)
        for gone in ("clip-01", "clip-02"):
            assert rows[gone]["state"] == "done" and rows[gone]["request_id"] == before[gone]["request_id"]
            assert (out / f"{gone}.mp4").read_bytes() == VIDEO
            assert json.loads((out / f"{gone}.json").read_text())["request_id"] == before[gone]["request_id"]
        assert "collected 2 renders of jobs no longer in the manifest: clip-01, clip-02" in outcome.lines
        code, shown, _ = await _main(["status", str(manifest)])
        assert "in the ledger but no longer in the manifest (2): clip-01 (done), clip-02 (done)" in shown


async def test_a_removed_job_still_rendering_when_the_run_leaves_makes_it_exit_1(tmp_path):
    clock = FakeClock()
    async with Sandbox(capacity=8, render_seconds=500, video_bytes=VIDEO, clock=clock) as sandbox:
        await _in_flight(tmp_path, sandbox, clock, jobs(2))
        manifest = write_manifest(tmp_path, [job("clip-00")], max_wait=5, **SLOW)
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1, said  # a paid render is still to collect
        assert any(line.startswith("  clip-01 (no longer in the manifest, request ") for line in outcome.lines)
        code, shown, _ = await _main(["status", str(manifest)])
        assert "paid renders of those still to collect (1)" in shown


async def test_a_job_without_an_id_whose_input_changed_is_new_beside_the_old_one(tmp_path):
    def unnamed(prompt):
        return {"prompt": prompt}

    async with Sandbox(video_bytes=VIDEO) as sandbox:
        manifest = write_manifest(tmp_path, [job("kept"), unnamed("gulls at dawn")])
        assert (await run(manifest, sandbox))[0].exit_code == 0
        old_id = next(i for i in results(tmp_path / "out") if i.startswith("job-"))
        manifest = write_manifest(tmp_path, [job("kept"), unnamed("gulls at dusk")])
        code, shown, _ = await _main(["plan", str(manifest)])
        assert code == 0
        code, as_json, _ = await _main(["plan", str(manifest), "--json"])
        info = json.loads(as_json)
        (new_id,) = info["new"]
        assert new_id.startswith("job-") and new_id != old_id
        assert info["no_longer_in_manifest"] == [{"id": old_id, "state": "done"}]
        assert f"new (1): {new_id}" in shown
        assert f"no longer in the manifest (1, kept in the ledger): {old_id} (done)" in shown
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0, said
        assert f"  new: {new_id}\n  no longer in the manifest (kept in the ledger): {old_id}" in said
        assert sandbox.posts_total == 3
    assert (tmp_path / "out" / f"{old_id}.mp4").read_bytes() == VIDEO  # the old render stays


async def test_jobs_refused_after_a_post_run_edit_are_in_the_closing_lines_status_and_results(tmp_path):
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        manifest = write_manifest(tmp_path, jobs(12))
        assert (await run(manifest, sandbox))[0].exit_code == 0
        edited = [job(f"clip-{i:02d}", "edited" if i in (1, 4, 7, 10) else None) for i in range(12)]
        manifest = write_manifest(tmp_path, edited)
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 1
        assert sandbox.posts_total == 12
    assert outcome.lines[0].startswith("12 jobs: done=12 (4 jobs refused, see below)")
    assert sum(line.startswith("  refused: ") for line in outcome.lines) == 4
    refused = {i for i, r in results(out).items() if r["refusal"]}
    assert refused == {"clip-01", "clip-04", "clip-07", "clip-10"}

    for target in (str(manifest), str(out)):  # worked out from the manifest; as the run recorded it
        code, shown, _ = await _main(["status", target, "--json"])
        data = json.loads(shown)
        assert {a["id"] for a in data["attention"]} == refused
        assert all(a["error"]["kind"] == "refused" for a in data["attention"])
        code, shown, _ = await _main(["status", target])
        assert "needing attention (4):" in shown

    # Restoring the inputs ends the refusals.
    manifest = write_manifest(tmp_path, jobs(12))
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.posts_total == 0
    assert not any(r["refusal"] for r in results(out).values())


async def test_missing_or_damaged_outputs_and_provenance_are_reported_then_repaired(tmp_path):
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        manifest = write_manifest(tmp_path, jobs(5))
        assert (await run(manifest, sandbox))[0].exit_code == 0
        (out / "clip-00.json").unlink()
        (out / "clip-01.json").write_text("{\"id\": \"clip-01\"")  # cut short
        forged = json.loads((out / "clip-04.json").read_text())
        forged["input"]["prompt"] = "forged"  # the digest beside it still matches: the input itself is read
        (out / "clip-04.json").write_text(json.dumps(forged))
        (out / "clip-02.mp4").write_bytes(VIDEO[:-1] + b"x")
        (out / "clip-03.mp4").unlink()

        code, shown, _ = await _main(["status", str(manifest), "--json"])
        assert code == 0
        assert sorted((d["path"], d["problem"]) for d in json.loads(shown)["damaged"]) == [
            ("clip-00.json", "missing"), ("clip-01.json", "damaged"), ("clip-02.mp4", "damaged"),
            ("clip-03.mp4", "missing"), ("clip-04.json", "damaged")]
        code, shown, _ = await _main(["status", str(out)])
        assert "missing or damaged files (5); the next run repairs them:" in shown

        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0, said
        assert sandbox.posts_total == 5
    for i in range(5):
        assert (out / f"clip-{i:02d}.mp4").read_bytes() == VIDEO
        assert json.loads((out / f"clip-{i:02d}.json").read_text())["id"] == f"clip-{i:02d}"
    text = "\n".join(outcome.lines)
    assert "rewrote 3 provenance files that were missing or damaged: clip-00.json, clip-01.json, clip-04.json" in text
    assert "downloaded again the missing or damaged files of 2 jobs: clip-02, clip-03" in text
    code, shown, _ = await _main(["status", str(manifest), "--json"])
    assert json.loads(shown)["damaged"] == []


async def test_a_local_image_edited_mid_run_is_sent_by_the_next_plain_run_as_the_message_says(tmp_path):
    from test_preflight import image

    from batchrun.manifest import load_manifest
    from batchrun.run import run_manifest

    picture = tmp_path / "harbor.png"
    picture.write_bytes(image((640, 480)))
    manifest_path = write_manifest(tmp_path, [job("harbor", start_image_url="harbor.png"), job("cliff")])
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        loaded = load_manifest(manifest_path)
        picture.write_bytes(image((640, 400)))  # edited after the manifest was loaded, before its POST
        outcome = await run_manifest(loaded, base_url=sandbox.base_url, token="t", stream=io.StringIO(),
                                     options=RunOptions(preflight=False), progress=False, handle_signals=False)
        assert outcome.exit_code == 1
        row = results(tmp_path / "out")["harbor"]
        assert row["state"] == "pending" and row["submissions"] == 0 and row["request_id"] is None
        assert "run again" in row["error"]["message"]
        assert "  harbor: pending: " in "\n".join(outcome.lines)
        assert sandbox.posts_total == 1

        again, said = await run(manifest_path, sandbox)  # no flag: what the message said
        assert again.exit_code == 0, said
        assert sandbox.posts_total == 2
        assert results(tmp_path / "out")["harbor"]["state"] == "done"


async def test_an_edited_job_whose_render_went_missing_gets_its_paid_render_back_not_a_new_one(tmp_path):
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        manifest = write_manifest(tmp_path, [job("voice", "a voice over the sea")])
        assert (await run(manifest, sandbox))[0].exit_code == 0
        (out / "voice.mp4").unlink()
        (out / "voice.json").unlink()
        manifest = write_manifest(tmp_path, [job("voice", "a whisper over the sea")])
        code, shown, _ = await _main(["plan", str(manifest)])
        assert "to collect: voice, made with its previous input" in shown
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 1, said
        assert sandbox.posts_total == 1
    assert (out / "voice.mp4").read_bytes() == VIDEO
    assert json.loads((out / "voice.json").read_text())["input"]["prompt"] == "a voice over the sea"
    assert "collected 1 render made with its previous input: voice" in outcome.lines


async def test_a_removed_job_whose_request_expired_fails_once_without_a_hint_that_cannot_work(tmp_path):
    clock = FakeClock()
    async with Sandbox(capacity=8, render_seconds=1000, video_bytes=VIDEO, clock=clock) as first:
        await _in_flight(tmp_path, first, clock, jobs(2))
    manifest = write_manifest(tmp_path, [job("clip-00")], **SLOW, not_found_grace=0)
    async with Sandbox(video_bytes=VIDEO) as forgetful:  # a server that has never heard of those requests
        outcome, said = await run(manifest, forgetful)
        assert outcome.exit_code == 1, said
        gone = results(tmp_path / "out")["clip-01"]
        assert gone["state"] == "failed" and gone["error"]["kind"] == "not_found"
        assert "--retry-failed" not in gone["error"]["message"]  # it would not run a job no longer listed
        assert any(line.startswith("  clip-01 (no longer in the manifest, request ") and "failed: the API no "
                   "longer knows request" in line for line in outcome.lines)
        await run(manifest, forgetful)  # failed for good: not polled again
        # Each request is asked twice (a "not found" is believed only once it is repeated), then never again.
        assert forgetful.calls["status"] == 4 and forgetful.posts_total == 0


async def test_jobs_not_submitted_because_the_budget_was_reached_say_so_in_results_and_status(tmp_path):
    manifest = write_manifest(tmp_path, jobs(5), concurrency=1, budget_usd=1.0)
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 1 and sandbox.posts_total == 2
    waiting = {i: r for i, r in results(tmp_path / "out").items() if r["state"] == "pending"}
    assert len(waiting) == 3
    assert all(r["error"] == {"kind": "budget", "message": "not submitted: it would take spend over the $1.00 "
                              "budget"} for r in waiting.values())
    code, shown, _ = await _main(["status", str(manifest), "--json"])
    assert {a["id"] for a in json.loads(shown)["attention"]} == set(waiting)


async def test_a_repair_that_did_not_happen_is_not_claimed(tmp_path):
    """A done job's video replaced by a link; the API no longer knows its request: the run says it could
    not repair it (exit 1), never that it downloaded it again, and the link's target is untouched."""
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, [job("a")], not_found_grace=0, poll_min_interval=0.05)
    async with Sandbox(video_bytes=VIDEO) as first:
        assert (await run(manifest, first))[0].exit_code == 0
    victim = tmp_path / "victim.mp4"
    victim.write_bytes(b"not yours")
    (out / "a.mp4").unlink()
    (out / "a.mp4").symlink_to(victim)
    async with Sandbox(video_bytes=VIDEO) as forgetful:
        outcome, said = await run(manifest, forgetful)
        assert forgetful.posts_total == 0
    text = "\n".join(outcome.lines)
    assert outcome.exit_code == 1, said
    assert "downloaded again" not in text
    assert "could not repair the missing or damaged files of 1 job: a" in text
    assert victim.read_bytes() == b"not yours"
