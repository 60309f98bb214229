"""The API client against a scripted aiohttp server on a real loopback socket.

Each test scripts the server's answer, makes one call and checks how the answer was classified. The
canary token must never show up in an error, a repr, a traceback or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import traceback
from datetime import datetime, timezone

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from batchrun.api import (
    CancelOutcome,
    Client,
    Result,
    Status,
    Submitted,
    classify,
    make_limiter,
)
from batchrun.errors import (
    AuthError,
    InvalidRequestError,
    MalformedAnswer,
    RequestNotFound,
    SubmitOutcomeUnknown,
    TransientApiError,
    UsageError,
)
from batchrun.retry import submit_is_retryable

TOKEN = "sk-CANARY-123"
MODEL = "kling/kling-3.0/standard/image-to-video"
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


class Script:
    """What the test server answers. `answer` is used for every request unless `handler` is set."""

    def __init__(self):
        self.answer: tuple[int, object, dict] = (200, {}, {})
        self.handler = None
        self.seen: list[dict] = []

    def reply(self, status: int, body: object = None, **headers: str) -> None:
        self.answer = (status, {} if body is None else body, headers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "auth": request.headers.get("Authorization"),
                "body": body,
            }
        )
        if self.handler is not None:
            return await self.handler(request)
        status, payload, headers = self.answer
        if isinstance(payload, (dict, list)):
            return web.Response(
                status=status, text=json.dumps(payload), headers=headers, content_type="application/json"
            )
        data = payload.encode() if isinstance(payload, str) else payload
        return web.Response(status=status, body=data, headers=headers, content_type="text/html")


@pytest.fixture
async def server():
    script = Script()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    test_server = TestServer(app)
    await test_server.start_server()
    script.base_url = str(test_server.make_url("/"))
    yield script
    await test_server.close()


@pytest.fixture
def client(server, session):
    return Client(session, server.base_url, TOKEN, request_timeout=2.0)


def assert_no_token(err: BaseException) -> None:
    """The canary appears nowhere in what a user or a log could ever see of `err`."""
    text = str(err) + repr(err) + "".join(traceback.format_exception(err))
    assert TOKEN not in text
    assert "Authorization" not in text


async def expect(coro, kind: type[BaseException]) -> BaseException:
    with pytest.raises(kind) as info:
        await coro
    assert type(info.value) is kind, f"expected exactly {kind.__name__}, got {info.value!r}"
    assert_no_token(info.value)
    return info.value


# ------------------------------------------------------------------ successful calls


async def test_submit_sends_input_and_token_and_parses_answer(server, client):
    server.reply(
        200,
        {"request_id": "r-1", "status_url": "https://x/s", "result_url": "https://x/r", "cancel_url": "https://x/c"},
    )
    got = await client.submit(MODEL, {"prompt": "hi", "duration": 5})
    assert got == Submitted("r-1", "https://x/s", "https://x/r", "https://x/c")
    seen = server.seen[0]
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/v1/models/kling/kling-3.0/standard/image-to-video"
    assert seen["auth"] == f"Bearer {TOKEN}"
    assert json.loads(seen["body"]) == {"prompt": "hi", "duration": 5}


async def test_status_parses_queue_position(server, client):
    server.reply(200, {"request_id": "r-1", "status": "in_queue", "queue_position": 3})
    assert await client.status("r-1") == Status("r-1", "queued", "in_queue", 3)
    assert server.seen[0]["raw_path"] == "/v1/requests/r-1/status"


async def test_request_ids_are_quoted_as_one_path_segment(server, client):
    server.reply(200, {"status": "in_progress"})
    await client.status("a/b c?d#e")
    assert server.seen[0]["raw_path"] == "/v1/requests/a%2Fb%20c%3Fd%23e/status"


@pytest.mark.parametrize("bad", ["", ".", ".."])
async def test_unusable_request_id_sends_nothing(server, client, bad):
    await expect(client.status(bad), InvalidRequestError)
    assert server.seen == []


async def test_unusable_model_id_sends_nothing(server, client):
    await expect(client.submit("kling/../../requests/x/cancel", {}), InvalidRequestError)
    assert server.seen == []


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("in_queue", "queued"),
        ("queued", "queued"),
        ("pending", "queued"),
        ("waiting", "queued"),
        ("in_progress", "running"),
        ("running", "running"),
        ("starting", "running"),
        ("processing", "running"),
        ("completed", "completed"),
        ("succeeded", "completed"),
        ("success", "completed"),
        ("failed", "failed"),
        ("error", "failed"),
        ("cancelled", "cancelled"),
        ("canceled", "cancelled"),
        ("IN_PROGRESS", "running"),
    ],
)
async def test_status_words_are_normalized(server, client, raw, state):
    server.reply(200, {"request_id": "r-1", "status": raw})
    got = await client.status("r-1")
    assert (got.state, got.raw_status) == (state, raw)


async def test_odd_status_counts_as_running_and_is_logged_once(server, client, caplog):
    caplog.set_level(logging.INFO, logger="batchrun.api")
    server.reply(200, {"request_id": "r-1", "status": "warming_up_gpu_42"})
    for _ in range(3):
        assert (await client.status("r-1")).state == "running"
    server.reply(200, {"request_id": "r-1", "status": "thinking_hard_42"})
    await client.status("r-1")
    logged = [r.getMessage() for r in caplog.records if r.name == "batchrun.api"]
    assert sum("warming_up_gpu_42" in m for m in logged) == 1
    assert sum("thinking_hard_42" in m for m in logged) == 1


async def test_result_with_videos_and_cost_string(server, client):
    server.reply(
        200,
        {
            "request_id": "r-1",
            "status": "completed",
            "output": {
                "video": "https://cdn/a.mp4",
                "videos": ["https://cdn/a.mp4", "https://cdn/b.mp4"],
                "images": ["https://cdn/t.png"],
            },
            "cost": "0.42",
            "created_at": "2025-03-01T12:00:00Z",
            "finished_at": "2025-03-01T12:01:30Z",
            "error": None,
        },
    )
    got = await client.result("r-1")
    assert got == Result(
        request_id="r-1",
        state="completed",
        raw_status="completed",
        output_urls=["https://cdn/a.mp4", "https://cdn/b.mp4", "https://cdn/t.png"],
        cost_usd=0.42,
        error=None,
        created_at="2025-03-01T12:00:00.000Z",
        finished_at="2025-03-01T12:01:30.000Z",
    )
    assert server.seen[0]["raw_path"] == "/v1/requests/r-1/result?include_cost=true"


@pytest.mark.parametrize(
    ("cost", "expected"),
    [(0.84, 0.84), (1, 1.0), ("1.26", 1.26), ("n/a", None), (None, None), (True, None), (-1, None)],
)
async def test_result_cost(server, client, cost, expected):
    server.reply(200, {"status": "completed", "output": {"video": "https://cdn/a.mp4"}, "cost": cost})
    assert (await client.result("r-1")).cost_usd == expected


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("content policy violation", "content policy violation"),
        ({"message": "GPU fell over", "code": 7}, "GPU fell over"),
    ],
)
async def test_completed_result_with_error_is_failed(server, client, error, message):
    server.reply(200, {"status": "completed", "output": {"video": "https://cdn/a.mp4"}, "error": error})
    got = await client.result("r-1")
    assert (got.state, got.raw_status, got.error) == ("failed", "completed", message)


async def test_unfinished_result_reports_current_status(server, client):
    server.reply(200, {"request_id": "r-1", "status": "in_progress"})
    got = await client.result("r-1")
    assert (got.state, got.output_urls, got.cost_usd, got.error) == ("running", [], None, None)


# ------------------------------------------------------------------ error classification


@pytest.mark.parametrize(
    ("call", "status", "body", "kind", "code"),
    [
        # HTTP 200 whose body is an error: the body decides.
        ("status", 200, {"error_code": 400002, "error_message": "no remaining balance"}, AuthError, 400002),
        ("result", 200, {"error_code": 404001, "message": "expired"}, RequestNotFound, 404001),
        ("status", 200, {"error_code": 500001, "error_message": "internal"}, TransientApiError, 500001),
        ("status", 200, {"error_code": "422001", "message": "bad"}, InvalidRequestError, 422001),
        ("status", 200, {"error_code": 429007, "message": "slow down"}, TransientApiError, 429007),
        # Auth and balance.
        ("status", 401, {"error_code": 401001, "message": "unauthorized"}, AuthError, 401001),
        ("status", 401, {"error_code": 400004, "message": "token revoked"}, AuthError, 400004),
        ("result", 402, {"message": "insufficient balance"}, AuthError, None),
        ("status", 403, {"message": "forbidden"}, AuthError, None),
        ("status", 400, {"error_code": 400002, "message": "balance"}, AuthError, 400002),
        # Another user's request id is, for us, a request that does not exist.
        ("status", 403, {"error_code": 403001, "message": "belongs to another user"}, RequestNotFound, 403001),
        ("result", 403, {"error_code": 403001, "message": "belongs to another user"}, RequestNotFound, 403001),
        # Not found, invalid, transient.
        ("status", 404, {"error_code": 404001, "message": "nonexistent"}, RequestNotFound, 404001),
        ("result", 404, "Not Found", RequestNotFound, None),
        ("status", 400, {"error_code": 400001, "message": "unknown model"}, InvalidRequestError, 400001),
        ("status", 408, "", TransientApiError, None),
        ("status", 429, {"message": "rate limited"}, TransientApiError, None),
        ("status", 500, {"error_code": 500001, "error_message": "internal"}, TransientApiError, 500001),
        ("status", 502, "<html><body>Bad Gateway</body></html>", TransientApiError, None),
        ("result", 503, "", TransientApiError, None),
        ("status", 504, "upstream timed out", TransientApiError, None),
        ("status", 409, {"message": "conflict"}, InvalidRequestError, None),
    ],
)
async def test_error_answers_are_classified(server, client, call, status, body, kind, code):
    server.reply(status, body)
    err = await expect(getattr(client, call)("r-1"), kind)
    assert (err.status, err.code) == (status, code)


async def test_non_json_error_body_is_described_briefly(server, client):
    server.reply(502, "<html>\n<head><title>502 Bad Gateway</title></head>\x00" + "x" * 5000)
    err = await expect(client.status("r-1"), TransientApiError)
    said = "HTTP 502: server error: non-JSON answer: <html> <head><title>502 Bad Gateway</title></head>\ufffd"
    assert said in err.message
    assert len(err.message) < 200


async def test_validation_detail_list_is_joined(server, client):
    detail = [
        {"loc": ["body", "prompt"], "msg": "field required", "type": "missing"},
        {"loc": ["body", "duration"], "msg": "must be between 3 and 15", "type": "range"},
    ]
    server.reply(422, {"detail": detail})
    err = await expect(client.submit(MODEL, {}), InvalidRequestError)
    assert "prompt: field required; duration: must be between 3 and 15" in err.message
    assert err.status == 422


async def test_long_messages_are_truncated(server, client):
    server.reply(422, {"error_code": 422001, "error_message": "word " * 500})
    err = await expect(client.submit(MODEL, {}), InvalidRequestError)
    assert len(err.message) < 400


async def test_retry_after_seconds_header(server, client):
    server.reply(429, {"message": "slow down"}, **{"Retry-After": "7"})
    err = await expect(client.status("r-1"), TransientApiError)
    assert err.retry_after == 7.0


async def test_retry_after_http_date_header(server, client):
    server.reply(503, "", **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # long past
    err = await expect(client.result("r-1"), TransientApiError)
    assert err.retry_after == 0.0


@pytest.mark.parametrize(
    ("call", "body"),
    [
        ("status", "all good!"),
        ("status", ""),
        ("status", {"request_id": "r-1"}),  # no status
        ("status", ["not", "an", "object"]),
        ("result", {"request_id": "r-1"}),  # neither status nor output
        ("cancel", "ok"),
    ],
)
async def test_unusable_success_answers_are_malformed_and_retried(server, client, call, body):
    server.reply(200, body)
    err = await expect(getattr(client, call)("r-1"), MalformedAnswer)
    assert isinstance(err, TransientApiError)  # retried like a transient failure
    assert err.status == 200


async def test_redirects_are_not_followed(server, client):
    server.reply(307, "", Location="https://elsewhere.example/v1/requests/r-1/status")
    err = await expect(client.status("r-1"), InvalidRequestError)
    assert "elsewhere.example" in err.message
    assert len(server.seen) == 1


# ------------------------------------------------------------------ submit: never pay twice


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, "<html>oops</html>"),  # a 200 that is not JSON
        (200, {"status": "in_queue"}),  # a 200 without request_id
        (200, {"request_id": ""}),
        (200, {"error_code": 500001, "error_message": "internal"}),
        (500, {"error_code": 500001, "error_message": "internal"}),
        (502, "Bad Gateway"),
        (504, "Gateway Timeout"),
        (503, {"message": "try later"}),  # every 5xx, whatever it says
        (599, ""),
        (303, ""),  # "see other": the POST was processed somewhere
    ],
)
async def test_submit_answers_that_may_have_created_a_job(server, client, status, body):
    server.reply(status, body)
    err = await expect(client.submit(MODEL, {"prompt": "x"}), SubmitOutcomeUnknown)
    assert not submit_is_retryable(err)


@pytest.mark.parametrize("status", [408, 429])
async def test_submit_answers_that_created_nothing_are_retryable(server, client, status):
    server.reply(status, {"message": "try later"}, **{"Retry-After": "3"})
    err = await expect(client.submit(MODEL, {"prompt": "x"}), TransientApiError)
    assert err.status == status and err.retry_after == 3.0
    assert submit_is_retryable(err)


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (422, {"error_code": 422001, "message": "invalid"}, InvalidRequestError),
        (400, {"message": "bad json"}, InvalidRequestError),
        (400, {"error_code": 400001, "message": "unknown model"}, InvalidRequestError),
        (404, "Not Found", InvalidRequestError),  # the model path does not exist
        (401, {"error_code": 401001, "message": "unauthorized"}, AuthError),
        (402, {"message": "insufficient balance"}, AuthError),
        (403, {"message": "forbidden"}, AuthError),
        (403, {"error_code": 403001, "message": "other user"}, AuthError),
        (200, {"error_code": 400002, "message": "no balance"}, AuthError),
        (200, {"error_code": 400004, "message": "token expired"}, AuthError),
    ],
)
async def test_submit_rejections_created_nothing_and_are_final(server, client, status, body, kind):
    server.reply(status, body)
    err = await expect(client.submit(MODEL, {"prompt": "x"}), kind)
    assert not submit_is_retryable(err)


async def test_submit_connection_closed_after_sending_is_unknown(server, client):
    async def hang_up(request):
        request.transport.close()  # the body was read: the server could have created the job
        await asyncio.sleep(0.1)
        return web.Response()

    server.handler = hang_up
    await expect(client.submit(MODEL, {"prompt": "x"}), SubmitOutcomeUnknown)
    assert len(server.seen) == 1  # and aiohttp did not quietly send the POST again


async def test_submit_read_timeout_is_unknown(server, session):
    async def too_slow(request):
        await asyncio.sleep(2)
        return web.json_response({"request_id": "late"})

    server.handler = too_slow
    client = Client(session, server.base_url, TOKEN, request_timeout=0.3)
    await expect(client.submit(MODEL, {"prompt": "x"}), SubmitOutcomeUnknown)


async def test_status_read_timeout_is_transient(server, session):
    async def too_slow(request):
        await asyncio.sleep(2)
        return web.json_response({"status": "in_queue"})

    server.handler = too_slow
    client = Client(session, server.base_url, TOKEN, request_timeout=0.3)
    err = await expect(client.status("r-1"), TransientApiError)
    assert err.connected and err.status is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_submit_with_nothing_listening_is_safe_to_retry(session):
    client = Client(session, f"http://127.0.0.1:{free_port()}", TOKEN)
    err = await expect(client.submit(MODEL, {"prompt": "x"}), TransientApiError)
    assert err.connected is False and err.status is None
    assert submit_is_retryable(err)


async def test_status_with_nothing_listening_is_transient(session):
    client = Client(session, f"http://127.0.0.1:{free_port()}", TOKEN)
    err = await expect(client.status("r-1"), TransientApiError)
    assert err.connected is False


class RaisingSession:
    """Stands in for a ClientSession whose request fails before any answer."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def request(self, *args, **kwargs):
        exc = self.exc

        class _Failing:
            async def __aenter__(self):
                raise exc

            async def __aexit__(self, *info):
                return False

        return _Failing()


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (aiohttp.ConnectionTimeoutError("Connection timeout to host"), TransientApiError),
        (aiohttp.ServerDisconnectedError(), SubmitOutcomeUnknown),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), SubmitOutcomeUnknown),
        (aiohttp.ClientPayloadError("Response payload is not completed"), SubmitOutcomeUnknown),
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), SubmitOutcomeUnknown),
        (asyncio.TimeoutError(), SubmitOutcomeUnknown),
    ],
)
async def test_submit_network_failures(exc, kind):
    client = Client(RaisingSession(exc), "https://model-api.example", TOKEN)
    err = await expect(client.submit(MODEL, {"prompt": "x"}), kind)
    assert submit_is_retryable(err) is (kind is TransientApiError)


