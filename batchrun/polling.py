"""Adaptive polling: when to ask about a job next, learned from the jobs finished so far.

A fixed interval either wastes calls (short) or loses time at every finish (long). Instead:
- before anything has finished, probe with growing intervals (min, x1.25 each time, up to max);
- once render times are known, poll at evenly spaced quantiles of the recent ones (`polls_per_spread`
  polls from the early edge to the slowest), then back off for stragglers.

What a render took is learned from two sources, combined as an interval (`observe_interval`):
- what the client saw on its own clock: the render ended after the last "not finished" answer and
  before the first "finished" one, counted from when it started (`RenderStarts`);
- the server's `created_at`/`finished_at`, as exact as their resolution (`StampResolution`: stamps cut to
  whole seconds say only +-1 s; missing stamps say nothing). A zero spread read from coarse stamps is
  therefore never believed.
A wide interval (a job found finished at its first poll) is filled in with the recent render times that
fall inside it, so it neither drags the quantiles down nor freezes them. The window of recent jobs
follows the provider's load as it drifts.

Everything here is pure: ages and durations are plain seconds, so tests need no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from datetime import datetime

WHOLE_SECONDS = 1.0
NO_STAMPS = math.inf
_FINE = 0.002  # what full-resolution stamps leave open: milliseconds, and the submit answer's latency
_RESOLUTION_AFTER = 3  # stamps read before their resolution is trusted
NUDGE = 0.02  # a render seen finished is recorded at least this fraction before it was seen


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, int(q * (len(sorted_values) - 1) + 0.5)))
    return sorted_values[index]


def _seconds(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat((iso or "").replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class StampResolution:
    """How exact the server's `created_at`/`finished_at` are, read from the stamps themselves.

    `seconds` is None until `_RESOLUTION_AFTER` results have been read; then `WHOLE_SECONDS` if every
    stamp so far fell on a whole second, `NO_STAMPS` if results came without them, else `_FINE`.
    One stamp with a fraction of a second proves the resolution fine for good."""

    def __init__(self) -> None:
        self._read = 0
        self._missing = 0
        self._fraction_seen = False

    def note(self, created_at: str | None, finished_at: str | None) -> None:
        start, end = _seconds(created_at), _seconds(finished_at)
        self._read += 1
        if start is None or end is None:
            self._missing += 1
            return
        if start % 1 or end % 1:
            self._fraction_seen = True

    @property
    def seconds(self) -> float | None:
        if self._fraction_seen:
            return _FINE
        if self._read < _RESOLUTION_AFTER:
            return None
        if self._missing * 2 > self._read:
            return NO_STAMPS
        return WHOLE_SECONDS

    @property
    def exact(self) -> bool:
        """Whether the stamps are exact to the millisecond: their difference is then a render time as is."""
        return self._fraction_seen

    def span(self, created_at: str | None, finished_at: str | None) -> tuple[float, float] | None:
        """The interval, in seconds, that finish minus creation lies in according to these stamps, or None
        when they say nothing (missing, unreadable, or of a resolution not known yet)."""
        start, end = _seconds(created_at), _seconds(finished_at)
        resolution = self.seconds
        if start is None or end is None or resolution is None or resolution == NO_STAMPS or end < start:
            return None
        return max(0.0, end - start - resolution), end - start + resolution


@dataclass
class PollPlanner:
    """Learns render times and says how long to wait before the next call about a job.

    Ages are seconds since the job's render started (or since its submission where that is all that is
    known); durations are seconds of render."""

    min_interval: float = 1.0
    max_interval: float = 30.0
    window: int = 32  # recent render times kept; the load on the provider drifts during a batch
    polls_per_spread: int = 3  # polls from the early edge of the recent renders to the slowest one
    probe_growth: float = 1.25  # before anything is known, each probe waits this much longer than the last

    def __post_init__(self) -> None:
        self._durations: deque[float] = deque(maxlen=self.window)
        self._sorted: list[float] | None = None
        self.stamps = StampResolution()

    def observe(self, duration: float) -> None:
        """Record a render time known exactly, in seconds."""
        if duration >= 0 and math.isfinite(duration):
            self._durations.append(duration)
            self._sorted = None

    def observe_interval(self, low: float, high: float) -> float:
        """Record a render time known only to lie in [low, high] seconds; returns the value recorded: the
        median of the recent render times inside the interval, else its middle, and in any case a little
        (`NUDGE`) before `high` (a job found finished at its first poll says only "at most `high`")."""
        low = max(0.0, low)
        high = max(low, high)
        if high - low <= _FINE or not self._durations:
            value = (low + high) / 2
        else:
            ordered = self._ordered()
            inside = [d for d in ordered if low < d <= high]  # it was not done at `low`
            value = _quantile(inside, 0.5) if inside else (low + high) / 2
            # Found finished, it finished some time before: without this nudge a job always found done at
            # its first poll would confirm the learned time forever, however much sooner renders now end.
            value = max(low, min(value, high - min(NUDGE * high, (high - low) / 4)))
        self.observe(value)
        return value

    @property
    def known(self) -> int:
        return len(self._durations)

    def _ordered(self) -> list[float]:
        if self._sorted is None:
            self._sorted = sorted(self._durations)
        return self._sorted

    def quantile(self, q: float) -> float | None:
        """The `q` quantile (0..1) of the recent render times, or None before any."""
        return _quantile(self._ordered(), q) if self._durations else None

    def likely_done(self, age: float) -> bool:
        """Whether a job this old has probably finished: past the early edge of the learned durations."""
        return bool(self._durations) and age >= self._first_level()

    def _first_level(self) -> float:
        return _quantile(self._ordered(), 1 / self.polls_per_spread)

    def next_delay(self, age: float, polls: int) -> float:
        """Seconds to wait before polling a job that is `age` seconds old and was polled `polls` times."""
        if not self._durations:
            # The exponent is capped: growth**polls would overflow a float for a job stuck for days.
            delay = self.min_interval * self.probe_growth ** min(polls, 64)
            return self._clamp(delay)
        ordered = self._ordered()
        k = self.polls_per_spread
        first = _quantile(ordered, 1 / k)
        # The spacing of the levels; one closer than half of it to the poll just made would say little more.
        gap = (ordered[-1] - first) / k
        if age < first - gap / 2:
            # Not before the early edge of recent renders, even past `max_interval`: no recent job was
            # done sooner, and a wait capped there costs every job calls that cannot find it finished.
            return max(self.min_interval, first - age)
        for i in range(2, k + 1):  # the next of the evenly spaced quantile levels
            level = _quantile(ordered, i / k)
            if level > age + gap / 2:
                return self._clamp(level - age)
        # Past the slowest recent render: back off gradually so a stuck job does not cost a call per
        # interval forever. Steps of at least 4% of that render: a handful of samples (or coarse
        # stamps) showing no spread is not proof that there is none.
        overdue = age - ordered[-1]
        return self._clamp(max(gap, 0.04 * ordered[-1], overdue / 2))

    def _clamp(self, delay: float) -> float:
        return min(self.max_interval, max(self.min_interval, delay))


class RenderStarts:
    """When each of our jobs in flight started rendering, as far as the client can tell.

    The provider renders `slots` jobs at once (batchrun assumes its `concurrency`) and queues the rest in
    submit order. A job submitted while fewer than `slots` of ours render starts at once; one submitted
    beyond that (`queue_ahead`) waits, and starts when one of ours finishes: the first waiting job takes
    the finish time of the job whose end the client saw. The API overrides the guess: a job it says is
    queued waits (its `queue_position` finishes, if given), one it says is running has started. Keys are
    any hashable job keys; times are on the caller's clock."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._started: dict[object, float] = {}
        self._waiting: dict[object, int | None] = {}  # in submit order -> finishes still ahead (None: FIFO)
        self._guessed: set[object] = set()  # started at a time guessed between two answers: not learned from
        # Jobs seen running while ours filled every slot, with the earliest and latest their start can be:
        # each took the slot of a finish not seen yet, and starts when that finish is seen.
        self._took_unseen: list[tuple[object, float, float]] = []

    def submitted(self, key: object, at: float) -> bool:
        """A job was accepted at `at`; True if it is taken to be rendering from then on."""
        if len(self._started) < self.slots and not self._waiting:
            self._started[key] = at
            return True
        self._waiting[key] = None
        return False

    def start_of(self, key: object) -> float | None:
        """When the job started rendering, or None while it is taken to be waiting in the queue."""
        return self._started.get(key)

    def waiting(self) -> int:
        return len(self._waiting)

    def queued(self, key: object, position: int | None) -> None:
        """The API says the job is still queued (`position` jobs ahead of and including it, if given)."""
        self._started.pop(key, None)
        self._waiting[key] = position
        if position is not None:  # the API's order wins over submit order
            self._waiting = dict(sorted(self._waiting.items(), key=lambda kv: (kv[1] is None, kv[1] or 0)))

    def running(self, key: object, earliest: float, latest: float) -> None:
        """The API says the job is rendering: it started between `earliest` and `latest`."""
        if key not in self._started:
            self._waiting.pop(key, None)
            if len(self._started) >= self.slots:  # one of ours ended unseen: its finish, once seen, frees nothing
                self._took_unseen.append((key, earliest, latest))
            self._started[key] = (earliest + latest) / 2
            self._guessed.add(key)

    def start_is_guessed(self, key: object) -> bool:
        """Whether the job's start is only known to lie between two answers far apart."""
        return key in self._guessed

    def finished(self, key: object, at: float) -> object | None:
        """The job's render ended at `at`; returns the job taken to start then (one waiting, or one already
        seen running whose start this pins down), if any."""
        self._waiting.pop(key, None)
        self._guessed.discard(key)
        self._took_unseen = [t for t in self._took_unseen if t[0] != key]
        if self._started.pop(key, None) is None:
            return None
        if self._took_unseen:
            taker, earliest, latest = self._took_unseen.pop(0)
            self._started[taker] = min(latest, max(earliest, at))
            self._guessed.discard(taker)
            return taker
        for other, ahead in self._waiting.items():
            if ahead is not None:
                self._waiting[other] = ahead - 1
        if not self._waiting:
            return None
        head, ahead = next(iter(self._waiting.items()))
        if ahead is not None and ahead > 0:
            return None  # the slot went to a job ahead of ours, someone else's
        del self._waiting[head]
        self._started[head] = at
        return head

    def forget(self, key: object) -> None:
        """The job is no longer followed (left for a later run)."""
        self._started.pop(key, None)
        self._waiting.pop(key, None)
        self._guessed.discard(key)
        self._took_unseen = [t for t in self._took_unseen if t[0] != key]

    def leader(self) -> object | None:
        """The job that started first among those rendering."""
        return min(self._started, key=self._started.__getitem__, default=None)
