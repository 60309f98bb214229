"""Hear how a run ended: one JSON summary POSTed to a loopback receiver at the end of every run (exit 0,
1, 2 after reading, 3 and 130; not 75), retried with backoff, never carrying the token."""

from __future__ import annotations

import signal

import pytest
from helpers import FakeClock, job, jobs, manifest_problems, write_manifest
from helpers import cli as _main
from receiver import Receiver
from test_cli_run import _manifest_for_signals, _start_run, _submits, _wait_for, sandbox_process  # noqa: F401

from batchrun import notify
from batchrun.lock import OutputDirLock
from batchrun.sandbox import Sandbox

CANARY = "sk-CANARY-notify-55e1"
SUMMARY_KEYS = {"manifest", "output_dir", "exit_code", "meaning", "counts", "spent_this_run_usd", "spent_total_usd",
                "jobs", "capped", "report", "text"}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", CANARY)
    monkeypatch.delenv("RUNCOMFY_BASE_URL", raising=False)
    monkeypatch.delenv("RUNCOMFY_BALANCE_URL", raising=False)


def _assert_clean(request: dict) -> None:
    """No credential of any kind reaches a notify URL."""
    assert "Authorization" not in request["headers"] and "Cookie" not in request["headers"]
    assert CANARY.encode() not in request["raw"]
    assert request["headers"]["Content-Type"] == "application/json"


async def test_exit_0_notifies_every_url_once_with_the_summary(tmp_path):
    with Receiver() as hook, Receiver() as other:
        manifest = write_manifest(tmp_path, jobs(2), notify=[hook.url + "/services/T000/B000/secret"])
        async with Sandbox(token=CANARY) as sandbox:
            code, stdout, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url,
                                                "--no-preflight", "--notify", other.url])
        assert code == 0, stderr
        assert len(hook.requests) == 1 and len(other.requests) == 1
        assert hook.requests[0]["path"] == "/services/T000/B000/secret"
        body = hook.bodies[0]
        assert other.bodies[0] == body
        assert SUMMARY_KEYS <= body.keys()
        assert body["exit_code"] == 0 and body["meaning"] == "every job is done"
        assert body["counts"] == {"done": 2}
        assert body["spent_this_run_usd"] == pytest.approx(0.84) and body["spent_total_usd"] == pytest.approx(0.84)
        assert body["jobs"] == [] and body["capped"] is False
        assert body["output_dir"] == str(tmp_path / "out")
        assert body["report"] == str(tmp_path / "out" / "report.html")
        assert body["text"].startswith("batchrun batch.yaml: exit 0 (every job is done); done=2; $0.84 this run")
        for request in hook.requests + other.requests:
            _assert_clean(request)
        # Where it went is said without the webhook's secret path.
        assert f"notify: {hook.url}: sent (HTTP 200, at the first try)" in stderr
        assert "secret" not in stdout + stderr


async def test_exit_1_lists_failed_and_unknown_jobs_with_their_reasons(tmp_path):
    from batchrun.sandbox import Faults

    with Receiver() as hook:
        manifest = write_manifest(tmp_path, [job("ok"), job("lost"), job("bad", prompt="a storm [fail] at sea")],
                                  concurrency=1)
        async with Sandbox(token=CANARY, faults=Faults(lose_submit_answer=1)) as sandbox:
            code, _, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight",
                                           "--notify", hook.url])
        assert code == 1, stderr
        body = hook.bodies[0]
        assert body["exit_code"] == 1 and body["meaning"] == "the run ended with jobs not done"
        assert body["counts"] == {"done": 1, "failed": 1, "unknown": 1}
        by_id = {j["id"]: j for j in body["jobs"]}
        assert by_id.keys() == {"ok", "bad"}
        assert by_id["bad"]["reason"] == "content policy violation (sandbox)"
        assert by_id["ok"]["state"] == "unknown" and "502" in by_id["ok"]["reason"]
        assert "needing attention: " in body["text"]
        _assert_clean(hook.requests[0])


async def test_exit_3_when_the_balance_does_not_cover_the_first_job(tmp_path):
    with Receiver() as hook:
        manifest = write_manifest(tmp_path, jobs(2), notify=[hook.url])
        async with Sandbox(token=CANARY, balance_usd=0.1) as sandbox:
            code, _, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
            assert sandbox.posts_total == 0
        assert code == 3, stderr
        body = hook.bodies[0]
        assert (body["exit_code"], body["meaning"]) == (3, "stopped by an auth or balance error")
        assert body["counts"] == {"pending": 2} and body["spent_this_run_usd"] == 0