# ------------------------------------------------------------------ cancel


@pytest.mark.parametrize(
    ("status", "body", "cancelled"),
    [
        (200, {"request_id": "r-1", "outcome": "cancelled"}, True),
        (200, {"request_id": "r-1", "status": "cancelled"}, True),
        (200, {"request_id": "r-1", "outcome": "not_cancellable", "message": "already running"}, False),
        (200, {"request_id": "r-1", "status": "in_progress"}, False),
        (200, {"request_id": "r-1"}, False),
        (409, {"message": "request is in progress"}, False),
        (400, {"error_code": 422001, "message": "cannot cancel"}, False),
    ],
)
async def test_cancel_outcomes(server, client, status, body, cancelled):
    server.reply(status, body)
    got = await client.cancel("r-1")
    assert isinstance(got, CancelOutcome)
    assert (got.request_id, got.cancelled) == ("r-1", cancelled)
    assert got.detail
    assert server.seen[0]["method"] == "POST"
    assert server.seen[0]["raw_path"] == "/v1/requests/r-1/cancel"


async def test_cancel_of_unknown_request_raises(server, client):
    server.reply(404, {"error_code": 404001, "message": "nonexistent"})
    await expect(client.cancel("r-1"), RequestNotFound)


# ------------------------------------------------------------------ the token stays secret


