"""The response parser (`api.parse_answer`) as a pure function: the answers that once stranded a paid
job, the submit rule of SPEC, and a bounded fuzz over arbitrary answers.

The fuzz runs 300 + 300 examples (see `FUZZ_EXAMPLES`), a few seconds in all.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchrun.api import CALLS, CancelOutcome, Result, Status, Submitted, parse_answer
from batchrun.errors import (
    AuthError,
    BatchrunError,
    InvalidRequestError,
    MalformedAnswer,
    SubmitOutcomeUnknown,
    TransientApiError,
)
from batchrun.retry import submit_is_retryable

TOKEN = "sk-FUZZ-0123456789"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
NASTY = "\x1b[2J\x1b]8;;http://x\x07\x9b31m\u202e\u2066\u200b\r\nline\x00"
UNSAFE = ("\x1b", "\x07", "\x9b", "\u202e", "\u2066", "\u200b", "\r", "\n", "\x00")
FUZZ_EXAMPLES = (300, 300)


def parse(call: str, status: int, body: Any, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_answer(call, status, headers or {}, data, request_id="r-1", now=NOW, secrets=(TOKEN,))


def failure(call: str, status: int, body: Any, headers: dict | None = None) -> BatchrunError:
    with pytest.raises(BatchrunError) as info:
        parse(call, status, body, headers)
    return info.value


def assert_safe(text: str, limit: int = 1000) -> None:
    assert TOKEN not in text
    assert not [ch for ch in UNSAFE if ch in text], repr(text)
    assert len(text) <= limit


# -- submit: what counts as "nothing was created" (SPEC, Rules a run keeps) -------------------------

@pytest.mark.parametrize(("status", "body"), [
    (500, {"error_code": 400002, "error_message": "no balance"}),  # any 5xx, whatever its body says
    (503, {"error_code": 429001}),
    (502, {"error_code": 422001}),
    (200, {"error_code": 500001}),  # a 2xx with a server-error code naming no job
    (200, {"status": "in_queue"}),
    (200, b"<html>ok</html>"),
    (200, b""),
    (200, {"request_id": ".."}),
    (200, {"request_id": "a/b"}),
    (200, {"request_id": "r 1"}),
    (200, {"request_id": "r" * 129}),
    (200, {"request_id": f"r-{TOKEN}"}),
    (200, {"request_id": ["r-1"]}),
    (200, b'{"request_id": "r-1"'),  # cut short
    (200, b'{"a":' * 1000 + b"1" + b"}" * 1000),
    (303, {}),
    (100, {}),
    (999, {}),
])
def test_a_submit_answer_that_may_have_created_a_job_is_unknown(status, body):
    err = failure("submit", status, body)
    assert isinstance(err, SubmitOutcomeUnknown) and not submit_is_retryable(err)
    assert_safe(str(err))


@pytest.mark.parametrize(("status", "body", "kind"), [
    (400, {"error_code": 500001}, TransientApiError),  # a 4xx is a refusal whatever its code says
    (429, {"message": "slow down"}, TransientApiError),
    (408, b"", TransientApiError),
    (200, {"error_code": 429001}, TransientApiError),  # RunComfy's 4xx-class code in a 2xx naming no job
    (200, {"error_code": 400004}, AuthError),
    (402, {}, AuthError),
    (422, {"detail": [{"loc": ["body", "prompt"], "msg": "required"}]}, InvalidRequestError),
    (409, {}, InvalidRequestError),
])
def test_a_submit_refusal_created_nothing(status, body, kind):
    err = failure("submit", status, body)
    assert type(err) is kind
    assert isinstance(err, (AuthError, InvalidRequestError)) or submit_is_retryable(err)


def test_a_2xx_naming_a_request_created_it_whatever_else_it_says():
    got = parse("submit", 200, {"request_id": "r1", "error_code": 400004, "error_message": f"{TOKEN} expired"})
    assert isinstance(got, Submitted) and got.request_id == "r1"
    assert isinstance(got.problem, AuthError) and "*** expired" in str(got.problem)
    assert parse("submit", 201, {"request_id": 12345}).request_id == "12345"
    assert parse("submit", 200, {"request_id": " 5f0c-e1:a.b_c~d "}).request_id == "5f0c-e1:a.b_c~d"


# -- the answers of issue 9 section 6, and their kin ------------------------------------------------

def test_timestamps_with_and_without_offsets_out_of_range_or_garbage():
    got = parse("result", 200, {"status": "completed", "output": {"video": "https://cdn/a.mp4"},
                                "created_at": "2026-01-01T10:00:00", "finished_at": "2026-01-01T10:01:30Z"})
    assert (got.created_at, got.finished_at) == ("2026-01-01T10:00:00.000Z", "2026-01-01T10:01:30.000Z")
    for odd in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "²", "", 17, None, "x" * 10_000):
        got = parse("result", 200, {"status": "completed", "finished_at": odd, "created_at": odd})
        assert (got.created_at, got.finished_at) == (None, None)


@pytest.mark.parametrize("position", ["²", "٣", "1e3", -1, 1.5, True, [], "9" * 40, float("inf")])
def test_an_unreadable_queue_position_is_none(position):
    data = json.dumps({"status": "in_queue", "queue_position": position}).encode()
    got = parse_answer("status", 200, {}, data, request_id="r-1")
    assert isinstance(got, Status) and got.state == "queued" and got.queue_position is None
    assert parse("status", 200, {"status": "in_queue", "queue_position": " 7 "}).queue_position == 7


@pytest.mark.parametrize("code", ["²", "٤٠٠٠٠٢", "abc", -5, 1.5, 10**12, [400002]])
def test_an_unreadable_error_code_is_an_error_of_unknown_kind(code):
    err = failure("status", 200, {"error_code": code, "message": "odd"})
    assert type(err) is MalformedAnswer and err.code == -1  # retried like a transient failure
    assert isinstance(failure("submit", 200, {"error_code": code, "message": "odd"}), SubmitOutcomeUnknown)


@pytest.mark.parametrize("body", [
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b"[" * 100_000,
    b"\xff\xfe\x00garbage",
    b'{"status": 1}',
    b"[]",
])
def test_an_unreadable_answer_is_malformed_and_retried(body):
    for call in ("status", "result"):
        err = failure(call, 200, body)
        assert isinstance(err, MalformedAnswer) and isinstance(err, TransientApiError)
        assert_safe(str(err))


@pytest.mark.parametrize("url", ["ftp://cdn/a.mp4", "/relative.mp4", "http://[::1", "https://cdn/a b.mp4",
                                 f"https://cdn/{TOKEN}.mp4", "https://cdn/" + "a" * 9000, "https://cdn/\x1b[2J", 42,
                                 [["https://cdn/a.mp4"]]])
def test_an_unusable_output_url_is_malformed_not_stored(url):
    err = failure("result", 200, {"status": "completed", "output": {"video": url}})
    assert isinstance(err, MalformedAnswer)
    assert_safe(str(err))


@pytest.mark.parametrize(("cost", "usd", "flagged"), [
    (0.42, 0.42, False), ("1.26", 1.26, False), ("$0.84", 0.84, False), (0, 0.0, False),
    ("1e308", None, True), (1e308, None, True), (-3, None, True), ("NaN", None, True), ("n/a", None, True),
    (10**400, None, True), (1001, None, True), (None, None, False),
])
def test_an_implausible_cost_is_flagged_and_not_counted(cost, usd, flagged):
    body = json.dumps({"status": "completed", "output": {"video": "https://cdn/a.mp4"}, "cost": cost}).encode()
    got = parse_answer("result", 200, {}, body, request_id="r-1")
    assert got.cost_usd == (pytest.approx(usd) if usd is not None else None)
    assert bool(got.cost_flag) is flagged


def test_server_text_is_capped_neutralised_and_redacted_in_every_field():
    huge = "x" * 270_000 + NASTY + TOKEN
    got = parse("result", 200, {"status": "completed" + NASTY + TOKEN, "error": huge})
    assert got.state == "running"  # a word it does not know: keep polling, the job timeout still applies
    for text in (got.raw_status, got.error):
        assert_safe(text, 300)
    err = failure("status", 400, {"error_message": NASTY + TOKEN + "y" * 270_000})
    assert_safe(str(err), 400) and "***" in str(err)
    err = failure("status", 307, {}, {"Location": f"https://evil.example/{TOKEN}{NASTY}"})
    assert_safe(str(err), 400) and "evil.example/***" in str(err)
    got = parse("cancel", 200, {"outcome": "not_cancellable" + NASTY, "message": TOKEN * 1000})
    assert isinstance(got, CancelOutcome) and not got.cancelled
    assert_safe(got.detail, 300)


# -- fuzz -------------------------------------------------------------------------------------------

KEYS = ["request_id", "status", "queue_position", "output", "video", "videos", "image", "images", "url", "cost",
        "error", "error_code", "error_message", "message", "detail", "loc", "msg", "created_at", "finished_at",
        "outcome", "cancelled", "success", "status_url"]
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["in_queue", "in_progress", "completed", "failed", "cancelled", "https://cdn/a.mp4",
                     "2026-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00", "²", "..", "a/b", "1e308", NASTY]),
    st.builds(lambda a, b: a + TOKEN + b, st.text(max_size=5), st.text(max_size=5)),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), texts)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5),
                      max_leaves=25)
objects = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)
statuses = st.sampled_from([200, 201, 204, 301, 303, 307, 400, 401, 402, 403, 404, 408, 409, 422, 429, 500, 502,
                            503]) | st.integers(0, 999)
headers = st.dictionaries(st.sampled_from(["Retry-After", "Location", "Date", "Content-Type"]) | st.text(max_size=8),
                          texts | st.sampled_from(["1e999", "-5", "Wed, 21 Oct 2015 07:28:00 GMT", "Mon, 99 Foo"]),
                          max_size=4)
any_bodies = st.binary(max_size=200) | values.map(lambda v: json.dumps(v).encode())
TYPES = {"submit": Submitted, "status": Status, "result": Result, "cancel": CancelOutcome}


def _check_parsed(call: str, value: Any) -> None:
    assert isinstance(value, TYPES[call])
    for name, field in vars(value).items():
        for text in field if isinstance(field, list) else [field]:
            if isinstance(text, str):
                assert TOKEN not in text, name
                if name not in ("output_urls", "request_id"):
                    assert_safe(text, 2000)


def _check(call: str, status: int, head: dict, body: bytes) -> None:
    try:
        value = parse_answer(call, status, head, body, request_id="r-1", now=NOW, secrets=(TOKEN,))
    except BatchrunError as err:
        assert_safe(str(err), 2000)
    else:
        _check_parsed(call, value)


@settings(max_examples=FUZZ_EXAMPLES[0], deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CALLS), statuses, headers, objects)
@example("result", 200, {}, {"status": "completed", "output": {"video": "https://cdn/a.mp4"}, "cost": "1e308"})
def test_fuzz_any_json_answer_is_a_value_or_our_own_error(call, status, head, data):
    _check(call, status, head, json.dumps(data).encode())


@settings(max_examples=FUZZ_EXAMPLES[1], deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CALLS), statuses, headers, any_bodies)
@example("status", 200, {}, b'{"a":' * 1000 + b"1" + b"}" * 1000)
def test_fuzz_any_bytes_are_a_value_or_our_own_error(call, status, head, body):
    _check(call, status, head, body)
