"""PollPlanner: pure arithmetic on ages and durations, no clock needed."""

from __future__ import annotations

import pytest

from batchrun.polling import NO_STAMPS, WHOLE_SECONDS, PollPlanner, RenderStarts, StampResolution


def test_probes_with_growing_intervals_before_any_history():
    planner = PollPlanner(min_interval=1.0, max_interval=30.0)
    assert planner.known == 0
    delays = [planner.next_delay(age=0.0, polls=n) for n in range(20)]
    assert delays[0] == pytest.approx(1.0)
    assert delays[1] == pytest.approx(1.25)
    assert delays[2] == pytest.approx(1.5625)
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


def test_polls_at_evenly_spaced_quantiles_of_the_spread_then_backs_off_for_stragglers():
    planner = PollPlanner(min_interval=0.5, max_interval=60.0)
    for seconds in range(60, 121, 2):  # 60 .. 120 s, evenly
        planner.observe(float(seconds))
    ages, age, polls = [], 0.0, 0
    while age < 120:
        age += planner.next_delay(age=age, polls=polls)
        polls += 1
        ages.append(age)
    # The first poll at the early edge (a third of recent renders done), then every further third.
    assert ages == [pytest.approx(80), pytest.approx(100), pytest.approx(120)]
    inside = planner.next_delay(age=90.0, polls=1)
    late = planner.next_delay(age=400.0, polls=10)
    assert late > inside
    assert late <= 60


def test_delays_are_clamped_to_min_and_max_except_the_wait_for_the_early_edge():
    planner = PollPlanner(min_interval=2.0, max_interval=10.0)
    planner.observe(0.01)
    assert planner.next_delay(age=0.0, polls=0) == 2.0
    assert planner.next_delay(age=1.0, polls=3) == 2.0
    slow = PollPlanner(min_interval=2.0, max_interval=10.0)
    slow.observe(600.0)
    # No recent render ended before 600 s: polling every 10 s until then would only cost calls.
    assert slow.next_delay(age=0.0, polls=0) == pytest.approx(600.0)
    assert slow.next_delay(age=10_000.0, polls=50) == 10.0  # a straggler: back to the cap


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
    for duration in (8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0):
        planner.observe(duration)
    assert not planner.likely_done(age=9.9)  # the early edge: a third of recent renders
    assert planner.likely_done(age=10.0)


def test_the_window_follows_renders_as_they_drift():
    planner = PollPlanner(min_interval=0.1, max_interval=100.0, window=8)
    for _ in range(8):
        planner.observe(100.0)
    for _ in range(8):
        planner.observe(60.0)
    assert planner.next_delay(age=0.0, polls=0) == pytest.approx(60.0)


def test_a_job_found_done_at_its_first_poll_says_only_at_most_and_renders_getting_shorter_are_learned():
    planner = PollPlanner(min_interval=0.01, max_interval=100.0)
    for _ in range(10):
        planner.observe(100.0)
    # Renders now take 80 s: every job is found done at its first poll (100 s), which says "at most 100".
    first_polls = []
    for _ in range(60):
        first = planner.next_delay(age=0.0, polls=0)
        first_polls.append(first)
        planner.observe_interval(0.0, first)
    assert first_polls[0] == pytest.approx(100.0)
    assert first_polls[-1] < 90.0 and first_polls == sorted(first_polls, reverse=True)


def test_an_interval_is_filled_in_with_recent_renders_inside_it_and_never_outside():
    planner = PollPlanner()
    for seconds in (60.0, 70.0, 80.0, 90.0, 100.0):
        planner.observe(seconds)
    assert planner.observe_interval(75.0, 95.0) in (80.0, 90.0)  # not done at 75, done by 95: renders 80, 90
    assert planner.observe_interval(101.0, 103.0) == pytest.approx(102.0)  # none inside: its middle
    assert 0.0 <= planner.observe_interval(-5.0, 0.5) <= 0.5


