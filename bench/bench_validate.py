"""Benchmark: validate a 100,000-job manifest.

Generates the manifest in a temporary folder, then runs `load_manifest` on it in a fresh Python
subprocess `--runs` times (interpreter start-up and imports included), printing for each run the wall
time and the child's peak RSS (`ru_maxrss` from `os.wait4`), then the medians.

    python bench/bench_validate.py [--jobs 100000] [--runs 3] [--keep] [--mixed]

With ``--mixed``, the jobs cycle through five image-to-video models (`MIXED`), each job naming its own
`model:` and image field, so the registry of every shipped model is loaded and each job is validated
against its own model's schema.

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


# model id -> its start image field: five models with different schemas, the first one the default.
MIXED = {
    "kling/kling-3.0/standard/image-to-video": "start_image_url",
    "kling/kling-3.0/pro/image-to-video": "start_image_url",
    "wan-ai/wan-3.0/image-to-video": "image_url",
    "bytedance/seedance-2.5/image-to-video/1080p": "image",
    "minimax/minimax-h3/image-to-video": "image",
}


def write_mixed_manifest(path: Path, jobs: int) -> None:
    """Like `write_manifest`, the jobs cycling through the models of `MIXED` (about 21 MB per 100k)."""
    models = list(MIXED.items())
    with path.open("w", encoding="utf-8") as f:
        f.write("version: 1\nconcurrency: 8\ndefaults:\n  duration: 5\njobs:\n")
        for i in range(jobs):
            model, image_field = models[i % len(models)]
            extra = "    resolution: 768p\n" if model.startswith("minimax/") else ""
            f.write(f"  - id: clip-{i:06d}\n    model: {model}\n"
                    f"    prompt: \"Shot {i}: the camera pans slowly across the harbor at dawn.\"\n"
                    f"    {image_field}: https://images.example.com/batch/{i:06d}.png\n{extra}")


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
    parser.add_argument("--mixed", action="store_true", help="jobs mix five models (each job's own model:)")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    manifest = tmp / "big.yaml"
    (write_mixed_manifest if args.mixed else write_manifest)(manifest, args.jobs)
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
