"""Adaptive polling: when to ask about a job next, learned from the jobs finished so far.

A fixed interval either wastes calls (short) or loses time at every finish (long). Instead:
- before anything has finished, probe with growing intervals (min, 1.5x, 2.25x, ... up to max);
- once durations are known, sleep until the early edge of the expected finish (a low quantile of
  recent durations), then poll densely across the spread, backing off again for stragglers.

Durations come from the server's own `created_at`/`finished_at` when it gives them (exact), else
from our polls (the midpoint between the last "not finished" and the first "finished" answer).
Everything here is pure: ages and durations are plain seconds, so tests need no clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, int(q * (len(sorted_values) - 1) + 0.5)))
    return sorted_values[index]


@dataclass
class PollPlanner:
    """Learns job durations and says how long to wait before the next status call."""

    min_interval: float = 1.0
    max_interval: float = 30.0
    window: int = 64  # recent durations kept; the load on the provider drifts during a batch

    def __post_init__(self) -> None:
        self._durations: deque[float] = deque(maxlen=self.window)

    def observe(self, duration: float) -> None:
        """Record how long a finished job took from its submission to its finish, in seconds."""
        if duration >= 0:
            self._durations.append(duration)

    @property
    def known(self) -> int:
        return len(self._durations)

    def likely_done(self, age: float) -> bool:
        """Whether a job this old has probably finished: past the early edge of the learned durations."""
        return bool(self._durations) and age >= _quantile(sorted(self._durations), 0.1)

    def next_delay(self, age: float, polls: int) -> float:
        """Seconds to wait before polling a job that is `age` seconds old and was polled `polls` times."""
        if not self._durations:
            # The exponent is capped: 1.5**polls overflows a float after ~1750 polls of a stuck job.
            delay = self.min_interval * 1.5 ** min(polls, 64)
            return self._clamp(delay)
        ordered = sorted(self._durations)
        early, late = _quantile(ordered, 0.1), _quantile(ordered, 0.9)
        if age < early:
            return self._clamp(early - age)
        spread = max(late - early, 0.0)
        if age <= late:
            # Dense across the expected window: a handful of polls covers it.
            return self._clamp(max(spread / 4, 0.02 * early))
        # A straggler: back off gradually so a stuck job does not cost a call per interval forever.
        overdue = age - late
        return self._clamp(max(spread / 4, 0.02 * early, overdue / 2))

    def _clamp(self, delay: float) -> float:
        return min(self.max_interval, max(self.min_interval, delay))
