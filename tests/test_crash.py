"""Crash safety, proven on a real process: SIGKILL at the moments that could cost money or a result,
restart, and check that nothing was paid twice and nothing paid for was lost."""

import random

import pytest
from crash_harness import make_harness


@pytest.fixture
def harness(tmp_path):
    h = make_harness(tmp_path)
    yield h
    h.sandbox.close()


def finish(h, resubmit: bool) -> set[str]:
    """Run until everything is done; returns the jobs the test chose to resubmit."""
    unknown = h.unknown_jobs()
    extra = ("--resubmit-unknown",) if resubmit and unknown else ()
    assert h.run(*extra) == 0
    h.check_final(unknown if resubmit else set())
    return unknown


def test_kill_after_intent_leaves_the_job_unknown_and_never_creates_it_twice(harness):
    assert harness.run(crash_at="after_intent:2") == -9
    assert harness.jobs_created()["clip-1"] == 0  # killed right after its intent: its POST never left
    assert harness.run() == 1  # interrupted submits are held as unknown, the rest are done
    assert "clip-1" in harness.unknown_jobs()
    resubmitted = finish(harness, resubmit=True)
    assert "clip-1" in resubmitted
    assert harness.jobs_created()["clip-1"] == 1


def test_kill_after_the_post_is_answered_but_before_it_is_recorded(harness):
    assert harness.run(crash_at="after_post:1") == -9
    first = next(job for job, n in harness.jobs_created().items() if n == 1)  # answered, never recorded
    assert harness.run() == 1
    assert first in harness.unknown_jobs()
    assert harness.jobs_created()[first] == 1  # held, not resubmitted
    finish(harness, resubmit=True)
    assert harness.jobs_created()[first] == 2  # the one double payment the user asked for


def test_kill_mid_download_resumes_from_the_result_without_resubmitting(harness):
    assert harness.run(crash_at="mid_download:3") == -9
    assert list(harness.output.glob("*.part"))  # the kill left a partial download behind
    resubmitted = finish(harness, resubmit=True)  # a submit in flight at the kill is held as unknown
    created = harness.jobs_created()
    assert all(n == 1 for job, n in created.items() if job not in resubmitted), created
    assert not list(harness.output.glob("*.part"))


@pytest.mark.parametrize("point, name", [("results_rewrite", "results.jsonl"), ("report_rewrite", "report.html")])
def test_kill_during_a_rewrite_keeps_a_whole_file_and_the_next_run_removes_the_temp(harness, point, name):
    assert harness.run(crash_at=point) == -9
    results = harness.output / "results.jsonl"
    assert not results.exists() or all(line.startswith("{") for line in results.read_text().splitlines())
    assert len(list(harness.output.glob(f".{name}.*.tmp"))) == 1  # what the kill left
    assert harness.run() == 0
    created = harness.check_final(set())
    assert set(created.values()) == {1}
    assert len(results.read_text().splitlines()) == 6
    assert not [p.name for p in harness.output.iterdir() if p.name.endswith(".tmp")]


def test_random_kills_never_pay_twice_or_lose_a_result(harness):
    rng = random.Random(20261125)
    harness.random_kills(8, rng, max_delay=1.2)
    before = harness.jobs_created()
    assert all(n <= 1 for n in before.values()), before  # no run resubmitted anything on its own
    finish(harness, resubmit=True)