def test_stamp_resolution_is_read_from_the_stamps():
    fine = StampResolution()
    fine.note("2026-01-01T10:00:00.250Z", "2026-01-01T10:01:30.000Z")
    assert fine.seconds is not None and fine.seconds < 0.01  # one fraction of a second proves it
    assert fine.span("2026-01-01T10:00:00.250Z", "2026-01-01T10:01:30.250Z") == pytest.approx((89.998, 90.002))

    whole = StampResolution()
    for _ in range(2):
        whole.note("2026-01-01T10:00:00.000Z", "2026-01-01T10:01:30.000Z")
    assert whole.seconds is None  # two whole-second stamps could be chance
    assert whole.span("2026-01-01T10:00:00.000Z", "2026-01-01T10:01:30.000Z") is None
    whole.note("2026-01-01T10:00:00.000Z", "2026-01-01T10:00:01.000Z")
    assert whole.seconds == WHOLE_SECONDS
    # "1 s" from whole-second stamps is anything between 0 and 2 s: never a zero spread.
    assert whole.span("2026-01-01T10:00:00.000Z", "2026-01-01T10:00:01.000Z") == (0.0, 2.0)

    missing = StampResolution()
    for _ in range(3):
        missing.note(None, None)
    assert missing.seconds == NO_STAMPS
    assert missing.span("2026-01-01T10:00:00.250Z", "2026-01-01T10:00:01.500Z") is None


def test_whole_second_stamps_of_equal_renders_do_not_make_the_planner_poll_densely():
    """Every job says "1 s" on whole-second stamps; the client saw each end between two polls. What is
    learned keeps a spread the stamps cannot rule out, so polling past it backs off instead of hammering."""
    planner = PollPlanner(min_interval=0.001, max_interval=10.0)
    for _ in range(3):
        planner.stamps.note("2026-01-01T10:00:00.000Z", "2026-01-01T10:00:01.000Z")
    low, high = planner.stamps.span("2026-01-01T10:00:00.000Z", "2026-01-01T10:00:01.000Z")
    for _ in range(10):
        planner.observe_interval(max(low, 0.9), min(high, 1.1))
    ages, age, polls = [], 0.0, 0
    while age < 3.0:
        age += planner.next_delay(age=age, polls=polls)
        polls += 1
        ages.append(age)
    assert len(ages) <= 12, ages
    assert all(b - a >= 0.03 for a, b in zip(ages, ages[1:], strict=False)), ages


def test_render_starts_a_job_queued_ahead_starts_when_one_of_ours_is_seen_finished():
    starts = RenderStarts(slots=2)
    assert starts.submitted("a", 0.0) and starts.submitted("b", 0.5)
    assert not starts.submitted("c", 1.0)  # beyond the slots: waits in the provider's queue
    assert not starts.submitted("d", 1.5)
    assert starts.start_of("c") is None and starts.waiting() == 2
    assert starts.leader() == "a"
    assert starts.finished("b", 9.0) == "c"  # the first waiting job takes the slot, from the finish
    assert starts.start_of("c") == 9.0
    assert starts.finished("a", 10.0) == "d"
    assert starts.finished("c", 19.0) is None  # nobody waits
    assert starts.submitted("e", 20.0)  # a free slot: rendering at once


def test_render_starts_the_apis_queue_position_overrides_the_guess():
    starts = RenderStarts(slots=3)
    for key in "abc":
        assert starts.submitted(key, 0.0)
    starts.queued("c", 2)  # someone else's job renders: "c" is second in the provider's queue
    assert starts.start_of("c") is None
    assert starts.finished("a", 5.0) is None  # the slot went to the job ahead of "c"
    assert starts.finished("b", 6.0) == "c"
    assert starts.start_of("c") == 6.0


def test_render_starts_a_job_seen_running_while_ours_fill_the_slots_took_a_finish_not_seen_yet():
    starts = RenderStarts(slots=2)
    starts.submitted("a", 0.0)
    starts.submitted("b", 0.0)
    starts.submitted("c", 0.0)
    starts.running("c", 4.0, 8.0)  # "a" or "b" ended unseen; "c" started between two answers
    assert starts.start_is_guessed("c")
    assert starts.finished("a", 5.0) == "c"  # that finish was the one "c" took: its start pinned down
    assert starts.start_of("c") == 5.0 and not starts.start_is_guessed("c")
    starts.submitted("d", 9.0)
    assert starts.start_of("d") is None
    assert starts.finished("b", 10.0) == "d"
