"""Benchmarks of `batchrun run` against the sandbox (issue: run a manifest end to end).

    python bench/bench_run.py overhead [--jobs 10000] [--runs 3]
        10,000 jobs, zero latency, concurrency 64, 64 KB videos: batchrun's wall time against a bare
        aiohttp script making the same calls in the same run (target <= 1.5x), and batchrun's peak RSS
        (target <= 250 MB).
    python bench/bench_run.py busy [--runs 3] [--queue-ahead 2] [--seed 1]
        100 jobs, capacity = concurrency = 10, two scenarios: `spread` (renders uniform in 0.6-1.2 s, full
        server stamps; target <= 1.04x, <= 3 calls/job) and `whole-second` (1 s renders, server stamps cut
        to whole seconds; target <= 1.03x, <= 2 calls/job), each with queue_ahead 0 and --queue-ahead.
        Makespan is first submit to last download (results.jsonl); the ideal is exact: the sandbox's own
        render times replayed in submit order on the 10 slots (`ideal_makespan`). Rate limit and poll
        intervals are batchrun's defaults scaled by the renders' factor (1/100). Calls are the sandbox's.

The sandbox runs in this process; batchrun and the baseline run as child processes, whose peak RSS
comes from wait4. Figures are medians over --runs runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from batchrun.sandbox import Faults, Sandbox, ideal_makespan

HERE = Path(__file__).resolve().parent


def write_manifest(path: Path, jobs: int, concurrency: int, extra: str = "") -> None:
    lines = [
        "version: 1",
        f"concurrency: {concurrency}",
        "requests_per_second: 0",
        "poll_min_interval: 0.05",
        "poll_max_interval: 5",
        extra,
        "defaults:",
        "  start_image_url: https://example.com/bench/start.png",
        "  duration: 5",
        "  generate_audio: false",
        "jobs:",
    ]
    lines += [f"  - id: job-{i}\n    prompt: bench job {i}" for i in range(jobs)]
    path.write_text("\n".join(lines) + "\n")


# Runs the command as a grandchild and reports its peak RSS: asyncio's child watcher reaps our own
# children, which hides their rusage from wait4.
_MEASURE = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(json.dumps([time.perf_counter() - t, u.ru_maxrss, code, u.ru_utime + u.ru_stime]))"
)


async def run_child(argv: list[str], env: dict | None = None) -> tuple[float, float, int, float]:
    """Run a command; returns (wall seconds, peak RSS MB, exit code, CPU seconds)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _MEASURE, *argv, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await proc.communicate()
    wall, rss_kb, code, cpu = json.loads(stdout)
    if code != 0:
        sys.stderr.write(stderr.decode(errors="replace")[-2000:])
    return wall, rss_kb / 1024, code, cpu


def batchrun_argv(manifest: Path, base_url: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "batchrun", "run", "--no-preflight",
            str(manifest), "--base-url", base_url, "--output", str(out),
            "--no-progress"]


def child_env() -> dict:
    return {**os.environ, "RUNCOMFY_API_TOKEN": "bench-token"}


async def overhead_once(jobs: int, workdir: Path) -> dict:
    video = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + os.urandom(64 * 1024 - 24)  # starts as an MP4
    manifest = workdir / "overhead.yaml"
    write_manifest(manifest, jobs, 64)
    figures = {}
    for name in ("baseline", "batchrun"):
        async with Sandbox(capacity=64, render_seconds=0.0, video_bytes=video) as sandbox:
            out = workdir / f"out-{name}-{time.monotonic_ns()}"
            if name == "baseline":
                argv = [sys.executable, str(HERE / "baseline_client.py"), sandbox.base_url, str(jobs), "64", str(out)]
            else:
                argv = batchrun_argv(manifest, sandbox.base_url, out)
            wall, rss, code, cpu = await run_child(argv, child_env())
            figures[name] = {"wall_s": wall, "rss_mb": rss, "exit": code, "cpu_s": cpu, "calls": dict(sandbox.calls)}
    figures["ratio"] = figures["batchrun"]["wall_s"] / figures["baseline"]["wall_s"]
    return figures


def makespan(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]

    def ts(text):
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    return max(ts(r["downloaded_at"]) for r in rows) - min(ts(r["submitted_at"]) for r in rows)


# Real Kling renders take 60-120 s and batchrun's defaults poll every 1-30 s at 5 calls/s; the busy
# scenarios render in 0.6-1.2 s, so the rate limit and poll intervals are scaled by the same factor.
TIME_SCALE = 100.0
BUSY_JOBS, BUSY_SLOTS = 100, 10
BUSY_SCENARIOS = {  # name: (sandbox render_seconds, sandbox stamp resolution)
    "spread": ((0.6, 1.2), "full"),
    "whole-second": (1.0, "seconds"),
}


