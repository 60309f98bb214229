"""The HTTP client for RunComfy's Model API, and the one place that makes sense of its answers.

`parse_answer` (the response parser) turns every HTTP answer (status, headers, body) into a typed
value or an exception from `batchrun.errors`, whatever the answer holds; `classify` is its first
half. `Client` sends the four calls and adds what only it can know: whether a failed request ever
reached the server.

Submitting costs money and the API has no idempotency key, so a submit's answer is sorted into
"created" (a 2xx naming a usable request id, whatever else it says), "certainly created nothing"
(no connection made, or a refusal: a 4xx, or a 2xx whose 4xx-class error code names no job) and
"may have created a job" (everything else, every 5xx included: `SubmitOutcomeUnknown`, never
retried automatically).

This is the one place where the API's text enters batchrun: every string taken from an answer has
passed `servertext.server_text` (capped, control characters neutralised, the token blanked out), and
fields batchrun relies on are checked by `answer_fields`. The token is only ever placed in the
request's Authorization header; request headers are never copied into errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from batchrun import answer_fields as fields
from batchrun.errors import (
    ApiError,
    AuthError,
    BatchrunError,
    InvalidRequestError,
    MalformedAnswer,
    RequestNotFound,
    SubmitOutcomeUnknown,
    TransientApiError,
    UsageError,
)
from batchrun.retry import parse_retry_after, submit_is_retryable
from batchrun.servertext import server_text
from batchrun.settings import check_base_url

log = logging.getLogger("batchrun.api")

CALLS = ("submit", "status", "result", "cancel")
CATALOGUE_CALLS = ("model",)  # answers read as raw JSON objects by batchrun.models.catalogue
MAX_MESSAGE = 300  # characters kept of one message from the API
MAX_URL_TEXT = 2000  # characters kept of an informational URL (status_url...)
MAX_OUTPUTS = 100  # output URLs in one result: more is not an answer to one job
MAX_ANSWER_BYTES = 2 * 1024 * 1024  # an answer is a small JSON object; a larger body is malformed

STATES = ("queued", "running", "completed", "failed", "cancelled")
_STATE_OF = {
    **dict.fromkeys(("in_queue", "queued", "pending", "waiting"), "queued"),
    **dict.fromkeys(("in_progress", "running", "starting", "processing"), "running"),
    **dict.fromkeys(("completed", "succeeded", "success"), "completed"),
    **dict.fromkeys(("failed", "error"), "failed"),
    **dict.fromkeys(("cancelled", "canceled"), "cancelled"),
}
_seen_odd_statuses: set[str] = set()
_MAX_ODD_STATUSES = 100  # a server inventing a new word per answer must not grow memory

# RunComfy's documented error codes. 403001 ("request belongs to another user") is decided per call.
_AUTH_CODES = frozenset({400002, 400004, 401001})
_INVALID_CODES = frozenset({400001, 422001})
_NOT_FOUND_CODES = frozenset({404001})
_TRANSIENT_CODES = frozenset({500001})
_OTHER_USER_CODE = 403001

# Raised only while a connection is being made, i.e. before a single byte of the request was sent.
_CONNECT_FAILURES: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,) + (
    (aiohttp.ConnectionTimeoutError,) if hasattr(aiohttp, "ConnectionTimeoutError") else ()
)


@dataclass(frozen=True)
class Submitted:
    """A job the API accepted. The URLs are informational; the client builds its own from the id."""

    request_id: str
    status_url: str | None
    result_url: str | None
    cancel_url: str | None
    problem: ApiError | None = None  # an error the same answer carried (the job exists regardless)


@dataclass(frozen=True)
class Status:
    """Where a job stands. `state` is one of `STATES`; `raw_status` is what the API said."""

    request_id: str
    state: str
    raw_status: str
    queue_position: int | None


@dataclass(frozen=True)
class Result:
    """A job's result, or its current status when it has not finished (then `output_urls` is empty).

    `state` is one of `STATES`; a "completed" answer carrying an error is reported as "failed".
    `output_urls` lists every output URL once, in the order video, videos, image, images, audio, audios.
    `cost_usd` is the API's figure in USD when it is a plausible one; otherwise it is None and
    `cost_flag` says what the API reported. `created_at` and `finished_at` are ISO 8601 UTC
    (`...Z`) or None when missing or unreadable.
    """

    request_id: str
    state: str
    raw_status: str
    output_urls: list[str]
    cost_usd: float | None
    error: str | None
    created_at: str | None
    finished_at: str | None
    input: dict[str, Any] | None = None  # the job's input, where the answer shows it (undocumented)
    cost_flag: str | None = None
    queue_position: int | None = None  # while queued, when the answer gives one (as the status call does)


@dataclass(frozen=True)
class CancelOutcome:
    """Whether the API confirmed the cancellation; `detail` says what it answered."""

    request_id: str
    cancelled: bool
    detail: str


def make_limiter(requests_per_second: float):
    """An async context manager admitting at most `requests_per_second` entries per second.

    Returns None (no limit) for 0 or infinity. Rates below 1 are supported (0.5 = one call every 2 s).
    """
    if requests_per_second < 0 or math.isnan(requests_per_second):
        raise ValueError(f"requests per second must be positive, not {requests_per_second}")
    if requests_per_second == 0 or math.isinf(requests_per_second):
        return None
    # Imported here so that modules using the client without a limit do not need aiolimiter.
    from aiolimiter import AsyncLimiter

    # AsyncLimiter is a leaky bucket whose capacity is max_rate: below 1 request per second it must be
    # expressed as one request per period, or no request would ever fit.
    if requests_per_second >= 1:
        return AsyncLimiter(requests_per_second, 1.0)
    return AsyncLimiter(1, 1.0 / requests_per_second)


def normalize_state(raw: str) -> str:
    """Map an API status word onto one of `STATES`.

    Unknown words count as "running" (keep polling; the job's timeout still applies) and are logged
    once per distinct value, so a new status on RunComfy's side is noticed without flooding the log.
    """
    key = raw.strip().lower()
    state = _STATE_OF.get(key)
    if state is None:
        state = "running"
        if key not in _seen_odd_statuses and len(_seen_odd_statuses) < _MAX_ODD_STATUSES:
            _seen_odd_statuses.add(key)
            log.warning("unknown job status %r from the API; treating it as running", server_text(raw, 60))
    return state


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    call: str,
    *,
    now: datetime | None = None,
    secrets: tuple[str, ...] = (),
) -> BatchrunError | dict[str, Any]:
    """Turn one HTTP answer to `call` ("submit", "status", "result", "cancel" or "model") into a dict or an error.

    Returns the parsed JSON object when the answer is a usable success. Otherwise returns (does not
    raise) an `ApiError` subclass (`MalformedAnswer` for an answer that cannot be read), or for
    "submit" a `SubmitOutcomeUnknown` when the answer leaves open whether a job was created. All
    server text in an error has passed `server_text`, with every string in `secrets` blanked out.

    The HTTP status decides first: any 5xx is a server error whatever its body says (for a submit:
    outcome unknown). In a 2xx or 4xx answer RunComfy's `error_code` decides the kind of error.
    """
    if call not in CALLS and call not in CATALOGUE_CALLS:
        raise ValueError(f"unknown call {call!r}")
    now = now or datetime.now(timezone.utc)
    data, unreadable = _json_object(body, secrets)
    code = fields.error_code(data.get("error_code")) if data is not None else None
    success = 200 <= status < 300
    if call == "submit" and success and data is not None and data.get("request_id") not in (None, ""):
        return data  # the API named a job it created: whatever else the answer says, it exists
    if success and code is None:
        problem = unreadable or _missing_field(call, data or {})
        if problem is None:
            return data or {}
        if call == "submit":
            return _unknown(f"submit: HTTP {status} with {problem}")
        return MalformedAnswer(f"{call}: HTTP {status} with {problem}", status=status)
    kwargs = {"status": status, "code": code, "retry_after": _retry_after(headers, now)}
    err = _error_for(status, code, call, _message(code, data, body, secrets), kwargs, headers, secrets)
    if call == "submit":
        return _submit_view(err)
    return err


def parse_answer(
    call: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    request_id: str = "",
    now: datetime | None = None,
    secrets: tuple[str, ...] = (),
) -> Submitted | Status | Result | CancelOutcome:
    """The response parser: one HTTP answer to `call` as its typed value.

    Raises only `BatchrunError`s, whatever the answer holds: those of `classify`, `MalformedAnswer`
    for a success whose fields cannot be used, and for "submit" `SubmitOutcomeUnknown` when the
    answer names a job by an unusable request id. A refused cancel is returned as not cancelled.
    `request_id` is the id the call was made for (not used for "submit").
    """
    outcome = classify(status, headers, body, call, now=now, secrets=secrets)
    if isinstance(outcome, BaseException):
        if call == "cancel" and isinstance(outcome, InvalidRequestError):
            return CancelOutcome(request_id=request_id, cancelled=False, detail=outcome.message)
        raise outcome
    if call == "submit":
        return parse_submitted(outcome, status=status, secrets=secrets)
    if call == "status":
        return parse_status(request_id, outcome, secrets)
    if call == "result":
        return parse_result(request_id, outcome, secrets)
    if call == "model":  # a catalogue entry: read by batchrun.models.catalogue, which checks its fields
        if not isinstance(outcome, dict):
            raise MalformedAnswer(f"model: HTTP {status} without a JSON object", status=status)
        return outcome
    return parse_cancel(request_id, outcome, secrets)


def _error_for(status, code, call, message, kwargs, headers, secrets) -> ApiError:
    """The error class for an error answer: the HTTP status for 3xx and 5xx, else RunComfy's code when
    we know it, else the HTTP status (or, in a 2xx, the status class the code's first digits name)."""
    label = f"{call}: HTTP {status}"
    if code is not None:
        label += f", code {code}" if code >= 0 else ", unreadable error_code"
    if 500 <= status <= 599:
        return TransientApiError(f"{label}: server error: {message}", **kwargs)
    if 300 <= status < 400:
        if status == 303:  # "see other": for a POST, processed elsewhere
            return _unreadable(call, f"{label}: unexpected answer: {message}", kwargs)
        where = server_text(headers.get("Location", ""), 100, secrets)
        return InvalidRequestError(f"{label}: redirected to {where or '?'}; check the base URL", **kwargs)
    if not 200 <= status < 500:  # 1xx, or no HTTP status at all
        return _unreadable(call, f"{label}: unexpected answer: {message}", kwargs)
    effective = status
    if 200 <= status < 300 and code is not None and 100 <= code // 1000 <= 599:
        # An error body inside a 2xx: RunComfy's codes start with the HTTP status they stand for
        # (400xxx, 404xxx, 500xxx), so read those digits as the status.
        effective = code // 1000
    refused = 400 <= effective < 500  # the server says it did not take the request on
    if code == _OTHER_USER_CODE:
        # On a request id, "belongs to another user" means "not yours to see": for us, not found.
        if call == "submit":
            return AuthError(f"{label}: the token may not use this: {message}", **kwargs)
        return RequestNotFound(f"{label}: request belongs to another account: {message}", **kwargs)
    if code in _AUTH_CODES:
        return AuthError(f"{label}: token or balance problem: {message}", **kwargs)
    if code in _INVALID_CODES:
        return InvalidRequestError(f"{label}: rejected: {message}", **kwargs)
    if code in _NOT_FOUND_CODES:
        return _not_found(call, label, message, kwargs)
    if code in _TRANSIENT_CODES:
        return TransientApiError(f"{label}: server error: {message}", refused=refused, **kwargs)
    if effective in (401, 402, 403):
        return AuthError(f"{label}: token or balance problem: {message}", **kwargs)
    if effective == 404:
        return _not_found(call, label, message, kwargs)
    if effective in (408, 429) or 500 <= effective <= 599:
        return TransientApiError(f"{label}: {message}", refused=refused, **kwargs)
    if 400 <= effective < 500:
        return InvalidRequestError(f"{label}: rejected: {message}", **kwargs)
    # A 2xx with an unreadable error code, or anything stranger: we cannot tell what happened.
    return _unreadable(call, f"{label}: unexpected answer: {message}", kwargs)


def _unreadable(call: str, message: str, kwargs: dict) -> ApiError:
    """An answer that says neither yes nor no. For a submit a plain `ApiError`, which `_submit_view`
    turns into "outcome unknown" (a job may exist); for any other call a `MalformedAnswer`, asked again
    like a transient failure and then recorded on the job."""
    if call == "submit":
        return ApiError(message, **kwargs)
    return MalformedAnswer(message, **kwargs)


def _not_found(call, label, message, kwargs) -> ApiError:
    if call == "submit":
        # There is no request id on a submit: a 404 there means the model path does not exist.
        return InvalidRequestError(f"{label}: model not found: {message}", **kwargs)
    return RequestNotFound(f"{label}: request not found or expired: {message}", **kwargs)


def _submit_view(err: ApiError) -> BatchrunError:
    """Only refusals prove that no job was created (a 4xx, or a 2xx whose error code is a 4xx one and
    which names no job); they stay as they are. The rest become "outcome unknown"."""
    if isinstance(err, (AuthError, InvalidRequestError)) or submit_is_retryable(err):
        return err
    return _unknown(err.message)


def _unknown(message: str) -> SubmitOutcomeUnknown:
    return SubmitOutcomeUnknown(f"{message}; a job may or may not have been created")


def _missing_field(call: str, data: dict[str, Any]) -> str | None:
    """What a success answer lacks to be usable, or None if it is complete enough."""
    if call == "submit":
        return "no request_id in the answer"  # an answer naming a request never gets here
    if call == "status" and not isinstance(data.get("status"), str):
        return "no status in the answer"
    if call == "result" and not isinstance(data.get("status"), str) and data.get("output") in (None, {}, [], ""):
        return "neither a status nor outputs in the answer"
    return None


def _retry_after(headers: Mapping[str, str], now: datetime) -> float | None:
    try:
        return parse_retry_after(headers.get("Retry-After"), now, headers.get("Date"))
    except Exception:  # noqa: BLE001 - a header no parser expected only loses its hint
        return None


# ---------------------------------------------------------------- parsing of successful answers


def parse_submitted(data: dict[str, Any], *, status: int = 200, secrets: tuple[str, ...] = ()) -> Submitted:
    """A `Submitted` from a submit answer that `classify` accepted (it names a request).

    Raises `SubmitOutcomeUnknown` when the named request id is unusable (see `answer_fields.REQUEST_ID`).
    An error code beside the id is kept as `problem`: the job exists, but e.g. a balance error
    still means that no further job should be sent."""
    request_id = fields.request_id(data.get("request_id"), secrets)
    if request_id is None:
        shown = fields.json_text(data.get("request_id"), 80, secrets)
        raise _unknown(f"submit: HTTP {status} named an unusable request id {shown}")
    code = fields.error_code(data.get("error_code"))
    problem = None
    if code is not None:
        kwargs = {"status": status, "code": code, "retry_after": None}
        problem = _error_for(status, code, "submit", _message(code, data, b"", secrets), kwargs, {}, secrets)
    return Submitted(
        request_id=request_id,
        status_url=fields.text(data.get("status_url"), MAX_URL_TEXT, secrets),
        result_url=fields.text(data.get("result_url"), MAX_URL_TEXT, secrets),
        cancel_url=fields.text(data.get("cancel_url"), MAX_URL_TEXT, secrets),
        problem=problem,
    )


def parse_status(request_id: str, data: dict[str, Any], secrets: tuple[str, ...] = ()) -> Status:
    """A `Status` from a status answer; `MalformedAnswer` if it has no readable status."""
    raw = _status_word(data.get("status"), secrets)
    if raw is None:
        raise MalformedAnswer("status: HTTP 200 with no status in the answer", status=200)
    return Status(
        request_id=request_id,
        state=normalize_state(raw),
        raw_status=raw,
        queue_position=fields.count(data.get("queue_position")),
    )


def parse_result(request_id: str, data: dict[str, Any], secrets: tuple[str, ...] = ()) -> Result:
    """A `Result` from a result answer; `MalformedAnswer` if it has neither a status nor outputs, or an
    output that is not a usable URL."""
    urls = _output_urls(data, secrets)
    raw = _status_word(data.get("status"), secrets)
    if raw is None:
        if not urls:
            raise MalformedAnswer("result: HTTP 200 with neither a status nor outputs in the answer", status=200)
        raw = "completed"
    state = normalize_state(raw)
    error = _job_error(data.get("error"), secrets)
    if state == "completed" and error:
        state = "failed"
    cost, cost_flag = fields.cost(data.get("cost"), secrets)
    return Result(
        request_id=request_id,
        state=state,
        raw_status=raw,
        output_urls=urls,
        cost_usd=cost,
        error=error,
        created_at=fields.timestamp(data.get("created_at")),
        finished_at=fields.timestamp(data.get("finished_at")),
        input=data["input"] if isinstance(data.get("input"), dict) else None,
        cost_flag=cost_flag,
        queue_position=fields.count(data.get("queue_position")) if state == "queued" else None,
    )


_CANCEL_YES = frozenset({"cancelled", "canceled", "cancel_requested", "ok", "success", "succeeded"})


def parse_cancel(request_id: str, data: dict[str, Any], secrets: tuple[str, ...] = ()) -> CancelOutcome:
    """A `CancelOutcome` from a cancel answer. Only an explicit confirmation counts as cancelled:
    believing a job cancelled when it is not would abandon a result that is being paid for."""
    outcome = fields.text(data.get("outcome"), 60, secrets)
    status = fields.text(data.get("status"), 60, secrets)
    note_value = data.get("message") or data.get("detail") or data.get("error_message")
    note = fields.text(note_value, MAX_MESSAGE, secrets)
    if outcome is not None:
        ok = outcome.lower() in _CANCEL_YES
        said = outcome
    elif status is not None:
        ok = _STATE_OF.get(status.lower()) == "cancelled"
        said = f"status {status}"
    elif isinstance(data.get("cancelled"), bool) or isinstance(data.get("success"), bool):
        ok = bool(data.get("cancelled") or data.get("success"))
        said = "cancelled" if ok else "not cancelled"
    else:
        ok, said = False, "no outcome in the answer"
    detail = server_text(f"{said}: {note}" if note else said, MAX_MESSAGE)
    return CancelOutcome(request_id=request_id, cancelled=ok, detail=detail)


def _status_word(value: Any, secrets: tuple[str, ...]) -> str | None:
    if not isinstance(value, str):
        return None
    return server_text(value, 60, secrets) or None


def _output_urls(data: dict[str, Any], secrets: tuple[str, ...]) -> list[str]:
    """Every output URL once, in the order video, videos, image, images, audio, audios; `MalformedAnswer`
    for one that is unusable (it would name no file to collect) or for more than `MAX_OUTPUTS`."""
    output = data.get("output")
    found: list[Any] = []
    if isinstance(output, dict):
        for key in ("video", "videos", "image", "images", "audio", "audios"):
            found.extend(_url_values(output.get(key)))
    else:
        found.extend(_url_values(output))  # tolerate a bare URL or list where a dict is documented
    if len(found) > MAX_OUTPUTS:
        raise MalformedAnswer(f"result: HTTP 200 with {len(found)} outputs, over {MAX_OUTPUTS}", status=200)
    return list(dict.fromkeys(fields.output_url(value, secrets) for value in found))


def _url_values(value: Any) -> list[Any]:
    """The URL values in an output field: a string, {"url": ...}, or a list of those."""
    items = value if isinstance(value, list) else [value]
    found = []
    for item in items[: MAX_OUTPUTS + 1]:
        if isinstance(item, dict):
            item = item.get("url")
        if item is None or (isinstance(item, str) and not item.strip()):
            continue
        found.append(item)
    return found


def _job_error(value: Any, secrets: tuple[str, ...]) -> str | None:
    if value is None or value is False or value in ("", {}, []):
        return None
    if isinstance(value, dict):
        value = value.get("message") or value.get("error_message") or value.get("detail") or value
    return fields.json_text(value, MAX_MESSAGE, secrets) or None


# ---------------------------------------------------------------- error bodies


def _json_object(body: bytes, secrets: tuple[str, ...]) -> tuple[dict[str, Any] | None, str | None]:
    """(the body's JSON object, None), or (None, what the body is instead) for any other body."""
    if not body.strip():
        return None, "an empty answer"
    try:
        data = json.loads(body)
    except RecursionError:
        return None, "a JSON answer nested too deep to read"
    except ValueError:  # UnicodeDecodeError included
        return None, f"a non-JSON answer: {server_text(body, 100, secrets)}"
    if not isinstance(data, dict):
        return None, "a JSON answer that is not an object"
    if fields.too_deep(data):
        return None, f"a JSON answer nested more than {fields.MAX_JSON_DEPTH} levels deep"
    return data, None


def _message(code, data, body: bytes, secrets) -> str:
    if data is None:
        text = server_text(body, 100, secrets)
        return f"non-JSON answer: {text}" if text else "empty answer"
    for key in ("error_message", "message"):
        if isinstance(data.get(key), str) and data[key].strip():
            return server_text(data[key], MAX_MESSAGE, secrets)
    text = _detail_text(data.get("detail"))
    if text is not None:
        return server_text(text, MAX_MESSAGE, secrets)
    return "no message" if code is not None else fields.json_text(data, 100, secrets)


def _detail_text(detail: Any) -> str | None:
    """FastAPI-style `detail`: a string, or a list of {"loc": [...], "msg": "..."}."""
    if isinstance(detail, str):
        return detail or None
    if isinstance(detail, dict):
        detail = [detail]
    if not isinstance(detail, list):
        return None
    parts = []
    for item in detail[:20]:
        if isinstance(item, dict) and item.get("msg") is not None:
            loc = item.get("loc")
            where = ".".join(fields.json_text(p, 40) for p in loc[:10] if p != "body") if isinstance(loc, list) else ""
            msg = fields.json_text(item["msg"], MAX_MESSAGE)
            parts.append(f"{where}: {msg}" if where else msg)
        elif isinstance(item, str):
            parts.append(item[: MAX_MESSAGE * 4])
    return "; ".join(parts) or None



# ---------------------------------------------------------------- the client


class Client:
    """Sends RunComfy Model API calls over a caller-owned `aiohttp.ClientSession`.

    `limiter` (any async context manager, e.g. from `make_limiter`) is entered once before every call,
    so one rate limit can cover all calls of a run. Each call has its own timeout: `request_timeout`
    seconds in all, of which at most 10 for making the connection. Errors are those of `parse_answer`,
    plus `TransientApiError` for network failures (``connected=False`` when nothing was sent).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str,
        *,
        limiter=None,
        request_timeout: float = 60.0,
    ):
        self._session = session
        self._base = URL(check_base_url(base_url))
        token = token.strip()
        if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in token):
            # Checked here so that aiohttp never gets to complain about (and quote) the header value.
            raise UsageError("the API token contains spaces or control characters")
        self._token = token
        self._limiter = limiter
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=min(10.0, request_timeout))

    def __repr__(self) -> str:
        return f"Client(base_url={str(self._base)!r})"

    @property
    def base_url(self) -> str:
        """The API base URL calls go to (never holds the token)."""
        return str(self._base)

    def scrub(self, text: object, limit: int = 1000) -> str:
        """Text that did not come through this client (e.g. a storage host's error) made as safe as the
        API's own: see `servertext.server_text`, with this client's token blanked out."""
        return server_text(text, limit, (self._token,))

    def turn_free(self) -> bool:
        """Whether `turn` would take a place now, without waiting (no limit, or it has room)."""
        has_capacity = getattr(self._limiter, "has_capacity", None)
        return self._limiter is None or (has_capacity is not None and has_capacity())

    async def turn(self) -> None:
        """Wait for the rate limit's next place and take it, for one `submit(..., paced=True)`: a caller that
        must do something between that wait and the POST (record the job's intent) waits first."""
        if self._limiter is not None:
            async with self._limiter:
                pass

    async def submit(self, model_id: str, input: dict, *, paced: bool = False) -> Submitted:
        """POST a job. Raises `SubmitOutcomeUnknown` when a job may exist despite the failure. `paced`: its
        place in the rate limit was taken with `turn`."""
        body = json.dumps(input).encode()  # before sending: a bad input must fail with nothing sent
        return await self._call("submit", "POST", ("v1", "models", *_model_path(model_id)), body, paced=paced)

    async def model(self, model_id: str) -> dict:
        """GET /v1/models/{model_id}: the model's catalogue entry (price and input schema) as a JSON object."""
        return await self._call("model", "GET", ("v1", "models", *_model_path(model_id)))

    async def status(self, request_id: str) -> Status:
        """GET the job's status."""
        path = ("v1", "requests", _segment(request_id), "status")
        return await self._call("status", "GET", path, request_id=request_id)

    async def result(self, request_id: str) -> Result:
        """GET the job's result with its cost (or its current status, if it is not finished)."""
        path = ("v1", "requests", _segment(request_id), "result")
        return await self._call("result", "GET", path, query="include_cost=true", request_id=request_id)

    async def cancel(self, request_id: str) -> CancelOutcome:
        """Ask the API to cancel a queued job.

        A refusal (e.g. the job already runs, or an HTTP 400/409/422) is returned as
        ``cancelled=False``; auth, not-found and transient errors are raised.
        """
        path = ("v1", "requests", _segment(request_id), "cancel")
        return await self._call("cancel", "POST", path, request_id=request_id)

    async def _call(self, call: str, method: str, path: tuple[str, ...], body: bytes | None = None,
                    query: str = "", request_id: str = "", paced: bool = False) -> Any:
        url = URL(f"{self._base}/{'/'.join(path)}" + (f"?{query}" if query else ""), encoded=True)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._limiter is not None and not paced:
            async with self._limiter:
                answer = await self._send(call, method, url, headers, body)
        else:
            answer = await self._send(call, method, url, headers, body)
        if isinstance(answer, BaseException):
            raise answer
        status, answer_headers, payload = answer
        return parse_answer(call, status, answer_headers, payload, request_id=request_id, secrets=(self._token,))

    async def _send(self, call, method, url, headers, body) -> BatchrunError | tuple[int, Mapping[str, str], bytes]:
        started = time.monotonic()
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,  # keeps the token on this host; a redirect is classified instead
                raise_for_status=False,
            ) as resp:
                payload = await _read_capped(resp, MAX_ANSWER_BYTES)
                status, answer_headers = resp.status, resp.headers
        except _CONNECT_FAILURES as exc:
            log.debug("%s %s: could not connect: %s", method, url.path, type(exc).__name__)
            return TransientApiError(f"{call}: could not connect to the API: {self._describe(exc)}", connected=False)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            # The request may have been sent in part or in full before this happened. (ValueError:
            # aiohttp refusing a header or status line it cannot parse.)
            log.debug("%s %s: failed after connecting: %s", method, url.path, type(exc).__name__)
            problem = f"{call}: connection failed after sending: {self._describe(exc)}"
            if call == "submit":
                return _unknown(problem)
            return TransientApiError(problem)
        log.debug("%s %s -> %d in %.2fs", method, url.path, status, time.monotonic() - started)
        if payload is None:
            problem = f"{call}: HTTP {status} with an answer over {MAX_ANSWER_BYTES} bytes"
            return _unknown(problem) if call == "submit" else MalformedAnswer(problem, status=status)
        return status, answer_headers, payload

    def _describe(self, exc: BaseException) -> str:
        # aiohttp's messages name the host and the OS error, never headers; redact anyway.
        text = str(exc).strip()
        kind = "timed out" if isinstance(exc, asyncio.TimeoutError) and not text else type(exc).__name__
        return server_text(f"{kind}: {text}" if text else kind, MAX_MESSAGE, (self._token,))


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None once it grows past `limit` bytes (decompressed, if it was compressed)."""
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _segment(request_id: str) -> str:
    """A request id as one path segment: quoted, and never a dot segment that URLs would collapse."""
    if not isinstance(request_id, str) or request_id.strip() in ("", ".", ".."):
        raise InvalidRequestError(f"not a usable request id: {server_text(repr(request_id), 80)}")
    return quote(request_id, safe="")


def _model_path(model_id: str) -> list[str]:
    parts = model_id.strip("/").split("/") if isinstance(model_id, str) else [""]
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidRequestError(f"not a usable model id: {server_text(repr(model_id), 120)}")
    return [quote(p, safe="") for p in parts]
