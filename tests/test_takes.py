"""Takes and re-rolls: `takes: N` makes N separately paid jobs of one input, `batchrun reroll` asks for
more, and each take is paid exactly once (the sandbox counts the jobs it creates)."""

from __future__ import annotations

import csv
import io
import json

from helpers import cli, job, manifest_problems, model_input, results, run, write_manifest, write_yaml

from batchrun.ledger import Ledger
from batchrun.manifest import load_manifest
from batchrun.sandbox import Sandbox


def test_takes_make_separate_jobs_with_readable_ids(tmp_path):
    path = write_yaml(tmp_path, """\
        version: 1
        defaults: {duration: 5, start_image_url: https://example.com/a.png, takes: 2}
        jobs:
          - {id: beach, prompt: waves, takes: 3}
          - {id: cliff, prompt: rocks}
          - {prompt: derived, takes: 1}
        """)
    manifest = load_manifest(path)
    ids = [j.id for j in manifest.jobs]
    derived = ids[-1]
    assert ids == ["beach", "beach-t2", "beach-t3", "cliff", "cliff-t2", derived]
    assert [j.take for j in manifest.jobs] == [1, 2, 3, 1, 2, 1]
    beach = [j for j in manifest.jobs if j.id.startswith("beach")]
    # One input, three jobs: `takes` is not model input, and take 1's digest is what it was without it.
    assert len({j.input_sha256 for j in beach}) == 1 and "takes" not in beach[0].input
    plain = write_yaml(tmp_path, """\
        version: 1
        defaults: {duration: 5, start_image_url: https://example.com/a.png}
        jobs:
          - {id: beach, prompt: waves}
        """, name="plain.yaml")
    assert load_manifest(plain).jobs[0].input_sha256 == beach[0].input_sha256


def test_bad_takes_are_located_errors(tmp_path):
    problems = manifest_problems(tmp_path, """\
        version: 1
        defaults: {duration: 5, start_image_url: https://example.com/a.png}
        jobs:
          - {id: a, prompt: x, takes: 0}
          - {id: b, prompt: x, takes: two}
          - {id: c, prompt: x, takes: true}
          - {id: d, prompt: x, takes: 2}
          - {id: d-t2, prompt: y}
        """)
    assert any(p.startswith("4:") and "takes must be from 1 to" in p for p in problems), problems
    assert any(p.startswith("5:") and "whole number" in p for p in problems), problems
    assert any(p.startswith("6:") and "whole number" in p for p in problems), problems
    assert any("duplicate id 'd-t2'" in p for p in problems), problems
    problems = manifest_problems(tmp_path, """\
        version: 1
        defaults: {duration: 5, start_image_url: https://example.com/a.png, takes: -1}
        jobs:
          - {id: a, prompt: x}
        """)
    assert len(problems) == 1 and problems[0].startswith("2:") and "defaults.takes" in problems[0], problems


async def test_takes_paid_once_each_and_rerolls_submit_exactly_what_was_asked(tmp_path):
    manifest = write_manifest(tmp_path, [job("beach", takes=3), job("cliff")])
    out = tmp_path / "out"
    code, said, _ = await cli(["plan", str(manifest), "--json"])
    plan = json.loads(said)
    assert code == 0 and plan["jobs"] == 4 and plan["submit"] == 4, plan
    assert abs(plan["estimated_cost_usd"] - 4 * 0.42) < 1e-9, plan
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert sandbox.jobs_created == 4
        assert sandbox.jobs_for(model_input(manifest, "beach")) == 3
        rows = results(out)
        assert [(r["id"], r["take"]) for r in rows.values()] == [
            ("beach", 1), ("beach-t2", 2), ("beach-t3", 3), ("cliff", 1)]
        assert rows["beach-t3"]["take_of"] == "beach" and rows["beach"]["take_of"] is None
        assert (out / "beach-t2.mp4").is_file()

        # Two more takes of beach (asked by any take's id) and two of cliff; unknown ids record nothing.
        code, _, err = await cli(["reroll", str(manifest), "beach-t2", "nope"])
        assert code == 2 and "nope" in err
        code, said, _ = await cli(["reroll", str(manifest), "beach-t2", "cliff", "--takes", "2"])
        assert code == 0, said
        assert "beach-t4, beach-t5, cliff-t2, cliff-t3" in said
        code, said, _ = await cli(["plan", str(manifest), "--json"])
        assert json.loads(said)["submit"] == 4
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0
        assert sandbox.jobs_created == 8
        assert sandbox.jobs_for(model_input(manifest, "beach")) == 5
        rows = results(out)
        assert rows["cliff-t3"]["take"] == 3 and rows["cliff-t3"]["state"] == "done"
        # Asked takes are submitted once: the next run pays for nothing.
        outcome, _ = await run(manifest, sandbox)
        assert sandbox.jobs_created == 8
        # Raising the manifest's takes to 4 reaches beach-t4, the same job as the re-roll: not paid again.
        manifest = write_manifest(tmp_path, [job("beach", takes=4), job("cliff")])
        outcome, _ = await run(manifest, sandbox)
        assert outcome.exit_code == 0 and sandbox.jobs_created == 8


async def test_reroll_before_any_run_is_refused(tmp_path):
    manifest = write_manifest(tmp_path, [job("beach")])
    code, _, err = await cli(["reroll", str(manifest), "beach"])
    assert code == 2 and "nothing has run" in err
    assert not (tmp_path / "out").exists()


