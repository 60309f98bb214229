"""The sandbox against the API contract, over real loopback sockets with a plain aiohttp client.

Nothing here uses batchrun's own client: these tests pin the emulator that the client's tests trust.
Time never passes for real: every sandbox runs on a FakeClock the test advances.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime
from email.utils import formatdate
from importlib import resources

import aiohttp
import pytest

from batchrun.sandbox import MODEL_ID, Faults, Sandbox, SimQueue, ideal_makespan, input_sha256
from batchrun.sandbox.queue import Job

AUTH = {"Authorization": "Bearer sandbox-token"}
SAMPLE = resources.files("batchrun.sandbox").joinpath("sample.mp4").read_bytes()
IMAGE = "https://example.com/cliff.png"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def job_input(prompt: str = "waves crash below", **extra) -> dict:
    return {"prompt": prompt, "start_image_url": IMAGE, **extra}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


@pytest.fixture
async def make(clock):
    """Build and start sandboxes on the test's fake clock; close them all afterwards."""
    made: list[Sandbox] = []

    async def factory(**kwargs) -> Sandbox:
        kwargs.setdefault("clock", clock)
        sandbox = Sandbox(**kwargs)
        await sandbox.start()
        made.append(sandbox)
        return sandbox

    yield factory
    for sandbox in made:
        await sandbox.close()


async def submit(http, sb, body=None, model=MODEL_ID):
    async with http.post(f"{sb.base_url}/v1/models/{model}", json=body or job_input()) as resp:
        return resp.status, await resp.json()


async def get_json(http, url, **kwargs):
    async with http.get(url, **kwargs) as resp:
        return resp.status, await resp.json()


async def status_of(http, sb, request_id):
    return (await get_json(http, f"{sb.base_url}/v1/requests/{request_id}/status"))[1]


async def cancel(http, sb, request_id):
    async with http.post(f"{sb.base_url}/v1/requests/{request_id}/cancel") as resp:
        assert resp.status == 200
        return await resp.json()


# -- the happy path ---------------------------------------------------------------------------


async def test_submit_status_result_download(make, http, clock):
    sb = await make(capacity=2, render_seconds=30)
    assert sb.base_url.startswith("http://127.0.0.1:")
    status, sub = await submit(http, sb)
    assert status == 200
    rid = sub["request_id"]
    assert set(sub) == {"request_id", "status_url", "result_url", "cancel_url"}
    assert sub["status_url"] == f"{sb.base_url}/v1/requests/{rid}/status"
    assert sub["cancel_url"] == f"{sb.base_url}/v1/requests/{rid}/cancel"

    st = await status_of(http, sb, rid)
    assert st == {"request_id": rid, "status": "in_progress", "status_url": sub["status_url"],
                  "result_url": sub["result_url"]}
    # Not finished: the result call answers the status, to keep polling.
    assert await get_json(http, sub["result_url"]) == (200, st)

    clock.advance(30)
    assert (await status_of(http, sb, rid))["status"] == "completed"
    status, res = await get_json(http, sub["result_url"], params={"include_cost": "true"})
    assert status == 200
    assert res["status"] == "completed" and res["error"] is None
    assert res["cost"] == pytest.approx(1.26)  # all defaults: 10 s with audio
    assert res["created_at"].endswith("+00:00") and res["finished_at"] > res["created_at"]
    assert "cost" not in (await get_json(http, sub["result_url"]))[1]

    async with aiohttp.ClientSession() as anonymous:  # the storage host needs no token
        async with anonymous.get(res["output"]["video"]) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "video/mp4"
            assert int(resp.headers["Content-Length"]) == len(SAMPLE)
            assert await resp.read() == SAMPLE
    assert sb.calls == {"submit": 1, "status": 2, "result": 3, "download": 1}
    assert sb.jobs[rid].status == "completed" and sb.jobs_created == 1


def test_sample_is_a_small_faststart_mp4():
    assert 1000 < len(SAMPLE) < 20_000
    assert SAMPLE[4:8] == b"ftyp"
    # faststart: the moov index comes before the media data, so a browser can play it at once.
    assert 0 < SAMPLE.find(b"moov") < SAMPLE.find(b"mdat")


