"""Logs a person can read in the morning: labelled, timestamped lines when not on a terminal, one
timestamp format in stdout and run.log, --quiet and --verbose, closing lines that count what waits."""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import job, jobs, write_manifest

from batchrun.cli import main
from batchrun.console import Labelled, for_unattended
from batchrun.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCOMFY_")}
    return env | {"RUNCOMFY_API_TOKEN": "t", "PYTHONPATH": str(REPO)}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    monkeypatch.delenv("RUNCOMFY_BASE_URL", raising=False)


async def test_two_manifests_interleaved_in_one_cron_log_can_be_told_apart(tmp_path):
    (tmp_path / "spring").mkdir()
    (tmp_path / "autumn").mkdir()
    spring = write_manifest(tmp_path / "spring", jobs(4, "spring"), name="batch.yaml")
    autumn = write_manifest(tmp_path / "autumn", jobs(3, "autumn") + [job("bad", prompt="storm [fail]")],
                            name="batch.yaml")
    cron_log = tmp_path / "cron.log"
    async with Sandbox(render_seconds=0.0) as sandbox:
        with open(cron_log, "ab") as appended:  # both cron entries: `batchrun run ... >> cron.log 2>&1`
            procs = [await asyncio.create_subprocess_exec(
                sys.executable, "-m", "batchrun", "run", str(path), "--base-url", sandbox.base_url, "--no-preflight",
                "--verbose", stdout=appended, stderr=subprocess.STDOUT, env=_child_env())
                for path in (spring, autumn)]
            codes = [await proc.wait() for proc in procs]
    assert codes == [0, 1]
    log = cron_log.read_text(encoding="utf-8")
    lines = log.splitlines()
    by_manifest: dict[str, list[str]] = {str(spring): [], str(autumn): []}
    for line in lines:
        match = re.match(rf"^{STAMP} \[(.+?)\] (.*)$", line)
        assert match, f"an unlabelled line: {line!r}"
        by_manifest[match.group(1)].append(match.group(2))
    spring_lines, autumn_lines = by_manifest[str(spring)], by_manifest[str(autumn)]
    assert "plan: 4 to submit, 0 to resume, 0 to download, 0 already done" in spring_lines
    assert any(line.startswith("balance: $") for line in spring_lines)
    assert any(line.startswith("spring-00: submitted as ") for line in spring_lines)  # --verbose
    assert "spring-00: done" in spring_lines
    assert "bad: failed remotely: content policy violation (sandbox)" in autumn_lines
    # (not `"bad" in line`: a request id in hex can hold it, as 1 run in ~30 found)
    assert not any("autumn" in line or re.search(r"(^|\W)bad\W", line) for line in spring_lines)
    assert f"report: {tmp_path / 'autumn' / 'out' / 'report.html'}" in autumn_lines
    # run.log stamps its lines in the same format.
    for line in (tmp_path / "spring" / "out" / "run.log").read_text().splitlines():
        assert re.match(rf"^{STAMP} (INFO|WARNING|ERROR) ", line), line


async def test_quiet_prints_only_the_closing_summary(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3))
    out, err = io.StringIO(), io.StringIO()
    async with Sandbox() as sandbox:
        code = await asyncio.to_thread(main, ["run", str(manifest), "--base-url", sandbox.base_url,
                                              "--no-preflight", "--quiet"], stdout=out, stderr=err)
    assert code == 0
    assert err.getvalue() == ""
    said = [re.sub(rf"^{STAMP} \[[^]]+\] ", "", line) for line in out.getvalue().splitlines()]
    assert said[0].startswith("3 jobs: done=3; spent in this output dir: $1.26")
    assert said[1:] == [f"results: {tmp_path / 'out' / 'results.jsonl'}", f"report: {tmp_path / 'out' / 'report.html'}"]


async def test_after_a_budget_stop_waiting_jobs_are_counted_not_listed(tmp_path):
    manifest = write_manifest(tmp_path, jobs(30) + [job("bad", prompt="storm [fail]")], budget_usd=0.84,
                              concurrency=1)
    out = io.StringIO()
    async with Sandbox() as sandbox:
        code = await asyncio.to_thread(main, ["run", str(manifest), "--base-url", sandbox.base_url,
                                              "--no-preflight", "--no-balance-check"], stdout=out,
                                       stderr=io.StringIO())
    assert code == 1
    text = out.getvalue()
    # What to do, not a promise the next run cannot keep: it would stop at the budget again.
    assert "  29 pending: not submitted; raise budget_usd (or pass --budget) to submit them" in text
    assert ": pending" not in text
    assert "budget reached" in text


def test_lines_are_labelled_only_off_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    assert for_unattended(terminal, "m.yaml") is terminal
    piped = io.StringIO()
    labelled = Labelled(piped, "jobs/m.yaml", clock=lambda: 0.0)
    labelled.write("plan: 3 to ")
    assert piped.getvalue() == ""  # a line written in pieces stays whole
    labelled.write("submit\nsecond\nthird")
    labelled.flush()
    assert piped.getvalue().splitlines() == ["1970-01-01T00:00:00Z [jobs/m.yaml] plan: 3 to submit",
                                             "1970-01-01T00:00:00Z [jobs/m.yaml] second",
                                             "1970-01-01T00:00:00Z [jobs/m.yaml] third"]