async def test_decisions_show_in_status_export_and_copy(tmp_path):
    manifest = write_manifest(tmp_path, [job("beach", takes=2), job("cliff", prompt="Rocks, \"quoted\", and commas")])
    out = tmp_path / "out"
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    ledger = Ledger.open(out)
    try:
        ledger.set_decision("beach-t2", decision="picked", rating=5, note="the one")
        ledger.set_decision("cliff", decision="picked", note='=HYPERLINK("http://evil.example","x")')
        ledger.set_decision("beach", decision="rejected", rating=2)
    finally:
        ledger.close()
    code, said, _ = await cli(["status", str(out)])
    assert code == 0 and "review: 2 picked, 1 rejected" in said
    code, said, _ = await cli(["export", str(out), "--picked", "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(said)))
    # A note a spreadsheet would run as a formula is written as text (a leading apostrophe).
    assert [(r["id"], r["take"], r["decision"], r["rating"], r["note"]) for r in table] == [
        ("beach-t2", "2", "picked", "5", "the one"), ("cliff", "1", "picked", "", "'=HYPERLINK(\"http://evil.example\",\"x\")")]
    assert table[1]["prompt"] == 'Rocks, "quoted", and commas' and table[1]["duration"] == "5"
    assert table[0]["image"] == "https://example.com/cliff.png" and table[0]["model"].startswith("kling/")
    code, said, _ = await cli(["export", str(out), "--rejected"])
    assert [json.loads(line)["id"] for line in said.splitlines()] == ["beach"]
    code, said, _ = await cli(["export", str(out), "--unrated"])
    assert said == ""

    dest = tmp_path / "winners"
    code, said, err = await cli(["copy", str(out), str(dest), "--picked"])
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == ["beach-t2.mp4", "cliff.mp4", "picks.csv"]
    assert (dest / "cliff.mp4").read_bytes() == (out / "cliff.mp4").read_bytes()
    picks = list(csv.DictReader(io.StringIO((dest / "picks.csv").read_text(encoding="utf-8"))))
    assert [(r["id"], r["take"], r["rating"], r["note"]) for r in picks] == [
        ("beach-t2", "2", "5", "the one"), ("cliff", "1", "", "'=HYPERLINK(\"http://evil.example\",\"x\")")]
    assert picks[1]["prompt"] == 'Rocks, "quoted", and commas'
    # Copying again is a no-op; a different file of the same name in DEST is left alone and said.
    (dest / "cliff.mp4").write_bytes(b"mine")
    code, _, err = await cli(["copy", str(out), str(dest), "--picked"])
    assert code == 1 and "cliff.mp4 exists with other content" in err
    assert (dest / "cliff.mp4").read_bytes() == b"mine"


def test_takes_from_a_jobs_file(tmp_path):
    (tmp_path / "shots.csv").write_text("id,prompt,takes\nbeach,waves,3\ncliff,rocks,\nbad,x,zero\n", encoding="utf-8")
    (tmp_path / "more.jsonl").write_text('{"id": "gull", "prompt": "birds", "takes": 2}\n', encoding="utf-8")
    text = """\
        version: 1
        defaults: {duration: 5, start_image_url: https://example.com/a.png}
        jobs_from: %s
        """
    problems = manifest_problems(tmp_path, text % "shots.csv")
    assert len(problems) == 1 and "shots.csv:4:" in problems[0] and "whole number" in problems[0], problems
    (tmp_path / "shots.csv").write_text("id,prompt,takes\nbeach,waves,3\ncliff,rocks,\n", encoding="utf-8")
    assert [j.id for j in load_manifest(write_yaml(tmp_path, text % "shots.csv")).jobs] == [
        "beach", "beach-t2", "beach-t3", "cliff"]
    assert [j.id for j in load_manifest(write_yaml(tmp_path, text % "more.jsonl")).jobs] == ["gull", "gull-t2"]


def test_takes_count_against_the_job_limit(tmp_path):
    problems = manifest_problems(tmp_path, """\
        version: 1
        defaults: {duration: 5, start_image_url: https://example.com/a.png, takes: 100}
        jobs:
          - id: m
            prompt: x
            matrix: {duration: [5, 6, 7, 8, 9, 10, 11], negative_prompt: [a, b, c, d, e, f, g, h, i, j, k],
                     cfg_scale: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.15, 0.25, 0.35]}
        """)
    assert len(problems) == 1 and "more than 100,000" in problems[0], problems


async def test_reroll_refuses_ids_over_64_characters(tmp_path):
    long_id = "a" * 61  # takes 2 to 9 make 64 characters; take 10 would make 65
    manifest = write_manifest(tmp_path, [job(long_id)])
    async with Sandbox() as sandbox:
        await run(manifest, sandbox)
        code, _, err = await cli(["reroll", str(manifest), long_id, "--takes", "9"])
        assert code == 2 and "over 64 characters" in err
        code, _, err = await cli(["reroll", str(manifest), long_id, "--takes", "8"])
        assert code == 0, err
        await run(manifest, sandbox)
        assert sandbox.jobs_created == 9
        assert max(results(tmp_path / "out")) == long_id + "-t9"


async def test_rerolls_asked_at_the_same_time_by_several_processes_are_all_recorded(tmp_path):
    """Ten `batchrun reroll` processes at once: ten new takes, each with its own number, none lost."""
    import subprocess
    import sys

    manifest = write_manifest(tmp_path, [job("f")])
    async with Sandbox() as sandbox:
        assert (await run(manifest, sandbox))[0].exit_code == 0
    procs = [subprocess.Popen([sys.executable, "-m", "batchrun", "reroll", str(manifest), "f"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(10)]
    said = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, said
    from batchrun.ledger import Ledger

    ledger = Ledger.open(tmp_path / "out", create=False, readonly=True)
    try:
        takes = sorted(take for _, _, take in ledger.rerolls())
    finally:
        ledger.close()
    assert takes == list(range(2, 12))
