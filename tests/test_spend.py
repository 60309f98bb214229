"""The money figures agree everywhere: the run's closing line, `status`, `plan`, results.jsonl and
report.html give the same spend for the same ledger; money given back is available again in the same
run; the sandbox's money is labelled simulated."""

from __future__ import annotations

import io
import json
import re

from helpers import FakeClock, assert_done, job, jobs, results, run, write_manifest

from batchrun.cli import main
from batchrun.manifest import load_manifest
from batchrun.plan import RunOptions
from batchrun.run import run_manifest
from batchrun.sandbox import Faults, Sandbox
from batchrun.spend import Spend, job_cost

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16


def _cli(*argv: str) -> str:
    out = io.StringIO()
    assert main(list(argv), stdout=out, stderr=io.StringIO()) == 0
    return out.getvalue()


def test_what_one_job_counts_for():
    assert job_cost("done", 1, 0.5, 0.42) == (0.5, "api")
    assert job_cost("failed", 1, 0.1, 0.42) == (0.1, "api")  # a failed job the API charged for
    assert job_cost("running", 1, None, 0.42) == (0.42, "estimate")
    assert job_cost("unknown", 1, None, 0.42) == (0.42, "estimate")  # may have been created
    assert job_cost("submitting", 1, None, 0.42) == (0.42, "estimate")
    for state in ("failed", "cancelled", "pending"):  # never sent, refused, or nothing charged
        assert job_cost(state, 1, None, 0.42) == (None, None)
    assert job_cost("pending", 0, None, 0.42) == (None, None)
    assert Spend(1.26).describe() == "$1.26"
    assert Spend(0, 0.84).describe() == "$0.84 simulated (sandbox)"
    assert Spend(1.0, 0.84).describe() == "$1.00 (+ $0.84 simulated in sandbox runs)"


async def test_money_a_failed_job_gives_back_is_spent_again_in_the_same_run(tmp_path):
    """5 jobs at $0.42 and a $1.50 budget: three fit. The first fails remotely at $0, so a fourth fits
    after all and is submitted in the same run; the fifth would take spend over the budget."""
    job_list = [job("clip-00", prompt="a storm [fail] at sea")] + jobs(5)[1:]
    manifest = write_manifest(tmp_path, job_list, concurrency=4, budget_usd=1.5, poll_min_interval=1)
    out = tmp_path / "out"
    clock = FakeClock()
    renders = iter([5, 20, 20, 20, 20])
    async with Sandbox(render_seconds=lambda _rng: next(renders), video_bytes=VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1, said
        rows = results(out)
        assert rows["clip-00"]["state"] == "failed" and rows["clip-00"]["cost_usd"] == 0.0
        for job_id in ("clip-01", "clip-02", "clip-03"):
            assert_done(out, rows[job_id], VIDEO)
        assert rows["clip-04"]["state"] == "pending" and rows["clip-04"]["submissions"] == 0
        assert sandbox.posts_total == sandbox.jobs_created == 4
        assert abs(outcome.spent_usd - 1.26) < 1e-9
        assert ("budget reached: $1.26 committed of the $1.50 budget; the next job (clip-04) would cost $0.42, "
                "over $1.50") in outcome.lines


async def test_every_place_gives_the_same_spend_for_the_same_ledger(tmp_path):
    # unknown (its answer lost: estimate $0.42, it may exist), failed ($0), done ($0.42 from the API,
    # $0.63 with audio), and one job the budget kept back ($0: never sent).
    job_list = [job("lost"), job("bad", prompt="a storm [fail] at sea"), job("done"),
                job("audio", generate_audio=True), job("over")]
    manifest = write_manifest(tmp_path, job_list, concurrency=1, budget_usd=1.5)
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, faults=Faults(lose_submit_answer=1)) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 1, said
    rows = results(out)
    assert [rows[j]["state"] for j in rows] == ["unknown", "failed", "done", "done", "pending"]
    assert [rows[j]["cost_usd"] for j in rows] == [0.42, 0.0, 0.42, 0.63, None]
    total = sum(r["cost_usd"] or 0 for r in rows.values())
    figure = f"${total:.2f}"
    assert figure == "$1.47"

    assert f"spent in this output dir: {figure} " in outcome.lines[0]
    assert f"spent: {figure} " in _cli("status", str(out))
    assert json.loads(_cli("status", str(out), "--json"))["spent_usd"] == round(total, 4)
    assert json.loads(_cli("plan", str(manifest), "--json"))["spent_usd"] == round(total, 4)
    _cli("report", str(out))
    page = (out / "report.html").read_text(encoding="utf-8")
    tile = re.search(r'<div class="k">Spend</div><div class="v">([^<]*)</div>', page)
    assert tile and tile.group(1) == figure
    assert abs(outcome.spent_usd - total) < 1e-9


async def test_the_sandboxs_money_is_labelled_simulated_wherever_it_is_shown(tmp_path):
    manifest = write_manifest(tmp_path, jobs(1), poll_min_interval=0.5)
    out = tmp_path / "out"
    stream = io.StringIO()
    outcome = await run_manifest(load_manifest(manifest), base_url=None, token=None, sandbox=True,
                                 options=RunOptions(preflight=False), stream=stream, handle_signals=False)
    assert outcome.exit_code == 0, outcome.lines
    assert re.search(r"done; .*committed=\$0\.\d\d simulated \(sandbox\)", stream.getvalue())  # progress lines
    assert "spent in this output dir: $0.42 simulated (sandbox)" in outcome.lines[0]
    assert "spent: $0.42 simulated (sandbox)" in _cli("status", str(out))
    status = json.loads(_cli("status", str(out), "--json"))
    assert status["spent_usd"] == 0.42 and status["simulated_usd"] == 0.42
    assert re.search(r"spent in this output dir +\$0\.42 simulated \(sandbox\)", _cli("plan", str(manifest)))
    assert results(out)["clip-00"]["simulated"] is True
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "$0.42 simulated (sandbox)" in page


async def test_money_a_cancelled_job_gives_back_is_spent_again_in_the_same_run(tmp_path):
    """A $0.84 budget covers two jobs. The second waits in the provider's queue past `job_timeout` and is
    cancelled ($0): the third job fits after all and is submitted in the same run."""
    manifest = write_manifest(tmp_path, jobs(3), concurrency=2, budget_usd=0.84, job_timeout=60,
                              poll_min_interval=1, poll_max_interval=10)
    out = tmp_path / "out"
    clock = FakeClock()
    async with Sandbox(capacity=1, render_seconds=500, video_bytes=VIDEO, clock=clock) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1, said
        rows = results(out)
        assert rows["clip-00"]["state"] == "running"  # rendering past the timeout: kept for the next run
        assert rows["clip-01"]["state"] == "cancelled" and rows["clip-01"]["cost_usd"] is None
        assert rows["clip-02"]["submissions"] == 1 and sandbox.posts_total == 3
        assert sandbox.jobs[rows["clip-01"]["request_id"]].status == "cancelled"
        assert abs(outcome.spent_usd - sum(r["cost_usd"] or 0 for r in rows.values())) < 1e-9
        assert outcome.spent_usd <= 0.84 + 1e-9
