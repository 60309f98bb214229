"""Benchmark: validate a 100,000-job manifest.

Generates the manifest in a temporary folder, then runs `load_manifest` on it in a fresh Python
subprocess `--runs` times (interpreter start-up and imports included), printing for each run the wall
time and the child's peak RSS (`ru_maxrss` from `os.wait4`), then the medians.

    python bench/bench_validate.py [--jobs 100000] [--runs 3] [--keep]

Target on a 2-core machine: median ≤ 10 s and ≤ 1 GB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 10.0
TARGET_MB = 1024.0

CHILD = """
import sys
from batchrun.manifest import load_manifest
manifest = load_manifest(sys.argv[1])
print(len(manifest.jobs), len(manifest.warnings))
"""


def write_manifest(path: Path, jobs: int) -> None:
    """A manifest of `jobs` jobs with ids, short prompts and https image URLs (about 14 MB per 100k)."""
    with path.open("w", encoding="utf-8") as f:
        f.write("version: 1\nconcurrency: 8\nbudget_usd: 100000\ndefaults:\n  duration: 5\n"
                "  generate_audio: false\njobs:\n")
        for i in range(jobs):
            f.write(f"  - id: clip-{i:06d}\n"
                    f"    prompt: \"Shot {i}: the camera pans slowly across the harbor at dawn.\"\n"
                    f"    start_image_url: https://images.example.com/batch/{i:06d}.png\n")


def _maxrss_mb(rusage) -> float:
    # Linux reports KiB, macOS bytes.
    return rusage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def run_once(manifest: Path, expected_jobs: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(manifest)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    _, status, rusage = os.wait4(child.pid, 0)  # rusage of this child alone
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    out, err = child.stdout.read().decode(), child.stderr.read().decode()
    child.stdout.close()
    child.stderr.close()
    if child.returncode != 0 or int(out.split()[0]) != expected_jobs:
        raise SystemExit(f"load_manifest failed (exit {child.returncode}):\n{out}{err[-3000:]}")
    return wall, _maxrss_mb(rusage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated manifest and print its path")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    manifest = tmp / "big.yaml"
    write_manifest(manifest, args.jobs)
    size_mb = manifest.stat().st_size / 2**20
    print(f"manifest: {args.jobs:,} jobs, {size_mb:.1f} MiB ({manifest if args.keep else 'temporary'})")
    walls, peaks = [], []
    try:
        for run in range(1, args.runs + 1):
            wall, peak = run_once(manifest, args.jobs)
            walls.append(wall)
            peaks.append(peak)
            print(f"run {run}: wall {wall:.2f} s, peak RSS {peak:.0f} MB", flush=True)
    finally:
        if not args.keep:
            manifest.unlink()
            tmp.rmdir()
    wall, peak = statistics.median(walls), statistics.median(peaks)
    verdict = "within" if wall <= TARGET_SECONDS and peak <= TARGET_MB else "OVER"
    print(f"median: wall {wall:.2f} s, peak RSS {peak:.0f} MB ({verdict} target: "
          f"{TARGET_SECONDS:g} s, {TARGET_MB:g} MB)")
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