async def test_token_never_leaks_even_when_the_server_echoes_it(server, client, caplog):
    caplog.set_level(logging.DEBUG)

    async def echo(request):
        auth = request.headers["Authorization"]
        kind = request.query.get("kind") or request.match_info["tail"]
        if "status" in kind:
            return web.json_response({"error_code": 401001, "message": f"bad header {auth}"}, status=401)
        if "result" in kind:
            return web.Response(status=502, text=f"proxy error for {auth}")
        if "cancel" in kind:
            return web.json_response({"detail": [{"loc": ["header"], "msg": auth}]}, status=500)
        return web.json_response({"error_code": 422001, "detail": auth}, status=422)

    server.handler = echo
    errors = []
    for call in (
        client.status("r-1"),
        client.result("r-1"),
        client.cancel("r-1"),
        client.submit(MODEL, {"prompt": "x"}),
    ):
        try:
            await call
        except Exception as err:  # noqa: BLE001 - any error will do, we only inspect its text
            errors.append(err)
    assert len(errors) == 4
    for err in errors:
        assert_no_token(err)
        assert "***" in str(err)
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(client)


async def test_token_never_leaks_from_network_errors(session, caplog):
    caplog.set_level(logging.DEBUG)
    client = Client(session, f"http://127.0.0.1:{free_port()}", TOKEN)
    for call in (client.submit(MODEL, {}), client.status("r-1"), client.result("r-1"), client.cancel("r-1")):
        with pytest.raises(TransientApiError) as info:
            await call
        assert_no_token(info.value)
    assert TOKEN not in caplog.text