async def test_cost_follows_duration_and_audio(make, http):
    sb = await make()
    _, sub = await submit(http, sb, job_input(duration=5, generate_audio=False))
    _, res = await get_json(http, sub["result_url"] + "?include_cost=true")
    assert res["cost"] == pytest.approx(0.42)


async def test_custom_video_bytes_and_context_manager(clock, http):
    payload = bytes(range(256)) * 256
    async with Sandbox(video_bytes=payload, clock=clock) as sb:
        _, sub = await submit(http, sb)
        _, res = await get_json(http, sub["result_url"])
        async with http.get(res["output"]["video"]) as resp:
            assert await resp.read() == payload


# -- the simulated queue ----------------------------------------------------------------------


async def test_capacity_queue_positions_and_peak(make, http, clock):
    sb = await make(capacity=2, render_seconds=10)
    ids = [(await submit(http, sb, job_input(f"job {i}")))[1]["request_id"] for i in range(5)]
    states = [await status_of(http, sb, rid) for rid in ids]
    assert [s["status"] for s in states] == ["in_progress"] * 2 + ["in_queue"] * 3
    assert [s.get("queue_position") for s in states] == [None, None, 1, 2, 3]
    assert sb.peak_in_flight == 5

    clock.advance(10)  # the first two end; the next two start at exactly t=10
    assert [(await status_of(http, sb, r))["status"] for r in ids] == (
        ["completed"] * 2 + ["in_progress"] * 2 + ["in_queue"]
    )
    assert (await status_of(http, sb, ids[4]))["queue_position"] == 1
    clock.advance(25)  # t=35: the second pair ended at 20; the last job ran 20..30
    assert {(await status_of(http, sb, r))["status"] for r in ids} == {"completed"}
    assert sb.jobs[ids[4]].started_at == 1020 and sb.jobs[ids[4]].finished_at == 1030
    assert sb.in_flight == 0 and sb.peak_in_flight == 5


async def test_events_replay_at_their_exact_time(make, http, clock):
    durations = iter([10, 3, 4])
    sb = await make(capacity=1, render_seconds=lambda rng: next(durations))
    ids = [(await submit(http, sb, job_input(f"job {i}")))[1]["request_id"] for i in range(3)]
    clock.advance(16.99)  # ends at 10, 13, 17: one poll long after must not shift them
    assert (await status_of(http, sb, ids[2]))["status"] == "in_progress"
    assert [sb.jobs[r].finished_at for r in ids[:2]] == [1010, 1013]
    assert sb.jobs[ids[2]].started_at == 1013
    clock.advance(0.01)
    assert (await status_of(http, sb, ids[2]))["status"] == "completed"


async def test_concurrent_submits_queue_in_order(make, http, clock):
    sb = await make(capacity=4, render_seconds=10)
    subs = await asyncio.gather(*(submit(http, sb, job_input(f"job {i}")) for i in range(64)))
    states = await asyncio.gather(*(status_of(http, sb, sub["request_id"]) for _, sub in subs))
    assert sorted(s.get("queue_position", 0) for s in states) == [0] * 4 + list(range(1, 61))
    assert sb.peak_in_flight == 64

    clock.advance(10 * 16)
    assert sb.in_flight == 0
    await submit(http, sb, job_input("late"))
    assert sb.peak_in_flight == 64  # a peak, not a running total


