"""The HTTP client for RunComfy's Model API, and the one place that makes sense of its answers.

`classify` turns every HTTP answer (status, headers, body) into either the parsed JSON object or an
exception from `batchrun.errors`; `Client` sends the four calls and adds what only it can know:
whether a failed request ever reached the server.

Submitting costs money and the API has no idempotency key, so a failed submit is sorted into
"certainly created nothing" (a `TransientApiError` that `retry.submit_is_retryable` accepts, or an
`AuthError`/`InvalidRequestError`) and "may have created a job" (`SubmitOutcomeUnknown`, never
retried automatically).

The token is only ever placed in the request's Authorization header; it never appears in an
exception, a repr or a log line, and request headers are never copied into errors.
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

from batchrun.errors import (
    ApiError,
    AuthError,
    BatchrunError,
    InvalidRequestError,
    RequestNotFound,
    SubmitOutcomeUnknown,
    TransientApiError,
    UsageError,
)
from batchrun.retry import parse_retry_after, submit_is_retryable

log = logging.getLogger("batchrun.api")

CALLS = ("submit", "status", "result", "cancel")
MAX_MESSAGE = 300

STATES = ("queued", "running", "completed", "failed", "cancelled")
_STATE_OF = {
    **dict.fromkeys(("in_queue", "queued", "pending", "waiting"), "queued"),
    **dict.fromkeys(("in_progress", "running", "starting", "processing"), "running"),
    **dict.fromkeys(("completed", "succeeded", "success"), "completed"),
    **dict.fromkeys(("failed", "error"), "failed"),
    **dict.fromkeys(("cancelled", "canceled"), "cancelled"),
}
_seen_odd_statuses: set[str] = set()

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
    `output_urls` lists every output URL once, in the order video, videos, image, images.
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
        if key not in _seen_odd_statuses:
            _seen_odd_statuses.add(key)
            log.warning("unknown job status %r from the API; treating it as running", _short(raw, 60))
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
    """Turn one HTTP answer to `call` ("submit", "status", "result" or "cancel") into a dict or an error.

    Returns the parsed JSON object when the answer is a usable success. Otherwise returns (does not
    raise) an `ApiError` subclass, or for "submit" a `SubmitOutcomeUnknown` when the answer leaves
    open whether a job was created. Any string in `secrets` is blanked out of messages, in case a
    server echoes a credential back.
    """
    if call not in CALLS:
        raise ValueError(f"unknown call {call!r}")
    now = now or datetime.now(timezone.utc)
    retry_after = parse_retry_after(headers.get("Retry-After"), now, headers.get("Date"))
    data = _json_object(body)
    code = _error_code(data)

    if 200 <= status < 300 and code is None:
        if data is None:
            what = "an empty answer" if not body.strip() else "a non-JSON answer"
            return _bad_success(call, status, f"{what}: {_printable(body)}".rstrip(": "), secrets)
        missing = _missing_field(call, data)
        if missing:
            return _bad_success(call, status, missing, secrets)
        return data

    message = _message(status, code, data, body, secrets)
    kwargs = {"status": status, "code": code, "retry_after": retry_after}
    err = _error_for(status, code, call, message, kwargs, headers)
    if call == "submit":
        return _submit_view(err)
    return err


def _error_for(status, code, call, message, kwargs, headers) -> ApiError:
    """The error class for an error answer: RunComfy's code decides when we know it, else HTTP status."""
    label = f"{call}: HTTP {status}"
    if code is not None:
        label += f", code {code}" if code >= 0 else ", unreadable error_code"
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
        return TransientApiError(f"{label}: server error: {message}", **kwargs)

    effective = status
    if 200 <= status < 300 and code is not None and 100 <= code // 1000 <= 599:
        # An error body inside a 200 with a code we don't know: its first three digits follow the
        # HTTP status classes (400xxx, 404xxx, 500xxx), so read them as the status.
        effective = code // 1000
    if effective in (401, 402, 403):
        return AuthError(f"{label}: token or balance problem: {message}", **kwargs)
    if effective == 404:
        return _not_found(call, label, message, kwargs)
    if effective in (408, 429) or 500 <= effective <= 599:
        return TransientApiError(f"{label}: {message}", **kwargs)
    if 300 <= effective < 400 and effective != 303:
        where = _short(headers.get("Location", ""), 100)
        return InvalidRequestError(f"{label}: redirected to {where or '?'}; check the base URL", **kwargs)
    if 400 <= effective < 500:
        return InvalidRequestError(f"{label}: rejected: {message}", **kwargs)
    # 303 ("see other": for a POST, processed elsewhere), a 2xx with an unreadable error code, or
    # anything stranger: we cannot tell what happened.
    return ApiError(f"{label}: unexpected answer: {message}", **kwargs)