def test_token_with_control_characters_is_refused_without_echoing_it():
    with pytest.raises(UsageError) as info:
        Client(None, "https://model-api.example", TOKEN + "\r\nX-Evil: 1")
    assert TOKEN not in str(info.value)


def test_bad_base_url_is_a_usage_error():
    with pytest.raises(UsageError):
        Client(None, "model-api.example", TOKEN)


# ------------------------------------------------------------------ rate limiting


class CountingLimiter:
    def __init__(self):
        self.entered = 0
        self.inside = False

    async def __aenter__(self):
        self.entered += 1
        self.inside = True

    async def __aexit__(self, *info):
        self.inside = False
        return False


async def test_limiter_is_entered_once_per_call(server, session):
    limiter = CountingLimiter()
    client = Client(session, server.base_url, TOKEN, limiter=limiter)
    server.reply(
        200,
        {"request_id": "r-1", "status": "completed", "outcome": "cancelled", "output": {"video": "https://cdn/a.mp4"}},
    )
    await client.submit(MODEL, {"prompt": "x"})
    await client.status("r-1")
    await client.result("r-1")
    await client.cancel("r-1")
    assert limiter.entered == 4 == len(server.seen)
    server.reply(503, "")
    with pytest.raises(TransientApiError):
        await client.status("r-1")
    assert limiter.entered == 5 and not limiter.inside