async def test_exit_2_after_reading_the_manifest_still_notifies(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNCOMFY_API_TOKEN")
    with Receiver() as hook:
        manifest = write_manifest(tmp_path, jobs(1), notify=[hook.url])
        code, _, stderr = await _main(["run", str(manifest), "--no-preflight"])
        assert code == 2 and "RUNCOMFY_API_TOKEN" in stderr
        body = hook.bodies[0]
        assert body["exit_code"] == 2 and "RUNCOMFY_API_TOKEN" in body["error"]
        # An invalid manifest cannot name its own URLs, but --notify is told.
        (tmp_path / "bad.yaml").write_text("version: 1\njobs:\n  - prompt: 5\n", encoding="utf-8")
        code, _, _ = await _main(["run", str(tmp_path / "bad.yaml"), "--notify", hook.url])
        assert code == 2
        assert hook.bodies[1]["exit_code"] == 2 and hook.bodies[1]["error"].startswith("invalid manifest")
        assert all("nothing was sent" in body["text"] for body in hook.bodies)


async def test_a_sandbox_runs_money_is_labelled_simulated_in_the_notification(tmp_path):
    with Receiver() as hook:
        manifest = write_manifest(tmp_path, jobs(2), notify=[hook.url])
        code, _, stderr = await _main(["run", str(manifest), "--sandbox", "--no-progress"])
        assert code == 0, stderr
        body = hook.bodies[0]
        assert "$0.84 simulated (sandbox) this run" in body["text"] and "simulated (sandbox) in total" in body["text"]
        assert body["simulated_usd"] == pytest.approx(0.84)


async def test_exit_75_does_not_notify(tmp_path):
    with Receiver() as hook:
        manifest = write_manifest(tmp_path, jobs(1), notify=[hook.url])
        (tmp_path / "out").mkdir()
        with OutputDirLock(tmp_path / "out"):
            async with Sandbox(token=CANARY) as sandbox:
                code, _, _ = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
        assert code == 75
        assert hook.requests == []


def test_exit_130_after_ctrl_c_notifies(tmp_path, sandbox_process):  # noqa: F811 - the imported fixture
    with Receiver() as hook:
        manifest = _manifest_for_signals(tmp_path, 6)
        proc = _start_run(manifest, sandbox_process, "--notify", hook.url)
        try:
            _wait_for(lambda: _submits(tmp_path / "out") >= 1, 10, "a submit in run.log")
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130, stderr
        assert len(hook.requests) == 1
        body = hook.bodies[0]
        assert (body["exit_code"], body["meaning"]) == (130, "interrupted")
        assert body["counts"].get("pending", 0) >= 4 and sum(body["counts"].values()) == 6
        assert "Authorization" not in hook.requests[0]["headers"]


async def test_delivery_is_retried_with_backoff_and_bounded():
    clock = FakeClock()
    with Receiver(statuses=[503, 502, 200]) as flaky, Receiver(statuses=[404]) as gone:
        deliveries = await notify.send([flaky.url, gone.url], {"text": "hi"}, attempts=4, first_wait=1.0,
                                       sleep=clock.sleep)
        assert [(d.ok, d.attempts, d.detail) for d in deliveries] == [(True, 3, "HTTP 200"), (False, 1, "HTTP 404")]
        assert clock.sleeps == [1.0, 2.0]  # doubling waits; a 404 is not tried again
        assert len(flaky.requests) == 3 and len(gone.requests) == 1
    # Nobody listening: every try fails fast and the waits stay bounded.
    clock = FakeClock()
    (nobody,) = await notify.send([flaky.url], {"text": "hi"}, attempts=3, first_wait=0.5, sleep=clock.sleep)
    assert (nobody.ok, nobody.attempts) == (False, 3) and clock.sleeps == [0.5, 1.0]
    assert notify.report_lines([nobody])[0].startswith(f"notify: {flaky.url}: not delivered (")


async def test_a_failed_notification_never_changes_the_exit_code(tmp_path):
    with Receiver(statuses=[400]) as refusing:
        manifest = write_manifest(tmp_path, jobs(1), notify=[refusing.url])
        async with Sandbox(token=CANARY) as sandbox:
            code, _, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
        assert code == 0
        assert "not delivered (HTTP 400, at the first try)" in stderr


def test_notify_urls_are_validated_like_any_manifest_field(tmp_path):
    problems = manifest_problems(tmp_path, """\
        version: 1
        notify:
          - https://hooks.example.com/ok
          - ftp://hooks.example.com/x
          - 42
        jobs:
          - prompt: waves
            start_image_url: https://example.com/a.png
        """)
    assert problems == ["4:5: notify[1]: must start with https:// or http://, not 'ftp://hooks.example.com/x'",
                        "5:5: notify[2]: must be an http(s) URL (text), got 42"]
    problems = manifest_problems(tmp_path, """\
        version: 1
        notify: https://hooks.example.com/ok
        jobs:
          - prompt: waves
            start_image_url: https://example.com/a.png
        """)
    assert problems == ["2:9: notify: must be a list of URLs (one '- https://...' per line)"]


async def test_a_bad_notify_flag_is_a_usage_error(tmp_path):
    manifest = write_manifest(tmp_path, jobs(1))
    code, _, stderr = await _main(["run", str(manifest), "--notify", "hooks.example.com/x", "--no-preflight"])
    assert code == 2 and "--notify 'hooks.example.com/x': must start with https://" in stderr
    assert not (tmp_path / "out").exists()