def test_queue_is_cheap_for_10000_jobs():
    rng = random.Random(1)
    queue = SimQueue(capacity=64)
    jobs, now = [], 0.0
    started = time.perf_counter()
    for i in range(10_000):
        job = Job(str(i), MODEL_ID, {}, "", render_seconds=rng.random(), created_at=now)
        queue.add(job, now)
        jobs.append(job)
        if i % 3 == 0:
            queue.cancel(jobs[i // 2], now)
        queue.position(job)
        now += 0.005
    queue.advance(now + 10_000)
    assert time.perf_counter() - started < 2.0
    assert all(j.status in ("completed", "cancelled") for j in jobs)
    assert queue.in_flight == 0 and queue.peak_in_flight > 64


async def test_zero_latency_many_jobs_over_http(make, http):
    sb = await make(capacity=64)
    for i in range(200):
        _, sub = await submit(http, sb, job_input(f"job {i}"))
        _, res = await get_json(http, sub["result_url"])
        assert res["status"] == "completed"
    assert sb.jobs_created == 200 and sb.in_flight == 0


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_queued_vs_in_progress_vs_finished(make, http, clock):
    sb = await make(capacity=1, render_seconds=10)
    a, b, c = [(await submit(http, sb, job_input(p)))[1]["request_id"] for p in "abc"]
    assert await cancel(http, sb, a) == {"request_id": a, "outcome": "not_cancellable", "status": "in_progress"}
    assert await cancel(http, sb, b) == {"request_id": b, "outcome": "cancelled"}
    assert (await status_of(http, sb, b))["status"] == "cancelled"
    assert (await status_of(http, sb, c))["queue_position"] == 1  # moved up past the cancelled job
    _, res = await get_json(http, f"{sb.base_url}/v1/requests/{b}/result")
    assert res["status"] == "cancelled" and res["output"] is None

    clock.advance(10)  # the cancelled job takes no slot: c starts at once
    assert (await status_of(http, sb, c))["status"] == "in_progress"
    clock.advance(10)
    assert (await cancel(http, sb, c))["status"] == "completed"
    assert (await cancel(http, sb, b))["outcome"] == "not_cancellable"


# -- errors of the contract -------------------------------------------------------------------


async def test_auth_is_required_and_never_echoed(make, clock):
    sb = await make(token="s3cret-token")
    url = f"{sb.base_url}/v1/models/{MODEL_ID}"
    async with aiohttp.ClientSession() as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "s3cret-token"}):
            async with anonymous.post(url, json=job_input(), headers=headers) as resp:
                assert resp.status == 401
                text = await resp.text()
                assert (await resp.json())["error_code"] == 401001
                assert "wrong-token" not in text and "s3cret" not in text
        async with anonymous.post(url, json=job_input(), headers={"Authorization": "Bearer s3cret-token"}) as r:
            assert r.status == 200 and "s3cret" not in await r.text()
    assert sb.jobs_created == 1 and sb.posts_total == 4


async def test_unknown_model_and_request(make, http):
    sb = await make()
    status, body = await submit(http, sb, model="kling/nope")
    assert status == 400 and body["error_code"] == 400001
    for path in ("status", "result"):
        status, body = await get_json(http, f"{sb.base_url}/v1/requests/nope/{path}")
        assert (status, body) == (404, {"error_code": 404001, "error_message": "request not found"})
    async with http.post(f"{sb.base_url}/v1/requests/nope/cancel") as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (job_input(durations=5), ["body", "durations"]),
        (job_input(duration=20), ["body", "duration"]),
        ({"prompt": "no image"}, ["body"]),
        (job_input(multi_prompt=[{"prompt": "a"}, {"prompt": "b", "duration": 4}]), ["body", "multi_prompt"]),
        (job_input(duration=8, multi_prompt=[{"prompt": "a"}, {"prompt": "b"}]), ["body", "multi_prompt"]),
    ],
)
async def test_invalid_input_is_422(make, http, body, loc):
    sb = await make()
    status, answer = await submit(http, sb, body)
    assert status == 422 and answer["error_code"] == 422001 and answer["error_message"]
    assert answer["detail"][0]["loc"] == loc and answer["detail"][0]["msg"]
    assert sb.jobs_created == 0 and sb.posts_total == 1 and sb.posts_for(body) == 1


async def test_multi_prompt_defaults_add_up(make, http):
    sb = await make()
    status, _ = await submit(http, sb, job_input(multi_prompt=[{"prompt": "a"}, {"prompt": "b"}]))
    assert status == 200
    status, _ = await submit(http, sb, job_input(duration=8, multi_prompt=[{"prompt": "a", "duration": 8}]))
    assert status == 200


async def test_non_json_body_is_422(make, http):
    sb = await make()
    async with http.post(f"{sb.base_url}/v1/models/{MODEL_ID}", data=b"{not json") as resp:
        assert resp.status == 422 and (await resp.json())["error_code"] == 422001
    assert sb.posts_total == 1 and not sb.posts_by_input