async def test_a_submit_whose_place_was_taken_with_turn_enters_the_limiter_once(server, session):
    limiter = CountingLimiter()
    client = Client(session, server.base_url, TOKEN, limiter=limiter)
    server.reply(200, {"request_id": "r-1", "status": "in_queue"})
    await client.turn()
    assert limiter.entered == 1 and not server.seen  # the place is taken, nothing sent yet
    await client.submit(MODEL, {"prompt": "x"}, paced=True)
    assert limiter.entered == 1 and len(server.seen) == 1


async def test_limiter_is_not_entered_when_nothing_can_be_sent(server, session):
    limiter = CountingLimiter()
    client = Client(session, server.base_url, TOKEN, limiter=limiter)
    with pytest.raises(InvalidRequestError):
        await client.status("..")
    assert limiter.entered == 0


@pytest.mark.parametrize("rate", [0, float("inf")])
def test_make_limiter_unlimited(rate):
    assert make_limiter(rate) is None


def test_make_limiter_rejects_negative():
    with pytest.raises(ValueError):
        make_limiter(-1)


@pytest.mark.parametrize("rate", [0.5, 1, 20])
async def test_make_limiter_admits_calls(rate):
    limiter = make_limiter(rate)
    async with limiter:  # the first entry never waits
        pass


