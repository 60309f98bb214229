"""Benchmark: `batchrun validate` of a 100,000-job manifest.

Generates the manifest in a temporary folder, then runs `python -m batchrun validate MANIFEST` on it in a
fresh process `--runs` times (interpreter start-up and imports included), printing for each run the wall
time and the child's peak RSS (`ru_maxrss` from `os.wait4`), then the medians.

    python bench/bench_validate.py [--jobs 100000] [--runs 3] [--keep] [--mixed] [--compare REV] [--phases]
                                   [--command plan]

With ``--mixed``, the jobs cycle through five image-to-video models (`MIXED`), each job naming its own
`model:` and image field, so the registry of every shipped model is loaded and each job is validated
against its own model's schema.

With ``--compare REV`` (such as ``main``), the code of that git revision (its ``batchrun/`` folder, taken
with ``git archive`` into a temporary folder; the repository is not touched) is measured in the same
run, alternating with the working tree's run by run, and the ratios of the medians are printed: on a
busy machine only the ratio is meaningful.

With ``--command plan``, the command timed is `batchrun plan MANIFEST --no-balance-check` into a fresh
output dir (no ledger) instead: loading the manifest is most of it, the rest is the plan's own work.

With ``--phases``, one extra process per tree splits the time inside one process: the C parser's
events alone (the floor of any loader built on PyYAML), the YAML document with its positions
(`yamlload.load_text`), and the whole `load_manifest` (events, document, every job checked).

Every figure is cold: the validated-manifest cache is off (`BATCHRUN_MANIFEST_CACHE=off`) in the children;
`bench_big.py` shows the commands with it too.

Targets (issue 13), on a quiet 2-core machine: validate <= 4 s, plan <= 5 s; peak RSS as low as is cheap.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS = {"validate": 4.0, "plan": 5.0}  # issue 13, on a quiet 2-core machine
MAIN_QUIET_SECONDS = 5.0  # issue 13's figure for validate on main (4.9-5.2 s), to scale a ratio by

# Run in one process per tree with --phases: where the time of a load goes.
PHASES = """
import gc, sys, time
started = time.perf_counter()
import yaml
from batchrun import manifest, yamlload
imported = time.perf_counter()
gc.disable()
text = open(sys.argv[1], encoding="utf-8").read()
loader_class = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
t = time.perf_counter()
loader = loader_class(text)
while not isinstance(loader.get_event(), yaml.StreamEndEvent):
    pass
loader.dispose()
events = time.perf_counter() - t
t = time.perf_counter()
yamlload.load_text(text, sys.argv[1])
document = time.perf_counter() - t
gc.enable()
t = time.perf_counter()
manifest.load_manifest(sys.argv[1])
whole = time.perf_counter() - t
print(f"imports {imported - started:.2f} s, parser events alone {events:.2f} s, YAML document with positions "
      f"{document:.2f} s, load_manifest {whole:.2f} s (the rest, models and jobs checked: {whole - document:.2f} s)")
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


def _env(tree: Path) -> dict[str, str]:
    # Cold figures: the validated-manifest cache off (a `plan` would read it, `validate` would write it).
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
            "BATCHRUN_MANIFEST_CACHE": "off"}


def run_once(tree: Path, manifest: Path, expected_jobs: int, command: str = "validate") -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of `batchrun validate MANIFEST` (or `plan`) with the `batchrun` of `tree`."""
    argv = [sys.executable, "-m", "batchrun", command, str(manifest)]
    if command == "plan":
        output = Path(tempfile.mkdtemp(prefix="plan-", dir=manifest.parent))
        argv += ["--no-balance-check", "--output", str(output)]
    started = time.perf_counter()
    # cwd: the manifest's folder, so `-m batchrun` finds no other batchrun than the one on PYTHONPATH.
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tree), cwd=manifest.parent)
    _, status, rusage = os.wait4(child.pid, 0)  # rusage of this child alone
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    out, err = child.stdout.read().decode(), child.stderr.read().decode()
    child.stdout.close()
    child.stderr.close()
    if child.returncode != 0 or (command == "validate" and f"ok, {expected_jobs} job" not in out):
        raise SystemExit(f"{command} failed in {tree} (exit {child.returncode}):\n{out[-3000:]}{err[-3000:]}")
    return wall, _maxrss_mb(rusage)


def phases(tree: Path, manifest: Path) -> str:
    done = subprocess.run([sys.executable, "-c", PHASES, str(manifest)], capture_output=True, text=True,
                          env=_env(tree), cwd=manifest.parent)
    return done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr[-2000:]}"


def export_rev(rev: str, into: Path) -> Path:
    """The `batchrun/` folder of git revision `rev`, extracted under `into` (the repository is only read)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "batchrun"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
    tree = into / "baseline"
    tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the generated manifest and print its path")
    parser.add_argument("--mixed", action="store_true", help="jobs mix five models (each job's own model:)")
    parser.add_argument("--compare", metavar="REV", help="also measure git revision REV, alternating runs")
    parser.add_argument("--phases", action="store_true", help="split one load into its phases, per tree")
    parser.add_argument("--command", choices=("validate", "plan"), default="validate", help="the command timed")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    manifest = tmp / "big.yaml"
    (write_mixed_manifest if args.mixed else write_manifest)(manifest, args.jobs)
    size_mb = manifest.stat().st_size / 2**20
    mixed = " (five models mixed)" if args.mixed else ""
    print(f"batchrun {args.command}; manifest: {args.jobs:,} jobs{mixed}, {size_mb:.1f} MiB "
          f"({manifest if args.keep else 'temporary'})")
    trees = {"this tree": REPO}
    if args.compare:
        trees = {args.compare: export_rev(args.compare, tmp), **trees}
    figures: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in trees}
    try:
        for run in range(1, args.runs + 1):
            # Alternate which tree goes first, so a burst of load elsewhere does not always hit the same one.
            order = list(trees.items()) if run % 2 else list(reversed(trees.items()))
            for name, tree in order:
                wall, peak = run_once(tree, manifest, args.jobs, args.command)
                figures[name][0].append(wall)
                figures[name][1].append(peak)
                print(f"run {run}, {name}: wall {wall:.2f} s, peak RSS {peak:.0f} MB", flush=True)
        if args.phases:
            for name, tree in trees.items():
                print(f"phases, {name}: {phases(tree, manifest)}", flush=True)
    finally:
        if args.keep:
            for name in trees:
                if trees[name] != REPO:
                    shutil.rmtree(trees[name])
        else:
            shutil.rmtree(tmp)
    medians = {name: (statistics.median(w), statistics.median(p)) for name, (w, p) in figures.items()}
    for name, (wall, peak) in medians.items():
        print(f"median of {args.runs}, {name}: wall {wall:.2f} s, peak RSS {peak:.0f} MB")
    wall, peak = medians["this tree"]
    if args.compare:
        base_wall, base_peak = medians[args.compare]
        print(f"this tree / {args.compare}: wall {wall / base_wall:.2f}x, peak RSS {peak / base_peak:.2f}x")
        if args.command == "validate" and not args.mixed and args.jobs == 100_000:
            print(f"scaled to issue 13's quiet figure for main ({MAIN_QUIET_SECONDS:g} s): this tree about "
                  f"{MAIN_QUIET_SECONDS * wall / base_wall:.1f} s")
    target = TARGET_SECONDS[args.command]
    verdict = "within" if wall <= target else "OVER"
    print(f"this tree: {verdict} the target of {target:g} s (absolute; meaningful on a quiet machine only)")
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
