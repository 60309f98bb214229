"""Benchmarks of `batchrun run` against the sandbox (issue: run a manifest end to end).

    python bench/bench_run.py overhead [--jobs 10000] [--runs 3]
        10,000 jobs, zero latency, concurrency 64, 64 KB videos: batchrun's wall time against a bare
        aiohttp script making the same calls in the same run (target <= 1.3x), CPU per job of both
        (target <= 1.2 ms for batchrun), batchrun's peak RSS (target <= 100 MB at 10,000 jobs) and its
        ledger commits per job (from the run's own record). Beside them, the two floors of
        floor_client.py: the bare script keeping batchrun's promises ("floor"), and the same also doing
        what SPEC requires of every run ("product floor": manifest validated, media facts, results.jsonl).
    python bench/bench_run.py syscalls [--jobs 500] [--runs 1]
        The same calls under `strace -c -f`: system calls per job of batchrun, both floors and the baseline
        (target <= 70 for batchrun), the top calls of each, and, from a second traced run of batchrun, the
        bytes written to the ledger's WAL per job and its commits per job.
    python bench/bench_run.py busy [--runs 3] [--queue-ahead 2 10] [--seed 1]
        100 jobs, capacity = concurrency = 10, two scenarios: `spread` (renders uniform in 0.6-1.2 s, full
        server stamps; target <= 1.04x, <= 3 calls/job) and `whole-second` (1 s renders, server stamps cut
        to whole seconds; target <= 1.03x, <= 2 calls/job), each with queue_ahead 0 and each --queue-ahead
        (default 2, and 10: one full round of the 10 slots queued at the provider).
        Makespan is first submit to last download (results.jsonl); the ideal is exact: the sandbox's own
        render times replayed in submit order on the 10 slots (`ideal_makespan`). Rate limit and poll
        intervals are batchrun's defaults scaled by the renders' factor (1/100). Calls are the sandbox's.

The sandbox runs in this process; batchrun and the baseline run as child processes, whose peak RSS
and CPU time come from wait4. CPU per job is the whole process's (start-up and the end of the run
included) divided by the jobs. Figures are medians over --runs runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sqlite3
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


def bench_video() -> bytes:
    """64 KB that start as an MP4 (the download's checks pass) and do not compress."""
    return b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + os.urandom(64 * 1024 - 24)


def client_argv(name: str, manifest: Path, base_url: str, jobs: int, out: Path) -> list[str]:
    """The command of one side of the overhead and syscalls benches: "baseline" (the bare script), "floor"
    (the bare script keeping the promises), "product" (the floor also doing what SPEC requires of every
    run: the manifest read and validated, media facts read, results.jsonl) or batchrun (any other name),
    64 at once."""
    if name in ("baseline", "floor", "product"):
        script = HERE / ("baseline_client.py" if name == "baseline" else "floor_client.py")
        extra = [str(manifest)] if name == "product" else []
        return [sys.executable, str(script), base_url, str(jobs), "64", str(out), *extra]
    return batchrun_argv(manifest, base_url, out)


def child_env() -> dict:
    return {**os.environ, "RUNCOMFY_API_TOKEN": "bench-token"}


async def overhead_once(jobs: int, workdir: Path) -> dict:
    video = bench_video()
    manifest = workdir / "overhead.yaml"
    write_manifest(manifest, jobs, 64)
    figures = {}
    for name in ("baseline", "floor", "product", "batchrun"):
        async with Sandbox(capacity=64, render_seconds=0.0, video_bytes=video) as sandbox:
            out = workdir / f"out-{name}-{time.monotonic_ns()}"
            argv = client_argv(name, manifest, sandbox.base_url, jobs, out)
            wall, rss, code, cpu = await run_child(argv, child_env())
            figures[name] = {"wall_s": wall, "rss_mb": rss, "exit": code, "cpu_s": cpu, "calls": dict(sandbox.calls)}
    figures["ratio"] = figures["batchrun"]["wall_s"] / figures["baseline"]["wall_s"]
    figures["floor_ratio"] = figures["floor"]["wall_s"] / figures["baseline"]["wall_s"]
    figures["over_floor"] = figures["batchrun"]["wall_s"] / figures["floor"]["wall_s"]
    figures["product_ratio"] = figures["product"]["wall_s"] / figures["baseline"]["wall_s"]
    figures["over_product"] = figures["batchrun"]["wall_s"] / figures["product"]["wall_s"]
    figures["batchrun"]["commits"] = ledger_commits(out)
    return figures


def ledger_commits(out: Path) -> int | None:
    """Write transactions the last run committed, as it recorded them (None before batchrun counted them)."""
    try:
        conn = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT summary FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        finally:
            conn.close()
        return json.loads(row[0]).get("ledger_commits")
    except (sqlite3.Error, TypeError, ValueError):
        return None


STRACE = shutil.which("strace") or "/usr/bin/strace"
_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """`strace -c` table rows as {syscall: calls}."""
    calls = {}
    for line in text.splitlines():
        match = _STRACE_ROW.match(line)
        if match and match[3] != "total":
            calls[match[3]] = int(match[1])
    return calls


def wal_bytes(trace: str) -> int:
    """Bytes written to a `-wal` file in an `strace -y` trace of write calls."""
    total = 0
    for line in trace.splitlines():
        if "-wal>" in line and ("pwrite" in line or "write(" in line):
            match = re.search(r"=\s*(\d+)\s*$", line)
            if match:
                total += int(match[1])
    return total


async def syscalls_once(jobs: int, workdir: Path) -> dict:
    video = bench_video()
    manifest = workdir / "syscalls.yaml"
    write_manifest(manifest, jobs, 64)
    figures = {}
    for name in ("baseline", "floor", "product", "batchrun", "batchrun-wal"):
        async with Sandbox(capacity=64, render_seconds=0.0, video_bytes=video) as sandbox:
            out = workdir / f"out-sys-{name}-{time.monotonic_ns()}"
            trace = workdir / f"strace-{name}-{time.monotonic_ns()}.txt"
            argv = client_argv(name, manifest, sandbox.base_url, jobs, out)
            if name == "batchrun-wal":
                strace = [STRACE, "-f", "-qq", "-y", "-e", "trace=pwrite64,write", "-o", str(trace)]
            else:
                strace = [STRACE, "-f", "-c", "-o", str(trace)]
            _, _, code, _ = await run_child(strace + argv, child_env())
            text = trace.read_text(errors="replace")
            if name == "batchrun-wal":
                figures["wal_bytes_per_job"] = wal_bytes(text) / jobs
                commits = ledger_commits(out)
                figures["commits_per_job"] = commits / jobs if commits is not None else None
            else:
                calls = parse_strace_summary(text)
                figures[name] = {"exit": code, "per_job": sum(calls.values()) / jobs,
                                 "top": sorted(calls.items(), key=lambda kv: -kv[1])[:8]}
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
    parser.add_argument("which", choices=["overhead", "syscalls", "busy"])
    parser.add_argument("--jobs", type=int, default=None, help="10,000 for overhead, 500 for syscalls")
    parser.add_argument("--runs", type=int, default=None, help="3, or 1 for syscalls")
    parser.add_argument("--queue-ahead", type=int, nargs="+", default=[2, BUSY_SLOTS],
                        help="busy: the queue_ahead values measured besides 0 (default: 2, and one round: 10)")
    parser.add_argument("--scenario", choices=list(BUSY_SCENARIOS), nargs="+", default=list(BUSY_SCENARIOS),
                        help="busy: the scenarios to run (default: all)")
    parser.add_argument("--seed", type=int, default=1, help="busy: the sandbox seed of run 1 (run i: seed + i - 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-") as tmp:
        workdir = Path(tmp)
        if args.which == "overhead":
            jobs, runs = args.jobs or 10_000, args.runs or 3
            results = []
            for i in range(runs):
                figures = await overhead_once(jobs, workdir)
                results.append(figures)
                base, floor, ours = figures["baseline"], figures["floor"], figures["batchrun"]
                print(f"run {i + 1}: baseline {base['wall_s']:.1f}s (cpu {base['cpu_s']:.1f}s, "
                      f"{base['cpu_s'] / jobs * 1000:.2f} ms/job), floor {floor['wall_s']:.1f}s "
                      f"(cpu {floor['cpu_s'] / jobs * 1000:.2f} ms/job, {figures['floor_ratio']:.2f}x), product floor "
                      f"{figures['product']['wall_s']:.1f}s (cpu {figures['product']['cpu_s'] / jobs * 1000:.2f} "
                      f"ms/job, {figures['product_ratio']:.2f}x), "
                      f"batchrun {ours['wall_s']:.1f}s "
                      f"(cpu {ours['cpu_s']:.1f}s, {ours['cpu_s'] / jobs * 1000:.2f} ms/job, exit {ours['exit']}), "
                      f"ratio {figures['ratio']:.2f}, batchrun peak RSS {ours['rss_mb']:.0f} MB, "
                      f"ledger commits/job {(ours['commits'] or 0) / jobs:.2f}, calls {ours['calls']}", flush=True)
            print(f"median over {runs} runs of {jobs} jobs: wall ratio "
                  f"{median([r['ratio'] for r in results]):.2f} (target <= 1.3), floor "
                  f"{median([r['floor_ratio'] for r in results]):.2f}x, batchrun/floor "
                  f"{median([r['over_floor'] for r in results]):.2f}x, floor CPU per job "
                  f"{median([r['floor']['cpu_s'] for r in results]) / jobs * 1000:.2f} ms; product floor "
                  f"{median([r['product_ratio'] for r in results]):.2f}x, batchrun/product floor "
                  f"{median([r['over_product'] for r in results]):.2f}x, its CPU per job "
                  f"{median([r['product']['cpu_s'] for r in results]) / jobs * 1000:.2f} ms; batchrun wall "
                  f"{median([r['batchrun']['wall_s'] for r in results]):.1f}s vs baseline "
                  f"{median([r['baseline']['wall_s'] for r in results]):.1f}s; CPU per job "
                  f"{median([r['batchrun']['cpu_s'] for r in results]) / jobs * 1000:.2f} ms (target <= 1.2) vs "
                  f"baseline {median([r['baseline']['cpu_s'] for r in results]) / jobs * 1000:.2f} ms; peak RSS "
                  f"{median([r['batchrun']['rss_mb'] for r in results]):.0f} MB (target <= 100 at 10,000 jobs); "
                  f"ledger commits/job {median([(r['batchrun']['commits'] or 0) for r in results]) / jobs:.2f}")
        elif args.which == "syscalls":
            jobs, runs = args.jobs or 500, args.runs or 1
            results = []
            for i in range(runs):
                figures = await syscalls_once(jobs, workdir)
                results.append(figures)
                for name in ("baseline", "floor", "product", "batchrun"):
                    top = ", ".join(f"{call} {n / jobs:.1f}" for call, n in figures[name]["top"])
                    print(f"run {i + 1}: {name}: {figures[name]['per_job']:.1f} syscalls/job (exit "
                          f"{figures[name]['exit']}); top per job: {top}", flush=True)
                commits = figures["commits_per_job"]
                print(f"run {i + 1}: batchrun ledger: {figures['wal_bytes_per_job'] / 1024:.1f} KB of WAL per job, "
                      f"{commits if commits is None else round(commits, 2)} commits per job", flush=True)
            print(f"median over {runs} runs of {jobs} jobs: batchrun "
                  f"{median([r['batchrun']['per_job'] for r in results]):.1f} syscalls/job (target <= 70) vs "
                  f"baseline {median([r['baseline']['per_job'] for r in results]):.1f}, floor "
                  f"{median([r['floor']['per_job'] for r in results]):.1f}, product floor "
                  f"{median([r['product']['per_job'] for r in results]):.1f}; WAL "
                  f"{median([r['wal_bytes_per_job'] for r in results]) / 1024:.1f} KB/job")
        else:
            summary = []
            for scenario in args.scenario:
                for ahead in sorted({0, *args.queue_ahead}):
                    results = []
                    for i in range(args.runs or 3):
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
            print(f"medians of {args.runs or 3} runs ({BUSY_JOBS} jobs, capacity = concurrency = {BUSY_SLOTS}, "
                  f"time scale 1/{TIME_SCALE:g}):")
            print("\n".join(summary))

if __name__ == "__main__":
    asyncio.run(main())