# ------------------------------------------------------------------ classify as a pure function


def test_classify_returns_the_object_on_success():
    assert classify(200, {}, b'{"request_id": "r-9"}', "submit", now=NOW) == {"request_id": "r-9"}


def test_classify_zero_error_code_is_not_an_error():
    assert classify(200, {}, b'{"status": "in_queue", "error_code": 0}', "status", now=NOW)["status"]


def test_classify_unknown_code_in_200_is_an_error():
    err = classify(200, {}, b'{"error_code": 999, "message": "??"}', "status", now=NOW)
    # Neither yes nor no: asked again like a transient failure, then recorded on the job.
    assert type(err) is MalformedAnswer and err.code == 999 and isinstance(err, TransientApiError)
    unknown = classify(200, {}, b'{"error_code": 999, "message": "??"}', "submit", now=NOW)
    assert isinstance(unknown, SubmitOutcomeUnknown)


def test_classify_message_from_detail_string_and_redaction():
    err = classify(400, {}, b'{"detail": "token sk-CANARY-123 is bad"}', "status", now=NOW, secrets=(TOKEN,))
    assert isinstance(err, InvalidRequestError)
    assert TOKEN not in str(err) and "token *** is bad" in str(err)


def test_classify_rejects_unknown_call_names():
    with pytest.raises(ValueError):
        classify(200, {}, b"{}", "download")


async def test_an_answer_over_the_size_cap_is_malformed_not_read_whole(server, client):
    from batchrun.api import MAX_ANSWER_BYTES

    server.reply(200, {"status": "in_queue", "pad": "x" * (MAX_ANSWER_BYTES + 10)})
    err = await expect(client.status("r-1"), MalformedAnswer)
    assert f"over {MAX_ANSWER_BYTES} bytes" in err.message
    server.reply(200, {"request_id": "r-1", "pad": "x" * (MAX_ANSWER_BYTES + 10)})
    await expect(client.submit(MODEL, {"prompt": "x"}), SubmitOutcomeUnknown)  # it may have created a job