# -- downloads --------------------------------------------------------------------------------


async def video_url(http, sb, **body) -> str:
    _, sub = await submit(http, sb, job_input(**body))
    return (await get_json(http, sub["result_url"]))[1]["output"]["video"]


async def test_range_requests(make, http):
    sb = await make()
    url = await video_url(http, sb)
    total = len(SAMPLE)
    async with http.get(url, headers={"Range": "bytes=100-"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-{total - 1}/{total}"
        assert int(resp.headers["Content-Length"]) == total - 100
        assert await resp.read() == SAMPLE[100:]
    async with http.get(url, headers={"Range": "bytes=0-9"}) as resp:
        assert resp.status == 206 and await resp.read() == SAMPLE[:10]
    async with http.get(url, headers={"Range": "bytes=-16"}) as resp:
        assert resp.status == 206 and await resp.read() == SAMPLE[-16:]
    async with http.get(url, headers={"Range": f"bytes={total}-"}) as resp:
        assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{total}"
    async with http.head(url) as resp:
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == total
    async with http.get(f"{sb.base_url}/files/nope/video.mp4") as resp:
        assert resp.status == 404


async def test_url_expires_then_result_mints_a_fresh_one(make, http, clock):
    sb = await make(faults=Faults(url_ttl=60))
    _, sub = await submit(http, sb)
    first = (await get_json(http, sub["result_url"]))[1]["output"]["video"]
    assert "expires=" in first
    async with http.get(first) as resp:
        assert resp.status == 200
    clock.advance(61)
    async with http.get(first) as resp:
        assert resp.status == 403
    async with http.get(first.replace("expires=", "expires=9")) as resp:  # no forging a later expiry
        assert resp.status == 403
    fresh = (await get_json(http, sub["result_url"]))[1]["output"]["video"]
    assert fresh != first
    async with http.get(fresh) as resp:
        assert resp.status == 200 and await resp.read() == SAMPLE
    assert sb.jobs[sub["request_id"]].urls_minted == 2


async def test_cut_downloads_can_be_resumed_with_range(make, http):
    sb = await make(faults=Faults(cut_download_rate=1.0, cut_after_bytes=1000))
    url = await video_url(http, sb)
    got = b""
    for _ in range(20):
        headers = {"Range": f"bytes={len(got)}-"} if got else {}
        try:
            async with http.get(url, headers=headers) as resp:
                assert int(resp.headers["Content-Length"]) == len(SAMPLE) - len(got)  # the full promise
                async for chunk in resp.content.iter_any():
                    got += chunk
        except aiohttp.ClientPayloadError:
            continue
        break
    assert got == SAMPLE
    assert sb.calls["download"] == -(-len(SAMPLE) // 1000)


# -- fault knobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["1", formatdate(0, usegmt=True)])
async def test_rate_limit_every_nth_call(make, http, retry_after):
    sb = await make(faults=Faults(rate_limit_every=3, retry_after=retry_after))
    _, sub = await submit(http, sb)
    answers = []
    for _ in range(5):
        async with http.get(sub["status_url"]) as resp:
            answers.append((resp.status, resp.headers.get("Retry-After"), (await resp.json()).get("error_code")))
    assert answers[1] == (429, retry_after, 429001) and answers[4] == (429, retry_after, 429001)
    assert [a[0] for a in answers] == [200, 429, 200, 200, 429]


async def test_rate_limited_posts_are_counted_but_create_nothing(make, http):
    sb = await make(faults=Faults(rate_limit_every=1))
    status, body = await submit(http, sb)
    assert status == 429 and body["error_code"] == 429001
    assert sb.posts_for(job_input()) == 1 and sb.jobs_created == 0


async def test_5xx_on_status_result_and_download_only(make, http):
    sb = await make(faults=Faults(error_5xx_rate=1.0))
    status, sub = await submit(http, sb)
    assert status == 200  # submits are never hit: a 5xx there would leave the job unknown
    codes = set()
    for url in (sub["status_url"], sub["result_url"]) * 4:
        status, body = await get_json(http, url)
        codes.add(status)
        assert body["error_code"] == 500001
    assert codes <= {500, 503} and codes
    rid = sub["request_id"]
    async with http.get(f"{sb.base_url}/files/{rid}/video.mp4") as resp:
        assert resp.status in (500, 503)
    assert (await cancel(http, sb, rid))["outcome"] == "not_cancellable"


async def test_http200_with_error_body(make, http):
    sb = await make(faults=Faults(http200_error_rate=1.0))
    _, sub = await submit(http, sb)
    for url in (sub["status_url"], sub["result_url"]):
        assert await get_json(http, url) == (200, {"error_code": 500001, "error_message": "internal error"})


async def test_fault_rates_are_deterministic_per_seed(clock, http):
    outcomes = []
    for _ in range(2):
        async with Sandbox(faults=Faults(error_5xx_rate=0.5), seed=7, clock=clock) as sb:
            _, sub = await submit(http, sb)
            outcomes.append([(await get_json(http, sub["status_url"]))[0] for _ in range(20)])
            outcomes.append(sub["request_id"])
    # The faults repeat with the seed; the request ids never do.
    assert outcomes[0] == outcomes[2] and outcomes[1] != outcomes[3]
    assert 200 in outcomes[0] and set(outcomes[0]) - {200}


async def test_fail_marker_and_fail_rate(make, http, clock):
    sb = await make(render_seconds=5)
    _, sub = await submit(http, sb, job_input("please [fail] here"))
    assert (await status_of(http, sb, sub["request_id"]))["status"] == "in_progress"
    clock.advance(5)
    _, res = await get_json(http, sub["result_url"] + "?include_cost=true")
    assert res["status"] == "failed" and res["error"] == "content policy violation (sandbox)"
    assert res["output"] is None and res["cost"] == 0.0

    sb = await make(faults=Faults(fail_rate=1.0, fail_marker=""))
    _, sub = await submit(http, sb, job_input("[fail] is only a marker when set"))
    assert (await get_json(http, sub["result_url"]))[1]["status"] == "failed"


async def test_lost_submit_answer_creates_the_job_exactly_once(make, http):
    sb = await make(faults=Faults(lose_submit_answer=1))
    async with http.post(f"{sb.base_url}/v1/models/{MODEL_ID}", json=job_input()) as resp:
        assert resp.status == 502
        with pytest.raises(aiohttp.ContentTypeError):
            await resp.json()
    assert sb.jobs_created == 1 and sb.posts_for(job_input()) == 1 and sb.jobs_for(job_input()) == 1
    (job,) = sb.jobs.values()
    assert job.lost_answer and job.input == job_input()
    status, _ = await submit(http, sb, job_input("next"))
    assert status == 200 and sb.jobs_created == 2


async def test_no_balance_after_n_jobs(make, http):
    sb = await make(faults=Faults(no_balance_after=1))
    assert (await submit(http, sb))[0] == 200
    status, body = await submit(http, sb, job_input("second"))
    assert (status, body) == (402, {"error_code": 400002, "error_message": "no remaining balance"})
    assert sb.posts_total == 2 and sb.jobs_created == 1


async def test_odd_statuses(make, http, clock):
    sb = await make(render_seconds=10, faults=Faults(odd_statuses=True))
    _, sub = await submit(http, sb)
    seen = []
    for _ in range(3):
        seen.append((await status_of(http, sb, sub["request_id"]))["status"])
        clock.advance(5)
    assert seen == ["starting", "processing", "completed"]


async def test_counters(make, http):
    sb = await make()
    body = job_input()
    for _ in range(2):
        await submit(http, sb, body)
    assert sb.posts_total == 2 and sb.posts_for(body) == 2 and sb.jobs_for(body) == 2
    assert sb.posts_by_input == {input_sha256(body): 2}
    assert input_sha256({"b": 1, "a": "é"}) == input_sha256({"a": "é", "b": 1})
    assert sb.calls["submit"] == 2


async def test_request_ids_are_random_uuid4_and_never_repeat_across_sandboxes(make, http):
    """Two sandboxes with the same seed (two `--sandbox` processes) hand out different ids, shaped like
    RunComfy's: a resumed run must never find its old request id naming another job in a new sandbox."""
    import uuid

    first, second = await make(seed=0), await make(seed=0)
    ids = [(await submit(http, sb, job_input(f"job {i}")))[1]["request_id"]
           for sb in (first, second) for i in range(3)]
    assert len(set(ids)) == 6
    for rid in ids:
        assert uuid.UUID(rid).version == 4 and str(uuid.UUID(rid)) == rid
    for rid in ids[:3]:
        async with http.get(f"{second.base_url}/v1/requests/{rid}/status") as resp:
            assert resp.status == 404


# -- render times and the server's stamps, for the makespan benches ----------------------------


async def result_of(http, sb, request_id):
    return (await get_json(http, f"{sb.base_url}/v1/requests/{request_id}/result"))[1]


@pytest.mark.parametrize(("stamps", "fraction"), [("full", True), ("seconds", False), ("none", None)])
async def test_result_stamps_come_at_the_resolution_asked(make, http, clock, stamps, fraction):
    clock.advance(0.25)  # the sandbox's wall time starts at a real time: a fraction of a second anyway
    sb = await make(render_seconds=1.5, faults=Faults(stamps=stamps))
    rids = []
    for i in range(3):
        rids.append((await submit(http, sb, job_input(f"job {i}")))[1]["request_id"])
        clock.advance(0.3)
    clock.advance(2)
    bodies = [await result_of(http, sb, rid) for rid in rids]
    assert {b["status"] for b in bodies} == {"completed"}
    if fraction is None:
        assert all(b["created_at"] is None and b["finished_at"] is None for b in bodies)
        return
    stamps_read = [datetime.fromisoformat(b[k]) for b in bodies for k in ("created_at", "finished_at")]
    assert any(t.microsecond for t in stamps_read) is fraction
    if not fraction:  # cut down, never rounded up: a stamp is never later than the event
        for rid, body in zip(rids, bodies, strict=True):
            created = datetime.fromisoformat(body["created_at"]).timestamp()
            assert 0 <= sb._wall0 + (sb.jobs[rid].created_at - sb._clock0) - created < 1


async def test_uniform_render_times_are_seeded_and_given_back_in_submit_order(make, http):
    times = []
    for _ in range(2):
        sb = await make(render_seconds=(0.6, 1.2), seed=7)
        for i in range(20):
            await submit(http, sb, job_input(f"job {i}"))
        times.append(sb.render_times())
    assert times[0] == times[1]  # the same seed, the same renders
    assert len(times[0]) == 20 and all(0.6 <= t <= 1.2 for t in times[0])
    assert len(set(times[0])) == 20


def test_ideal_makespan_is_list_scheduling_in_submit_order():
    assert ideal_makespan([1.0] * 100, 10) == pytest.approx(10.0)
    # Slots take jobs in order as they free: 3|2 -> the third job (2) goes to the slot freed at 2, ends 4;
    # the fourth (1) to the slot freed at 3, ends 4; the last (2) to the one freed at 4: 6.
    assert ideal_makespan([3.0, 2.0, 2.0, 1.0, 2.0], 2) == pytest.approx(6.0)
    assert ideal_makespan([5.0, 1.0], 10) == 5.0
    assert ideal_makespan([], 3) == 0.0


async def test_ideal_makespan_matches_the_sandbox_queue_given_everything_at_once(make, http, clock):
    sb = await make(capacity=3, render_seconds=(1.0, 4.0), seed=3)
    rids = [(await submit(http, sb, job_input(f"job {i}")))[1]["request_id"] for i in range(12)]
    clock.advance(100)
    await status_of(http, sb, rids[0])
    span = max(sb.jobs[r].finished_at for r in rids) - min(sb.jobs[r].created_at for r in rids)
    assert span == pytest.approx(ideal_makespan(sb.render_times(), 3))


async def test_polls_are_counted_by_the_jobs_state_at_the_time(make, http, clock):
    sb = await make(capacity=1, render_seconds=10)
    first = (await submit(http, sb, job_input("a")))[1]["request_id"]
    second = (await submit(http, sb, job_input("b")))[1]["request_id"]
    await status_of(http, sb, second)
    await result_of(http, sb, first)
    clock.advance(25)
    await result_of(http, sb, second)
    assert sb.polls_by_state == {"in_queue": 1, "in_progress": 1, "completed": 1}