def busy_settings(queue_ahead: int) -> str:
    return "\n".join([
        f"requests_per_second: {5.0 * TIME_SCALE:g}",
        f"poll_min_interval: {1.0 / TIME_SCALE:g}",
        f"poll_max_interval: {30.0 / TIME_SCALE:g}",
        f"queue_ahead: {queue_ahead}",
    ])


async def busy_once(scenario: str, queue_ahead: int, workdir: Path, seed: int) -> dict:
    render, stamps = BUSY_SCENARIOS[scenario]
    manifest = workdir / "busy.yaml"
    write_manifest(manifest, BUSY_JOBS, BUSY_SLOTS)
    text = manifest.read_text().replace("requests_per_second: 0\npoll_min_interval: 0.05\npoll_max_interval: 5\n",
                                        busy_settings(queue_ahead) + "\n")
    manifest.write_text(text)
    async with Sandbox(capacity=BUSY_SLOTS, render_seconds=render, seed=seed,
                       faults=Faults(stamps=stamps)) as sandbox:
        out = workdir / f"out-busy-{scenario}-{queue_ahead}-{time.monotonic_ns()}"
        wall, rss, code, _ = await run_child(batchrun_argv(manifest, sandbox.base_url, out), child_env())
        calls = sandbox.calls
        ideal = ideal_makespan(sandbox.render_times(), BUSY_SLOTS)
        peak = sandbox.peak_in_flight
        queued_polls = sandbox.polls_by_state["in_queue"]
    span = makespan(out)
    return {"exit": code, "makespan_s": span, "ideal_s": ideal, "ratio_to_ideal": span / ideal,
            "status_result_calls_per_job": (calls["status"] + calls["result"]) / BUSY_JOBS, "wall_s": wall,
            "peak_in_flight": peak, "queued_polls_per_job": queued_polls / BUSY_JOBS}


def median(values):
    return statistics.median(values)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["overhead", "busy"])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--queue-ahead", type=int, default=2, help="busy: the queue_ahead measured besides 0")
    parser.add_argument("--seed", type=int, default=1, help="busy: the sandbox seed of run 1 (run i: seed + i - 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-") as tmp:
        workdir = Path(tmp)
        if args.which == "overhead":
            results = []
            for i in range(args.runs):
                figures = await overhead_once(args.jobs, workdir)
                results.append(figures)
                print(f"run {i + 1}: baseline {figures['baseline']['wall_s']:.1f}s "
                      f"(cpu {figures['baseline']['cpu_s']:.1f}s), batchrun {figures['batchrun']['wall_s']:.1f}s "
                      f"(cpu {figures['batchrun']['cpu_s']:.1f}s, exit {figures['batchrun']['exit']}), ratio "
                      f"{figures['ratio']:.2f}, batchrun peak RSS {figures['batchrun']['rss_mb']:.0f} MB, "
                      f"calls {figures['batchrun']['calls']}", flush=True)
            print(f"median over {args.runs} runs of {args.jobs} jobs: ratio "
                  f"{median([r['ratio'] for r in results]):.2f} (target <= 1.5), batchrun wall "
                  f"{median([r['batchrun']['wall_s'] for r in results]):.1f}s vs baseline "
                  f"{median([r['baseline']['wall_s'] for r in results]):.1f}s, peak RSS "
                  f"{median([r['batchrun']['rss_mb'] for r in results]):.0f} MB (target <= 250)")
        else:
            summary = []
            for scenario in BUSY_SCENARIOS:
                for ahead in sorted({0, args.queue_ahead}):
                    results = []
                    for i in range(args.runs):
                        figures = await busy_once(scenario, ahead, workdir, seed=args.seed + i)
                        results.append(figures)
                        print(f"{scenario} queue_ahead={ahead} run {i + 1}: makespan {figures['makespan_s']:.3f}s, "
                              f"exact ideal {figures['ideal_s']:.3f}s ({figures['ratio_to_ideal']:.3f}x), "
                              f"{figures['status_result_calls_per_job']:.2f} status+result calls/job "
                              f"({figures['queued_polls_per_job']:.2f} about a queued job), "
                              f"peak in flight {figures['peak_in_flight']}, exit {figures['exit']}", flush=True)
                    summary.append(f"{scenario:>12} queue_ahead={ahead}: median makespan/ideal "
                                   f"{median([r['ratio_to_ideal'] for r in results]):.3f}, "
                                   f"{median([r['status_result_calls_per_job'] for r in results]):.2f} calls/job")
            print(f"medians of {args.runs} runs ({BUSY_JOBS} jobs, capacity = concurrency = {BUSY_SLOTS}, "
                  f"time scale 1/{TIME_SCALE:g}):")
            print("\n".join(summary))

if __name__ == "__main__":
    asyncio.run(main())
