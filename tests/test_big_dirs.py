"""Output dirs of many jobs, built with `batchrun.sandbox.donedir` (the ledger's own API, real files) and
then used as a person would: a no-op `run --sandbox`, `status`, `export`. Slower than most tests (a
10,000-job dir is built once per module), so the checks that need size share it."""

from __future__ import annotations

import io
import json
import os
import sqlite3

import pytest
from helpers import cli

from batchrun.manifest import load_manifest
from batchrun.run import AUTO_REPORT_JOBS, run_manifest
from batchrun.sandbox.donedir import fill, write_manifest


async def _noop_run(manifest_path):
    stream = io.StringIO()
    outcome = await run_manifest(load_manifest(manifest_path), base_url=None, token=None, sandbox=True,
                                 stream=stream, progress=False, handle_signals=False, check_balance=False)
    return outcome


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A done output dir of AUTO_REPORT_JOBS - 1 jobs, and its manifest."""
    folder = tmp_path_factory.mktemp("big")
    manifest = write_manifest(folder / "m.yaml", AUTO_REPORT_JOBS - 1)
    fill(manifest)
    return manifest


async def test_the_automatic_report_stops_at_10000_jobs_and_the_closing_lines_say_so(big):
    out = big.parent / "out"
    report = out / "report.html"
    outcome = await _noop_run(big)
    assert outcome.exit_code == 0
    assert outcome.lines[-1] == f"report: {report}"
    assert report.is_file()
    written = report.stat()
    # One job more: 10,000 in the ledger. The report is not refreshed, and the closing lines say how to get it.
    write_manifest(big, AUTO_REPORT_JOBS)
    fill(big)
    outcome = await _noop_run(big)
    assert outcome.exit_code == 0
    assert outcome.counts == {"done": 10_000}
    assert outcome.lines[-1] == (f"report: not refreshed by runs of 10,000 jobs or more (this output dir holds "
                                 f"10,000); write it with: batchrun report {out}")
    assert (report.stat().st_mtime_ns, report.stat().st_ino) == (written.st_mtime_ns, written.st_ino)
    code, stdout, err = await cli(["report", str(out)])
    assert code == 0, err
    assert report.stat().st_mtime_ns != written.st_mtime_ns


async def test_status_of_a_few_jobs_against_a_big_ledger_lists_the_rest_and_checks_only_by_stat(big, tmp_path):
    out = big.parent / "out"
    few = write_manifest(tmp_path / "few.yaml", 20, output=str(out))
    code, stdout, err = await cli(["status", str(few), "--json"])
    assert code == 0, err
    report = json.loads(stdout)
    assert report["total"] >= AUTO_REPORT_JOBS - 1
    assert len(report["not_in_manifest"]) == report["total"] - 20
    assert report["not_started"] == [] and report["damaged"] == [] and report["refused"] == []
    # The stat stands for each file: a same-size, same-mtime edit is only seen with --verify.
    video = out / "clip-000003.mp4"
    before = video.stat()
    data = bytearray(video.read_bytes())
    data[-1] ^= 0xFF
    with open(video, "r+b") as handle:
        handle.write(bytes(data))
    os.utime(video, ns=(before.st_atime_ns, before.st_mtime_ns))
    code, stdout, err = await cli(["status", str(few), "--json"])
    assert json.loads(stdout)["damaged"] == []
    code, stdout, err = await cli(["status", str(few), "--json", "--verify"])
    assert json.loads(stdout)["damaged"] == [{"id": "clip-000003", "path": "clip-000003.mp4", "problem": "damaged"}]
    data[-1] ^= 0xFF
    with open(video, "r+b") as handle:
        handle.write(bytes(data))


async def test_export_streams_every_row_in_ledger_order(big):
    out = big.parent / "out"
    code, stdout, err = await cli(["export", str(out)])
    assert code == 0, err
    lines = stdout.splitlines()
    conn = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        ids = [r[0] for r in conn.execute("SELECT id FROM jobs ORDER BY first_seen_at, rowid")]
    finally:
        conn.close()
    assert [json.loads(line)["id"] for line in lines] == ids
    assert stdout.encode() == (out / "results.jsonl").read_bytes()
    code, csv_text, err = await cli(["export", str(out), "--format", "csv"])
    assert code == 0, err
    assert len(csv_text.splitlines()) == len(ids) + 1


def test_a_plan_keeps_no_ledger_row_of_a_job_never_sent(tmp_path):
    """A first run's jobs are all `pending` once recorded: the plan decides them as jobs the ledger does
    not hold, keeping no row of theirs (100,000 such rows were 150 MB of a first run's peak memory). A job
    whose input changed while it waited is recorded with its new input, and still not kept."""
    import helpers

    from batchrun.ledger import Ledger
    from batchrun.plan import RunOptions, make_plan

    path = helpers.write_manifest(tmp_path, helpers.jobs(5))
    manifest = load_manifest(path)
    manifest.output_dir.mkdir()
    ledger = Ledger.open(manifest.output_dir)
    try:
        plan = make_plan(manifest, ledger, RunOptions())
        assert [job.id for job in plan.submit] == [job.id for job in manifest.jobs]
        assert plan.unsettled == {}
        # The same plan again (a run that stopped before sending anything), then with one input changed.
        assert [job.id for job in make_plan(manifest, ledger, RunOptions()).submit] == [j.id for j in manifest.jobs]
        path.write_text(path.read_text().replace("(clip-03)", "(clip-03) edited"))
        changed = load_manifest(path)
        plan = make_plan(changed, ledger, RunOptions())
        assert [job.id for job in plan.submit] == [job.id for job in changed.jobs]
        edited = next(job for job in changed.jobs if "edited" in json.dumps(job.input))
        assert plan.unsettled == {}
        assert ledger.get(edited.id).input_sha256 == edited.input_sha256  # recorded before the plan
    finally:
        ledger.close()
