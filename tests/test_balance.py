"""The balance before paying: `plan` shows it, `run` refuses (exit 3, nothing sent) when it does not cover
the first job and otherwise stops submitting before it runs out. Every server is a real sandbox on
127.0.0.1, whose balance goes down as its renders complete."""

from __future__ import annotations

import json

import pytest
from helpers import cli as _main
from helpers import jobs, ledger_rows, write_manifest

from batchrun.balance import DEFAULT_BALANCE_URL, Balance, balance_url, fetch_balance, may_carry_token
from batchrun.cli import DEFAULT_BASE_URL
from batchrun.sandbox import Faults, Sandbox

JOB_USD = 0.42  # 5 s without audio at $0.084/s
CANARY = "sk-CANARY-balance-91c2"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", CANARY)
    monkeypatch.delenv("RUNCOMFY_BASE_URL", raising=False)
    monkeypatch.delenv("RUNCOMFY_BALANCE_URL", raising=False)


async def test_plan_shows_the_balance_and_the_jobs_it_covers(tmp_path):
    manifest = write_manifest(tmp_path, jobs(5))
    async with Sandbox(token=CANARY, balance_usd=1.0) as sandbox:
        code, stdout, _ = await _main(["plan", str(manifest), "--base-url", sandbox.base_url])
        assert code == 0
        assert "$1.00, covers 2 of 5 jobs to submit" in stdout
        code, stdout, _ = await _main(["plan", str(manifest), "--base-url", sandbox.base_url, "--json"])
        info = json.loads(stdout)
        assert (info["balance_usd"], info["balance_covers"], info["balance_error"]) == (1.0, 2, None)
        assert sandbox.calls == {"balance": 2} and sandbox.posts_total == 0
        code, stdout, _ = await _main(["plan", str(manifest), "--base-url", sandbox.base_url, "--no-balance-check"])
        assert "balance" in stdout and "skipped (--no-balance-check)" in stdout
        assert sandbox.calls == {"balance": 2}


async def test_a_balance_short_of_the_first_job_sends_nothing_and_exits_3(tmp_path):
    manifest = write_manifest(tmp_path, jobs(3))
    async with Sandbox(token=CANARY, balance_usd=JOB_USD - 0.01) as sandbox:
        code, stdout, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
        assert code == 3, stderr
        assert sandbox.posts_total == 0
        assert "covers 0 of 3 jobs to submit" in stderr and "nothing submitted" in stderr
        assert "the balance does not cover the first job" in stdout
        assert {row["state"] for row in ledger_rows(tmp_path / "out").values()} == {"pending"}


async def test_a_balance_running_dry_stops_submitting_before_the_402(tmp_path):
    manifest = write_manifest(tmp_path, jobs(6), concurrency=4)
    async with Sandbox(token=CANARY, balance_usd=2.5 * JOB_USD) as sandbox:
        code, stdout, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
        assert code == 1, stderr
        # Two jobs fit the balance; with four slots free the run still did not send a third.
        assert sandbox.posts_total == 2 and sandbox.jobs_created == 2
        assert "covers 2 of 6 jobs to submit" in stderr
        assert "balance reached" in stdout and "add funds" in stdout
        assert "4 pending" in stdout
        assert sandbox.balance_usd == pytest.approx(0.5 * JOB_USD)  # charged as the renders completed
        # The next night: what is left does not cover a job, so nothing is sent.
        code, stdout, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
        assert code == 3, stderr
        assert sandbox.posts_total == 2


async def test_no_balance_check_skips_the_call(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2), concurrency=1)
    async with Sandbox(token=CANARY, balance_usd=JOB_USD) as sandbox:
        code, stdout, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight",
                                            "--no-balance-check"])
        assert sandbox.calls["balance"] == 0
        # Then only the API's own refusal stops submitting.
        assert code == 3, stderr
        assert sandbox.jobs_created == 1 and sandbox.posts_total == 2


@pytest.mark.parametrize("budget", [10.0, None], ids=["with-budget", "without-budget"])
async def test_a_failed_balance_call_is_said_once_and_the_run_goes_on(tmp_path, budget):
    settings = {"budget_usd": budget} if budget is not None else {}
    manifest = write_manifest(tmp_path, jobs(3), **settings)
    async with Sandbox(token=CANARY, faults=Faults(balance_error=503)) as sandbox:
        code, stdout, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
        assert code == 0, stderr
        assert sandbox.jobs_created == 3
        assert stderr.count("balance: not checked") == 1
        assert "HTTP 503" in stderr
        assert ("the budget ($10.00) still caps the spend" in stderr) == (budget is not None)
    assert (tmp_path / "out" / "run.log").read_text().count("balance: not checked") == 1


