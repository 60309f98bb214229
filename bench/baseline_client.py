"""The baseline for bench_run.py: a bare aiohttp script making the same calls batchrun makes per job
(submit, status until finished, result, download to disk), with the same concurrency, and nothing else:
no ledger, no retries, no verification. Usage: baseline_client.py BASE_URL JOBS CONCURRENCY OUTDIR"""

import asyncio
import sys
from pathlib import Path

import aiohttp

MODEL = "kling/kling-3.0/standard/image-to-video"
IMAGE = "https://example.com/bench/start.png"


async def one(session, base, i, out: Path, slots: asyncio.Semaphore):
    headers = {"Authorization": "Bearer bench"}
    async with slots:
        body = {"prompt": f"bench job {i}", "start_image_url": IMAGE, "duration": 5, "generate_audio": False}
        async with session.post(f"{base}/v1/models/{MODEL}", json=body, headers=headers) as resp:
            request_id = (await resp.json())["request_id"]
        while True:
            async with session.get(f"{base}/v1/requests/{request_id}/status", headers=headers) as resp:
                if (await resp.json())["status"] in ("completed", "failed", "cancelled"):
                    break
            await asyncio.sleep(0.05)
        async with session.get(f"{base}/v1/requests/{request_id}/result?include_cost=true", headers=headers) as resp:
            url = (await resp.json())["output"]["video"]
    async with session.get(url) as resp:
        with open(out / f"job-{i}.mp4", "wb") as handle:
            async for chunk in resp.content.iter_chunked(256 * 1024):
                handle.write(chunk)


async def main(base: str, jobs: int, concurrency: int, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        # Tasks in windows, as a careful bare script would, so memory stays flat.
        pending = set()
        for i in range(jobs):
            pending.add(asyncio.create_task(one(session, base, i, out, slots)))
            if len(pending) >= concurrency * 2:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])))
