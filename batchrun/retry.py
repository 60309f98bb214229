"""When to try an API call again, and how long to wait first.

Everything here except `with_retries` is a pure function of its arguments, so the rules can be
tested without a network or a clock. `with_retries` takes its sleep, random source and clock as
arguments for the same reason.

Two questions are kept apart on purpose:

* `is_retryable` answers "can trying again help?" for calls that are safe to repeat (status,
  result, cancel, downloads).
* `submit_is_retryable` answers the stricter "can this failed POST have created a paid job?";
  only a submit that certainly created nothing is sent again.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from batchrun.errors import TransientApiError

T = TypeVar("T")

_DELAY_SECONDS = re.compile(r"[+-]?\d+(\.\d+)?")


@dataclass(frozen=True)
class RetryPolicy:
    """How persistently to retry.

    `max_attempts` counts every try, the first included (1 means never retry). Waits grow as
    `base_delay * 2**attempt` up to `max_delay`, with full jitter. A server's Retry-After is honoured
    up to `max_retry_after` seconds, so a confused server cannot park a run for hours.
    """

    max_attempts: int = 8
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0


def parse_retry_after(value: str | None, now: datetime, server_date: str | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value, or None if it says nothing usable.

    Accepts delay-seconds ("120", also "1.5") and an HTTP-date ("Wed, 21 Oct 2015 07:28:00 GMT").
    A date is measured from the same answer's ``Date`` header (`server_date`) when that is readable:
    both come from the server's clock, so an hour of clock skew between it and us cannot turn a 2 s
    wait into an hour (or into none). Without a usable `server_date` it is measured from `now`.
    A negative delay or a date in the past gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    when = _http_date(text)
    if when is None:
        return None
    origin = _http_date(server_date) if server_date else None
    return max(0.0, (when - (origin or _as_utc(now))).total_seconds())


def _http_date(text: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # Python 3.10 returns None instead of raising on some garbage
        return None
    return _as_utc(when)


def backoff_delay(attempt: int, policy: RetryPolicy, rand: Callable[[], float]) -> float:
    """Full-jitter exponential backoff: a uniform pick in ``[0, min(max_delay, base * 2**attempt)]``.

    `attempt` is the 0-based index of the attempt that just failed; `rand` returns a float in [0, 1).
    Full jitter spreads out the many jobs of a batch that hit the same outage at the same moment.
    """
    # Cap the exponent: 2**attempt overflows a float long before anyone retries that often.
    ceiling = min(policy.max_delay, policy.base_delay * 2 ** min(max(attempt, 0), 64))
    return max(0.0, rand() * ceiling)


def is_retryable(err: BaseException) -> bool:
    """Whether repeating a *repeatable* call (status, result, cancel, download) may succeed.

    Only `TransientApiError` qualifies: connection failures, timeouts, 408, 429 and 5xx. Auth and
    balance problems, rejected input and unknown request ids are answers that repeating cannot change,
    and none of batchrun's `DownloadError` subclasses describes a passing condition (an expired URL
    needs a fresh one from the result call, not the same request again).
    """
    return isinstance(err, TransientApiError)


def submit_is_retryable(err: BaseException) -> bool:
    """Whether a failed submit certainly created no job, so sending it again cannot pay twice.

    True only for a `TransientApiError` that never reached the server (``connected=False``) or that the
    server refused to take on (``refused``: a 4xx such as 408 or 429). Everything else, including every
    5xx whatever its body says and `SubmitOutcomeUnknown`, is False: a 5xx may come from a failure
    *after* the job was created.
    """
    if not isinstance(err, TransientApiError):
        return False
    return not err.connected or err.refused


def next_delay(
    err: BaseException,
    attempt: int,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
    now: datetime | None = None,
    *,
    retryable: Callable[[BaseException], bool] = is_retryable,
) -> float | None:
    """Seconds to wait before trying again after `err`, or None to give up.

    `attempt` is the 0-based index of the attempt that failed. Gives up when `retryable(err)` is
    false or `policy.max_attempts` tries have been made.

    Retry-After is a floor, not an exact time: we wait ``max(min(retry_after, max_retry_after),
    backoff)``. So we never come back sooner than the server asked (up to the cap), and a
    ``Retry-After: 0`` from an overloaded server cannot turn the retries into a tight loop.

    `now` is accepted for symmetry with `with_retries` but not needed: API errors carry Retry-After
    already converted to seconds at the moment the answer arrived.
    """
    del now
    if not retryable(err) or attempt + 1 >= policy.max_attempts:
        return None
    delay = backoff_delay(attempt, policy, rand)
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None and math.isfinite(retry_after):
        delay = max(delay, min(max(0.0, retry_after), policy.max_retry_after))
    return delay


def negative_is_final(answers: int, since_anchor: float, grace: float) -> bool:
    """Whether a negative answer about a paid request ("not found", "completed" without outputs) may be
    believed: it was given `answers` times in a row, the last `since_anchor` seconds after the job was
    submitted or seen completed. APIs built on queues and object stores show a new request, or a
    result's outputs, a moment late; so it must have held past the `grace` window, and been confirmed
    by a second answer however old the request is."""
    return answers >= 2 and since_anchor >= grace


def doubt_delay(answers: int, since_anchor: float, grace: float, policy: RetryPolicy,
                rand: Callable[[], float]) -> float:
    """Seconds to wait before asking again after `answers` negative answers: backoff with full
    jitter, no longer than what is left of the grace window, and at least one second."""
    return max(1.0, min(backoff_delay(answers - 1, policy, rand), grace - since_anchor))


async def with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    retryable: Callable[[BaseException], bool] = is_retryable,
    on_retry: Callable[[BaseException, int, float], Any] | None = None,
) -> T:
    """Await `call()` until it succeeds, retrying failures that `retryable` accepts.

    Gives up after `policy.max_attempts` tries and re-raises the last error unchanged. Only
    `Exception`s are considered: cancellation (Ctrl-C) passes straight through.

    `on_retry(err, failures, delay)` is called (and awaited, if it returns an awaitable) before each
    wait; `failures` counts the failed attempts so far, starting at 1. Use it to log, or to record
    an extra POST in the ledger when retrying a submit (pass ``retryable=submit_is_retryable``).
    """
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as err:
            delay = next_delay(err, attempt, policy, rand, now(), retryable=retryable)
            if delay is None:
                raise
            if on_retry is not None:
                outcome = on_retry(err, attempt + 1, delay)
                if inspect.isawaitable(outcome):
                    await outcome
        await sleep(delay)
        attempt += 1


def _as_utc(when: datetime) -> datetime:
    # HTTP-dates are always GMT; a naive datetime here can only mean UTC.
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when