def _not_found(call, label, message, kwargs) -> ApiError:
    if call == "submit":
        # There is no request id on a submit: a 404 there means the model path does not exist.
        return InvalidRequestError(f"{label}: model not found: {message}", **kwargs)
    return RequestNotFound(f"{label}: request not found or expired: {message}", **kwargs)


def _submit_view(err: ApiError) -> BatchrunError:
    """Only errors that prove no job was created stay as they are; the rest become "outcome unknown"."""
    if isinstance(err, (AuthError, InvalidRequestError)) or submit_is_retryable(err):
        return err
    return SubmitOutcomeUnknown(f"{err.message}; a job may or may not have been created")


def _bad_success(call: str, status: int, problem: str, secrets: tuple[str, ...]) -> BatchrunError:
    message = _redact(f"{call}: HTTP {status} with {problem}", secrets)
    if call == "submit":
        return SubmitOutcomeUnknown(f"{message}; a job may or may not have been created")
    return TransientApiError(message, status=status)


def _missing_field(call: str, data: dict[str, Any]) -> str | None:
    """What a success answer lacks to be usable, or None if it is complete enough."""
    if call == "submit" and not _id_text(data.get("request_id")):
        return "no request_id in the answer"
    if call == "status" and not isinstance(data.get("status"), str):
        return "no status in the answer"
    if call == "result" and not isinstance(data.get("status"), str) and not _output_urls(data):
        return "neither a status nor outputs in the answer"
    return None


# ---------------------------------------------------------------- parsing of successful answers


def parse_submitted(data: dict[str, Any]) -> Submitted:
    """A `Submitted` from a submit answer that `classify` accepted."""
    return Submitted(
        request_id=_id_text(data.get("request_id")) or "",
        status_url=_text(data.get("status_url")),
        result_url=_text(data.get("result_url")),
        cancel_url=_text(data.get("cancel_url")),
    )


def parse_status(request_id: str, data: dict[str, Any]) -> Status:
    """A `Status` from a status answer that `classify` accepted."""
    raw = data["status"]
    return Status(
        request_id=request_id,
        state=normalize_state(raw),
        raw_status=raw,
        queue_position=_int(data.get("queue_position")),
    )


def parse_result(request_id: str, data: dict[str, Any]) -> Result:
    """A `Result` from a result answer that `classify` accepted."""
    urls = _output_urls(data)
    raw = data.get("status")
    if not isinstance(raw, str):
        raw = "completed"  # only reachable when outputs are present (see _missing_field)
    state = normalize_state(raw)
    error = _job_error(data.get("error"))
    if state == "completed" and error:
        state = "failed"
    return Result(
        request_id=request_id,
        state=state,
        raw_status=raw,
        output_urls=urls,
        cost_usd=_cost(data.get("cost")),
        error=error,
        created_at=_text(data.get("created_at")),
        finished_at=_text(data.get("finished_at")),
        input=data["input"] if isinstance(data.get("input"), dict) else None,
    )


_CANCEL_YES = frozenset({"cancelled", "canceled", "cancel_requested", "ok", "success", "succeeded"})


