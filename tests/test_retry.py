"""Retry rules, tested as pure functions with a fake clock, random source and sleep."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from batchrun.errors import (
    ApiError,
    AuthError,
    DiskFull,
    DownloadError,
    InvalidRequestError,
    OutputUrlExpired,
    RequestNotFound,
    SubmitOutcomeUnknown,
    TransientApiError,
)
from batchrun.retry import (
    RetryPolicy,
    backoff_delay,
    is_retryable,
    next_delay,
    parse_retry_after,
    submit_is_retryable,
    with_retries,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


# ------------------------------------------------------------------ parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), (" 7 ", 7.0), ("0", 0.0), ("1.5", 1.5), ("-5", 0.0)],
)
def test_retry_after_seconds(value, expected):
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date_in_future():
    header = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(header, NOW) == pytest.approx(90.0)


def test_retry_after_http_date_in_past_is_zero():
    header = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(header, NOW) == 0.0


def test_retry_after_naive_now_is_taken_as_utc():
    header = "Sat, 01 Mar 2025 12:00:30 GMT"
    assert parse_retry_after(header, NOW.replace(tzinfo=None)) == pytest.approx(30.0)


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "12 seconds", "nan", "Mon, 99 Foo 2025", "1e3"])
def test_retry_after_garbage_is_none(value):
    assert parse_retry_after(value, NOW) is None


# ------------------------------------------------------------------ backoff


def test_backoff_full_jitter_bounds():
    policy = RetryPolicy(base_delay=1.0, max_delay=60.0)
    assert backoff_delay(0, policy, lambda: 0.0) == 0.0
    assert backoff_delay(0, policy, lambda: 0.999) == pytest.approx(0.999)
    assert backoff_delay(3, policy, lambda: 0.5) == pytest.approx(4.0)  # 0.5 * 1 * 2**3
    assert backoff_delay(10, policy, lambda: 0.5) == pytest.approx(30.0)  # capped at max_delay
    assert backoff_delay(10_000, policy, lambda: 0.999) <= 60.0  # no overflow on huge attempts


def test_backoff_never_exceeds_ceiling_for_any_rand():
    policy = RetryPolicy(base_delay=0.5, max_delay=8.0)
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        for r in (0.0, 0.25, 0.5, 0.999999):
            assert 0.0 <= backoff_delay(attempt, policy, lambda r=r: r) <= ceiling


# ------------------------------------------------------------------ which errors retry


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (TransientApiError("x", status=503), True),
        (TransientApiError("x", connected=False), True),
        (TransientApiError("x", status=500, code=500001), True),
        (AuthError("x", status=401), False),
        (AuthError("x", status=200, code=400002), False),
        (InvalidRequestError("x", status=422), False),
        (RequestNotFound("x", status=404), False),
        (ApiError("x", status=302), False),
        (SubmitOutcomeUnknown("x"), False),
        (DownloadError("x"), False),
        (OutputUrlExpired("x"), False),
        (DiskFull("x"), False),
        (ValueError("x"), False),
    ],
)
def test_is_retryable(err, expected):
    assert is_retryable(err) is expected


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (TransientApiError("no connection", connected=False), True),
        (TransientApiError("rate limited", status=429), True),
        (TransientApiError("request timeout", status=408), True),
        (TransientApiError("unavailable", status=503), False),  # every 5xx: may have been created
        (TransientApiError("422 with 500001", status=422, code=500001), True),
        (TransientApiError("internal", status=500), False),
        (TransientApiError("bad gateway", status=502), False),
        (TransientApiError("gateway timeout", status=504), False),
        (TransientApiError("read timeout after sending"), False),  # connected, no status
        (TransientApiError("200 with 500001", status=200, code=500001), False),
        (SubmitOutcomeUnknown("lost answer"), False),
        (AuthError("balance", status=402), False),
        (InvalidRequestError("bad input", status=422), False),
    ],
)
def test_submit_is_retryable(err, expected):
    assert submit_is_retryable(err) is expected


# ------------------------------------------------------------------ next_delay


def test_next_delay_gives_up_on_permanent_errors():
    policy = RetryPolicy()
    assert next_delay(AuthError("x", status=401), 0, policy, lambda: 0.5, NOW) is None
    assert next_delay(InvalidRequestError("x"), 0, policy, lambda: 0.5, NOW) is None


def test_next_delay_gives_up_after_max_attempts():
    policy = RetryPolicy(max_attempts=3)
    err = TransientApiError("x", status=502)
    assert next_delay(err, 0, policy, lambda: 0.5, NOW) is not None
    assert next_delay(err, 1, policy, lambda: 0.5, NOW) is not None
    assert next_delay(err, 2, policy, lambda: 0.5, NOW) is None


def test_next_delay_without_retry_after_is_backoff():
    policy = RetryPolicy(base_delay=2.0, max_delay=60.0)
    err = TransientApiError("x", status=502)
    assert next_delay(err, 2, policy, lambda: 0.25, NOW) == pytest.approx(2.0)  # 0.25 * 2 * 4


def test_next_delay_honours_retry_after_as_a_floor():
    policy = RetryPolicy(base_delay=1.0, max_delay=60.0)
    err = TransientApiError("x", status=429, retry_after=42.0)
    assert next_delay(err, 0, policy, lambda: 0.0, NOW) == 42.0
    # A jittered backoff longer than Retry-After wins: we never come back sooner than asked.
    short = TransientApiError("x", status=429, retry_after=1.0)
    assert next_delay(short, 6, policy, lambda: 0.5, NOW) == pytest.approx(30.0)


def test_next_delay_caps_retry_after():
    policy = RetryPolicy(max_retry_after=300.0)
    err = TransientApiError("x", status=503, retry_after=86_400.0)
    assert next_delay(err, 0, policy, lambda: 0.0, NOW) == 300.0


def test_next_delay_with_submit_rules():
    policy = RetryPolicy()
    assert next_delay(TransientApiError("x", status=502), 0, policy, retryable=submit_is_retryable) is None
    assert next_delay(TransientApiError("x", status=429), 0, policy, retryable=submit_is_retryable) is not None


# ------------------------------------------------------------------ with_retries


class FakeSleep:
    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def failing_then(results):
    """A call that raises or returns the scripted results in turn, counting its calls."""
    calls = {"n": 0}

    async def call():
        item = results[calls["n"]]
        calls["n"] += 1
        if isinstance(item, BaseException):
            raise item
        return item

    return call, calls


async def test_with_retries_returns_first_success():
    sleep = FakeSleep()
    call, calls = failing_then([TransientApiError("a", status=502), TransientApiError("b"), "ok"])
    result = await with_retries(call, policy=RetryPolicy(), sleep=sleep, rand=lambda: 0.5, now=lambda: NOW)
    assert result == "ok"
    assert calls["n"] == 3
    assert sleep.delays == [pytest.approx(0.5), pytest.approx(1.0)]


async def test_with_retries_stops_after_max_attempts_and_reraises_last_error():
    sleep = FakeSleep()
    errors = [TransientApiError(f"try {i}", status=503) for i in range(4)]
    call, calls = failing_then(errors)
    with pytest.raises(TransientApiError) as info:
        await with_retries(call, policy=RetryPolicy(max_attempts=4), sleep=sleep, rand=lambda: 0.0)
    assert info.value is errors[-1]
    assert calls["n"] == 4
    assert len(sleep.delays) == 3


async def test_with_retries_honours_retry_after():
    sleep = FakeSleep()
    call, _ = failing_then([TransientApiError("slow down", status=429, retry_after=17.0), "ok"])
    assert await with_retries(call, policy=RetryPolicy(), sleep=sleep, rand=lambda: 0.0) == "ok"
    assert sleep.delays == [17.0]


async def test_with_retries_never_retries_auth_error():
    sleep = FakeSleep()
    err = AuthError("balance exhausted", status=402)
    call, calls = failing_then([err, "never reached"])
    with pytest.raises(AuthError):
        await with_retries(call, policy=RetryPolicy(), sleep=sleep, rand=lambda: 0.5)
    assert calls["n"] == 1
    assert sleep.delays == []


async def test_with_retries_submit_rules_do_not_resend_after_502():
    sleep = FakeSleep()
    call, calls = failing_then([TransientApiError("bad gateway", status=502), "never reached"])
    with pytest.raises(TransientApiError):
        await with_retries(call, policy=RetryPolicy(), sleep=sleep, retryable=submit_is_retryable)
    assert calls["n"] == 1


async def test_with_retries_reports_each_retry():
    seen = []

    async def on_retry(err, failures, delay):
        seen.append((str(err), failures, delay))

    call, _ = failing_then([TransientApiError("a"), TransientApiError("b"), 7])
    result = await with_retries(
        call, policy=RetryPolicy(), sleep=FakeSleep(), rand=lambda: 1.0 - 1e-9, on_retry=on_retry
    )
    assert result == 7
    assert [(msg, n) for msg, n, _ in seen] == [("a", 1), ("b", 2)]
    assert seen[0][2] == pytest.approx(1.0) and seen[1][2] == pytest.approx(2.0)


async def test_with_retries_lets_cancellation_through():
    import asyncio

    call, calls = failing_then([asyncio.CancelledError(), "never reached"])
    with pytest.raises(asyncio.CancelledError):
        await with_retries(call, policy=RetryPolicy(), sleep=FakeSleep())
    assert calls["n"] == 1
