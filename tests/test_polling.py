"""PollPlanner: pure arithmetic on ages and durations, no clock needed."""

from __future__ import annotations

import pytest

from batchrun.polling import PollPlanner


def test_probes_with_growing_intervals_before_any_history():
    planner = PollPlanner(min_interval=1.0, max_interval=30.0)
    assert planner.known == 0
    delays = [planner.next_delay(age=0.0, polls=n) for n in range(12)]
    assert delays[0] == pytest.approx(1.0)
    assert delays[1] == pytest.approx(1.5)
    assert delays[2] == pytest.approx(2.25)
    assert all(b >= a for a, b in zip(delays, delays[1:], strict=False))
    assert delays[-1] == 30.0  # capped


def test_after_observing_durations_the_first_delay_is_the_expected_duration():
    planner = PollPlanner(min_interval=0.1, max_interval=30.0)
    for _ in range(10):
        planner.observe(1.0)
    assert planner.known == 10
    assert planner.next_delay(age=0.0, polls=0) == pytest.approx(1.0)
    # A job already 0.4 s old waits only for the rest.
    assert planner.next_delay(age=0.4, polls=0) == pytest.approx(0.6)


def test_dense_polls_across_the_spread_then_backs_off_for_stragglers():
    planner = PollPlanner(min_interval=0.5, max_interval=60.0)
    for seconds in range(60, 101, 4):  # 60 .. 100 s
        planner.observe(float(seconds))
    first = planner.next_delay(age=0.0, polls=0)
    assert 60 <= first <= 65
    inside = planner.next_delay(age=80.0, polls=1)
    assert inside <= 12  # a handful of polls across the 60-100 s window
    late = planner.next_delay(age=200.0, polls=10)
    assert late > inside
    assert late <= 60


def test_delays_are_clamped_to_min_and_max():
    planner = PollPlanner(min_interval=2.0, max_interval=10.0)
    planner.observe(0.01)
    assert planner.next_delay(age=0.0, polls=0) == 2.0
    assert planner.next_delay(age=1.0, polls=3) == 2.0
    slow = PollPlanner(min_interval=2.0, max_interval=10.0)
    slow.observe(600.0)
    assert slow.next_delay(age=0.0, polls=0) == 10.0
    assert slow.next_delay(age=10_000.0, polls=50) == 10.0


def test_negative_durations_are_ignored_and_the_window_is_bounded():
    planner = PollPlanner(min_interval=0.1, max_interval=100.0, window=4)
    planner.observe(-1.0)
    assert planner.known == 0
    for _ in range(10):
        planner.observe(50.0)
    for _ in range(4):
        planner.observe(5.0)
    assert planner.known == 4
    assert planner.next_delay(age=0.0, polls=0) == pytest.approx(5.0)  # old durations have left the window


def test_a_job_polled_for_days_without_history_does_not_overflow():
    planner = PollPlanner(min_interval=1.0, max_interval=30.0)
    assert planner.next_delay(age=7 * 86400.0, polls=20_000) == 30.0


def test_a_job_is_likely_done_from_the_early_edge_of_learned_durations():
    planner = PollPlanner(min_interval=0.1, max_interval=30.0)
    assert not planner.likely_done(age=1000.0)  # nothing learned: no guess
    for duration in (8.0, 9.0, 10.0, 11.0, 12.0):
        planner.observe(duration)
    assert not planner.likely_done(age=7.9)
    assert planner.likely_done(age=8.0)