def parse_cancel(request_id: str, data: dict[str, Any]) -> CancelOutcome:
    """A `CancelOutcome` from a cancel answer. Only an explicit confirmation counts as cancelled:
    believing a job cancelled when it is not would abandon a result that is being paid for."""
    outcome = _text(data.get("outcome"))
    status = _text(data.get("status"))
    note = _text(data.get("message") or data.get("detail") or data.get("error_message"))
    if outcome is not None:
        ok = outcome.strip().lower() in _CANCEL_YES
        said = outcome
    elif status is not None:
        ok = _STATE_OF.get(status.strip().lower()) == "cancelled"
        said = f"status {status}"
    elif isinstance(data.get("cancelled"), bool) or isinstance(data.get("success"), bool):
        ok = bool(data.get("cancelled") or data.get("success"))
        said = "cancelled" if ok else "not cancelled"
    else:
        ok, said = False, "no outcome in the answer"
    detail = _short(f"{said}: {note}" if note else said, MAX_MESSAGE)
    return CancelOutcome(request_id=request_id, cancelled=ok, detail=detail)


def _output_urls(data: dict[str, Any]) -> list[str]:
    output = data.get("output")
    found: list[str] = []
    if isinstance(output, dict):
        for key in ("video", "videos", "image", "images"):
            found.extend(_urls_in(output.get(key)))
    else:
        found.extend(_urls_in(output))  # tolerate a bare URL or list where a dict is documented
    return list(dict.fromkeys(found))


def _urls_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict):
        return _urls_in(value.get("url"))
    if isinstance(value, list):
        return [url for item in value if not isinstance(item, list) for url in _urls_in(item)]
    return []


def _job_error(value: Any) -> str | None:
    if value is None or value == "" or value == {} or value == []:
        return None
    if isinstance(value, dict):
        text = value.get("message") or value.get("error_message") or value.get("detail") or value
        return _short(text if isinstance(text, str) else json.dumps(text, default=str), MAX_MESSAGE)
    if isinstance(value, str):
        return _short(value, MAX_MESSAGE)
    return _short(json.dumps(value, default=str), MAX_MESSAGE)


def _cost(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        cost = float(value)
    elif isinstance(value, str):
        try:
            cost = float(value.strip().lstrip("$"))
        except ValueError:
            return None
    else:
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    return str(value)


def _id_text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value).strip() or None


# ---------------------------------------------------------------- error bodies


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _error_code(data: dict[str, Any] | None) -> int | None:
    """RunComfy's numeric `error_code`, or None when the body has none (0 and "" count as none)."""
    if data is None:
        return None
    value = data.get("error_code")
    if isinstance(value, bool) or value in (None, 0, ""):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip()) or None
    return -1  # present but unreadable: still an error, of unknown kind


def _message(status, code, data, body: bytes, secrets) -> str:
    if data is None:
        text = _printable(body)
        what = f"non-JSON answer (HTTP {status}): {text}" if text else f"empty answer (HTTP {status})"
        return _redact(what, secrets)
    text = None
    for key in ("error_message", "message"):
        if isinstance(data.get(key), str) and data[key].strip():
            text = data[key]
            break
    if text is None:
        text = _detail_text(data.get("detail"))
    if text is None:
        text = "no message" if code is not None else _short(json.dumps(data, default=str), 100)
    return _short(_redact(" ".join(text.split()), secrets), MAX_MESSAGE)


def _detail_text(detail: Any) -> str | None:
    """FastAPI-style `detail`: a string, or a list of {"loc": [...], "msg": "..."}."""
    if isinstance(detail, str):
        return detail or None
    if isinstance(detail, dict):
        detail = [detail]
    if not isinstance(detail, list):
        return None
    parts = []
    for item in detail:
        if isinstance(item, dict) and item.get("msg") is not None:
            loc = item.get("loc")
            where = ".".join(str(p) for p in loc if p != "body") if isinstance(loc, list) else ""
            parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
        elif isinstance(item, str):
            parts.append(item)
    return "; ".join(parts) or None


def _printable(body: bytes, limit: int = 100) -> str:
    text = body[: limit * 4].decode("utf-8", errors="replace")
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(text.split())[:limit]


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------- the client


