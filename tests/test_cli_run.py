"""`batchrun run` and `plan` from the command line: `main([...])` in process, and real subprocesses
for Ctrl-C and SIGTERM. Every server is a real sandbox on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_done, job, jobs, ledger_rows, model_input, results, write_manifest
from helpers import cli as _main
from proc_helpers import wait_for as _wait_for

from batchrun.lock import OutputDirLock
from batchrun.sandbox import Faults, Sandbox

REPO = Path(__file__).resolve().parents[1]
CANARY = "sk-CANARY-7f3a"
VIDEO = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 20


# -- the token never leaks ---------------------------------------------------------------------


async def test_the_token_never_appears_in_files_or_output(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", CANARY)
    monkeypatch.delenv("RUNCOMFY_BASE_URL", raising=False)
    manifest = write_manifest(tmp_path, [job("ok"), job("lost"), job("bad", prompt="a storm [fail] at sea")],
                              concurrency=1)
    out = tmp_path / "out"
    said: list[str] = []
    async with Sandbox(token=CANARY, video_bytes=VIDEO, faults=Faults(lose_submit_answer=1)) as sandbox:
        # The first job's answer is lost (unknown), one fails, then everything is re-run and resubmitted.
        code, stdout, stderr = await _main(["run", "--no-preflight",
                                            str(manifest), "--base-url", sandbox.base_url, "--no-progress"])
        said += [stdout, stderr]
        assert code == 1, stderr
        rows = results(out)
        assert rows["ok"]["state"] == "unknown" and rows["bad"]["state"] == "failed"
        assert_done(out, rows["lost"], VIDEO)
        code, stdout, stderr = await _main(["run", "--no-preflight",
                                            str(manifest), "--base-url", sandbox.base_url, "--no-progress",
                                            "--resubmit-unknown", "--retry-failed"])
        said += [stdout, stderr]
        assert code == 1, stderr
        assert_done(out, results(out)["ok"], VIDEO)
        assert sandbox.jobs_for(model_input(manifest, "ok")) == 2
    async with Sandbox(token="the-right-one") as strict:
        # The API refuses this token: the refusal is reported, the token is not.
        code, stdout, stderr = await _main(["run", "--no-preflight",
                                            str(manifest), "--base-url", strict.base_url, "--no-progress",
                                            "--retry-failed"])
        said += [stdout, stderr]
        assert code == 3
        assert "401" in stdout + stderr
        # The failed job is asked about first (--retry-failed); that call is refused and nothing is sent.
        assert strict.calls["status"] + strict.posts_total >= 1 and strict.jobs_created == 0
    code, stdout, stderr = await _main(["plan", str(manifest), "--no-balance-check"])
    said += [stdout, stderr]
    assert code == 0

    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"ledger.sqlite", "results.jsonl", "run.log", "ok.mp4", "ok.json"}
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), path
    for text in said:
        assert CANARY not in text


# -- plan and --dry-run send nothing -------------------------------------------------------------


async def test_dry_run_and_plan_send_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    manifest = write_manifest(tmp_path, jobs(3), budget_usd=1.0)
    async with Sandbox() as sandbox:
        code, stdout, _ = await _main(["run", "--no-preflight",
                                       str(manifest), "--base-url", sandbox.base_url, "--dry-run"])
        assert code == 0
        assert "to submit" in stdout and "3" in stdout
        assert "the budget does not cover every job" in stdout
        code, stdout, _ = await _main(["plan", str(manifest), "--json", "--no-balance-check"])
        assert code == 0
        info = json.loads(stdout)
        assert info["submit"] == 3 and info["estimated_cost_usd"] == pytest.approx(1.26) and info["over_budget"]
        # Only the (free) balance was asked, for the dry run's plan.
        assert sandbox.calls == {"balance": 1} and sandbox.posts_total == 0
    assert not (tmp_path / "out").exists()


async def test_plan_after_a_run_shows_it_done(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    manifest = write_manifest(tmp_path, jobs(2))
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        code, stdout, stderr = await _main(["run", "--no-preflight", str(manifest), "--base-url", sandbox.base_url])
        assert code == 0, stderr
        assert "2 jobs: done=2" in stdout
        assert "2/2 done; done=2" in stderr  # not a terminal: plain progress lines, no bar
        assert "\r" not in stderr
        calls = sum(sandbox.calls.values())
        code, stdout, _ = await _main(["plan", str(manifest), "--json", "--no-balance-check"])
        assert code == 0
        info = json.loads(stdout)
        assert (info["submit"], info["skip"]) == (0, 2)
        assert info["spent_usd"] == pytest.approx(0.84)
        assert sum(sandbox.calls.values()) == calls


# -- usage errors and the output-dir lock ------------------------------------------------------


async def test_run_without_a_token_is_a_usage_error_and_sends_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNCOMFY_API_TOKEN", raising=False)
    manifest = write_manifest(tmp_path, jobs(1))
    async with Sandbox() as sandbox:
        code, _, stderr = await _main(["run", "--no-preflight", str(manifest), "--base-url", sandbox.base_url])
        assert code == 2
        assert "RUNCOMFY_API_TOKEN" in stderr
        assert sandbox.posts_total == 0


async def test_a_locked_output_dir_exits_75(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    manifest = write_manifest(tmp_path, jobs(1))
    (tmp_path / "out").mkdir()
    async with Sandbox() as sandbox:
        with OutputDirLock(tmp_path / "out"):
            code, _, stderr = await _main(["run", "--no-preflight",
                                           str(manifest), "--base-url", sandbox.base_url, "--no-progress"])
        assert code == 75
        assert "in use" in stderr
        assert sandbox.posts_total == 0


# -- Ctrl-C and SIGTERM in real processes --------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCOMFY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sandbox_process():
    """`batchrun sandbox` in its own process, 2 s renders; yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "batchrun", "sandbox", "--port", str(port),
                             "--render-seconds", "2"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def listening() -> bool:
        assert proc.poll() is None, "the sandbox process died"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        _wait_for(listening, 10, "the sandbox to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_run(manifest: Path, base_url: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchrun", "run", "--no-preflight",
                             str(manifest), "--base-url", base_url,
                             "--no-progress", *flags], env=_env(RUNCOMFY_API_TOKEN="sandbox"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _submits(output_dir: Path) -> int:
    try:
        return (output_dir / "run.log").read_text(encoding="utf-8").count(": submitted as ")
    except FileNotFoundError:
        return 0


def _manifest_for_signals(tmp_path: Path, n: int) -> Path:
    return write_manifest(tmp_path, jobs(n), concurrency=2, poll_min_interval=0.1, poll_max_interval=0.3,
                          requests_per_second=100)


def test_first_ctrl_c_stops_submitting_and_finishes_jobs_in_flight(tmp_path, sandbox_process):
    manifest = _manifest_for_signals(tmp_path, 6)
    out = tmp_path / "out"
    proc = _start_run(manifest, sandbox_process)
    try:
        _wait_for(lambda: _submits(out) >= 1, 10, "a submit in run.log")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "stopping: no new jobs" in stderr
    assert "interrupted" in stdout
    rows = results(out)
    sent = [r for r in rows.values() if r["submissions"] > 0]
    assert 1 <= len(sent) <= 2  # no job was submitted after the Ctrl-C
    for row in sent:
        assert_done(out, row, (REPO / "batchrun" / "sandbox" / "sample.mp4").read_bytes())
    rest = [r for r in rows.values() if r["submissions"] == 0]
    assert len(rest) == 6 - len(sent)
    assert {r["state"] for r in rest} == {"pending"}
    assert ledger_rows(out).keys() == rows.keys()


@pytest.mark.parametrize("signals", [("SIGINT", "SIGINT"), ("SIGTERM",)], ids=["ctrl-c-twice", "sigterm"])
def test_leaving_now_keeps_every_job_in_flight_recorded(tmp_path, sandbox_process, signals):
    manifest = _manifest_for_signals(tmp_path, 3)
    out = tmp_path / "out"
    proc = _start_run(manifest, sandbox_process)
    try:
        # Both slots taken: no POST is in flight, two jobs render for 2 s.
        _wait_for(lambda: _submits(out) >= 2, 10, "two submits in run.log")
        sent_at = time.monotonic()
        for name in signals:
            proc.send_signal(getattr(signal, name))
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - sent_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert took < 3
    ledger = ledger_rows(out)
    in_flight = [r for r in ledger.values() if r["submissions"] > 0]
    assert len(in_flight) == 2
    for row in in_flight:
        assert row["state"] in ("queued", "running"), row
        assert row["request_id"]
    rows = results(out)
    assert {rows[r["id"]]["request_id"] for r in in_flight} == {r["request_id"] for r in in_flight}
    assert [r["state"] for r in ledger.values() if r["submissions"] == 0] == ["pending"]

    # The next run collects both without sending them again, and submits the last one.
    again = _start_run(manifest, sandbox_process)
    stdout, stderr = again.communicate(timeout=20)
    assert again.returncode == 0, stderr
    assert "1 to submit, 2 to resume" in stderr
    video = (REPO / "batchrun" / "sandbox" / "sample.mp4").read_bytes()
    final = results(out)
    for row in final.values():
        assert_done(out, row, video)
        assert row["submissions"] == 1
    assert {final[r["id"]]["request_id"] for r in in_flight} == {r["request_id"] for r in in_flight}


# -- sandbox results and paid ones never share a ledger -----------------------------------------


@pytest.mark.parametrize("sandbox_first", [True, False], ids=["sandbox-then-real", "real-then-sandbox"])
async def test_sandbox_and_real_runs_never_share_an_output_dir(tmp_path, monkeypatch, sandbox_first):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", CANARY)
    manifest = write_manifest(tmp_path, jobs(2), poll_min_interval=0.05, poll_max_interval=0.2)
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, render_seconds=0.1) as api:
        real = ["run", str(manifest), "--output", str(out), "--base-url", api.base_url, "--no-progress",
                "--no-preflight", "--no-balance-check"]
        fake = ["run", str(manifest), "--output", str(out), "--sandbox", "--no-progress"]
        first, second = (fake, real) if sandbox_first else (real, fake)
        assert (await _main(first))[0] == 0
        posts = api.posts_total
        before = {p.name: p.read_bytes() for p in out.glob("*.mp4")}
        code, stdout, stderr = await _main(second)
        assert code == 2, stdout + stderr
        assert api.posts_total == posts  # nothing was sent
        said = stdout + stderr
        assert "--output" in said and ("--sandbox" in said or "real API" in said)
        assert {p.name: p.read_bytes() for p in out.glob("*.mp4")} == before
        assert CANARY not in said