async def test_the_token_goes_only_to_https_or_loopback(tmp_path, monkeypatch):
    assert may_carry_token("https://api.runcomfy.net/prod/v2/balance")
    assert may_carry_token("http://127.0.0.1:9/prod/v2/balance") and may_carry_token("http://[::1]:9/b")
    assert may_carry_token("http://localhost:8765/prod/v2/balance")
    assert not may_carry_token("http://api.runcomfy.net/prod/v2/balance")
    assert not may_carry_token("http://10.0.0.7/prod/v2/balance")
    # A plain-http balance URL elsewhere is never asked: the run says why and goes on under its budget.
    monkeypatch.setenv("RUNCOMFY_BALANCE_URL", "http://balance.example.invalid/prod/v2/balance")
    manifest = write_manifest(tmp_path, jobs(1), budget_usd=5)
    async with Sandbox(token=CANARY) as sandbox:
        code, stdout, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
    assert code == 0, stderr
    assert "neither https nor loopback; the API token is not sent there" in stderr
    assert CANARY not in stdout + stderr


async def test_the_balance_answer_is_read_with_care(tmp_path):
    async with Sandbox(token=CANARY, balance_usd=-1.25) as sandbox:
        url = sandbox.base_url + "/prod/v2/balance"
        assert await fetch_balance(url, CANARY) == Balance(-1.25)
        refused = await fetch_balance(url, "wrong-token")
        assert refused.usd is None and "refused the API token" in refused.error
        missing = await fetch_balance(sandbox.base_url + "/no/such/path", CANARY)
        assert missing.usd is None and "HTTP 404" in missing.error


def test_where_the_balance_is_asked():
    assert balance_url(DEFAULT_BASE_URL, {}, DEFAULT_BASE_URL) == DEFAULT_BALANCE_URL
    assert balance_url(DEFAULT_BASE_URL + "/", {}, DEFAULT_BASE_URL) == DEFAULT_BALANCE_URL
    assert balance_url("http://127.0.0.1:8765", {}, DEFAULT_BASE_URL) == "http://127.0.0.1:8765/prod/v2/balance"
    given = {"RUNCOMFY_BALANCE_URL": "https://accounts.example.com/b"}
    assert balance_url("http://127.0.0.1:8765", given, DEFAULT_BASE_URL) == "https://accounts.example.com/b"


async def test_a_bad_balance_url_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_BALANCE_URL", "ftp://example.com/balance")
    manifest = write_manifest(tmp_path, jobs(1))
    async with Sandbox(token=CANARY) as sandbox:
        code, _, stderr = await _main(["run", str(manifest), "--base-url", sandbox.base_url, "--no-preflight"])
        assert code == 2 and "RUNCOMFY_BALANCE_URL must be an http(s) URL" in stderr
        assert sandbox.posts_total == 0


async def test_the_library_run_checks_the_balance_too_and_still_collects_jobs_in_flight(tmp_path):
    from helpers import FakeClock, run

    clock = FakeClock()
    manifest = write_manifest(tmp_path, jobs(3), concurrency=2, max_wait=30, poll_min_interval=1)
    async with Sandbox(token=TOKEN_LIB, balance_usd=1.0, render_seconds=40, clock=clock.now) as sandbox:
        # max_wait leaves two jobs rendering for the next run.
        first, _ = await run(manifest, sandbox, token=TOKEN_LIB, clock=clock)
        assert first.exit_code == 1 and sandbox.jobs_created == 2
        sandbox.balance_usd = 0.10  # spent elsewhere meanwhile
        again, said = await run(manifest, sandbox, token=TOKEN_LIB, clock=clock)
        assert again.exit_code == 3
        assert "after $0.84 for jobs in flight; covers 0 of 1 job to submit" in said
        assert sandbox.posts_total == 2
        rows = ledger_rows(tmp_path / "out")
        assert sorted(row["state"] for row in rows.values()) == ["done", "done", "pending"]


TOKEN_LIB = "lib-token"