class Client:
    """Sends RunComfy Model API calls over a caller-owned `aiohttp.ClientSession`.

    `limiter` (any async context manager, e.g. from `make_limiter`) is entered once before every call,
    so one rate limit can cover all calls of a run. Each call has its own timeout: `request_timeout`
    seconds in all, of which at most 10 for making the connection. Errors are those of `classify`,
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
        self._base = _check_base_url(base_url)
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

    async def submit(self, model_id: str, input: dict) -> Submitted:
        """POST a job. Raises `SubmitOutcomeUnknown` when a job may exist despite the failure."""
        body = json.dumps(input).encode()  # before sending: a bad input must fail with nothing sent
        data = await self._call("submit", "POST", ("v1", "models", *_model_path(model_id)), body)
        return parse_submitted(data)

    async def status(self, request_id: str) -> Status:
        """GET the job's status."""
        data = await self._call("status", "GET", ("v1", "requests", _segment(request_id), "status"))
        return parse_status(request_id, data)

    async def result(self, request_id: str) -> Result:
        """GET the job's result with its cost (or its current status, if it is not finished)."""
        path = ("v1", "requests", _segment(request_id), "result")
        data = await self._call("result", "GET", path, query="include_cost=true")
        return parse_result(request_id, data)

    async def cancel(self, request_id: str) -> CancelOutcome:
        """Ask the API to cancel a queued job.

        A refusal (e.g. the job already runs, or an HTTP 400/409/422) is returned as
        ``cancelled=False``; auth, not-found and transient errors are raised.
        """
        try:
            data = await self._call("cancel", "POST", ("v1", "requests", _segment(request_id), "cancel"))
        except InvalidRequestError as err:
            return CancelOutcome(request_id=request_id, cancelled=False, detail=err.message)
        return parse_cancel(request_id, data)

    async def _call(
        self, call: str, method: str, path: tuple[str, ...], body: bytes | None = None, query: str = ""
    ) -> dict[str, Any]:
        url = URL(f"{self._base}/{'/'.join(path)}" + (f"?{query}" if query else ""), encoded=True)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._limiter is not None:
            async with self._limiter:
                outcome = await self._send(call, method, url, headers, body)
        else:
            outcome = await self._send(call, method, url, headers, body)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _send(self, call, method, url, headers, body) -> BatchrunError | dict[str, Any]:
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
                payload = await resp.read()
                status, answer_headers = resp.status, resp.headers
        except _CONNECT_FAILURES as exc:
            log.debug("%s %s: could not connect: %s", method, url.path, type(exc).__name__)
            return TransientApiError(f"{call}: could not connect to the API: {self._describe(exc)}", connected=False)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # The request may have been sent in part or in full before this happened.
            log.debug("%s %s: failed after connecting: %s", method, url.path, type(exc).__name__)
            problem = f"{call}: connection failed after sending: {self._describe(exc)}"
            if call == "submit":
                return SubmitOutcomeUnknown(f"{problem}; a job may or may not have been created")
            return TransientApiError(problem)
        log.debug("%s %s -> %d in %.2fs", method, url.path, status, time.monotonic() - started)
        return classify(status, answer_headers, payload, call, secrets=(self._token,))

    def _describe(self, exc: BaseException) -> str:
        # aiohttp's messages name the host and the OS error, never headers; redact anyway.
        text = str(exc).strip()
        kind = "timed out" if isinstance(exc, asyncio.TimeoutError) and not text else type(exc).__name__
        return _short(_redact(f"{kind}: {text}" if text else kind, (self._token,)), MAX_MESSAGE)


def _check_base_url(base_url: str) -> URL:
    url = URL(base_url.strip().rstrip("/"))
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        raise UsageError(f"the API base URL must look like https://host[/path], not {base_url!r}")
    return url


def _segment(request_id: str) -> str:
    """A request id as one path segment: quoted, and never a dot segment that URLs would collapse."""
    if not isinstance(request_id, str) or request_id.strip() in ("", ".", ".."):
        raise InvalidRequestError(f"not a usable request id: {request_id!r}")
    return quote(request_id, safe="")


def _model_path(model_id: str) -> list[str]:
    parts = model_id.strip("/").split("/") if isinstance(model_id, str) else [""]
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidRequestError(f"not a usable model id: {model_id!r}")
    return [quote(p, safe="") for p in parts]
