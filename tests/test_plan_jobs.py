"""`batchrun plan --jobs`: every job the manifest makes, after matrix and takes expansion, with what a run
will do with it and how many fit the budget."""

from __future__ import annotations

import io
import json

from helpers import job, write_manifest

from batchrun.cli import main


def _plan(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["plan", *argv, "--no-balance-check"], stdout=out, stderr=io.StringIO())
    return code, out.getvalue()


def test_plan_jobs_lists_expanded_jobs_and_how_many_fit_the_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = write_manifest(tmp_path, [
        job("beach", takes=2),  # 5 s without audio: $0.42 each
        {"id": "cliff", "matrix": {"prompt": ["a", "b"]}, "generate_audio": True},  # $0.63 each
    ], budget_usd=1.5)
    code, text = _plan(str(manifest), "--jobs", "--json")
    assert code == 0
    info = json.loads(text)
    rows = {row["id"]: row for row in info["job_list"]}
    assert list(rows) == ["beach", "beach-t2", "cliff-p1", "cliff-p2"]
    assert rows["beach-t2"]["seconds"] == 5 and rows["beach-t2"]["audio"] is False
    assert rows["cliff-p1"]["audio"] is True and rows["cliff-p1"]["estimated_cost_usd"] == 0.63
    # $0.42 + $0.42 fit $1.50; $0.63 more would be $1.47 (fits); the last would pass it.
    assert info["jobs_fitting_budget"] == 3
    assert [row["fits"] for row in rows.values()] == [True, True, True, False]

    code, text = _plan(str(manifest), "--jobs")
    assert code == 0
    assert "budget: 3 of the 4 jobs to submit fit the $1.50 left" in text
    line = next(line for line in text.splitlines() if line.strip().startswith("cliff-p2"))
    assert "$0.63" in line and "yes" in line and "over budget" in line


def test_plan_jobs_after_a_run_says_done(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = write_manifest(tmp_path, [job("one"), job("two")])
    assert main(["run", str(manifest), "--sandbox", "--no-progress"], stdout=io.StringIO(),
                stderr=io.StringIO()) == 0
    code, text = _plan(str(manifest), "--jobs", "--json")
    info = json.loads(text)
    assert code == 0 and [row["action"] for row in info["job_list"]] == ["done", "done"]
    assert info["jobs_fitting_budget"] is None  # no budget
    code, text = _plan(str(manifest), "--jobs")
    assert "budget:" not in text.split("jobs (2):", 1)[1]
