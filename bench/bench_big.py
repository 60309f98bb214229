"""Benchmark: the commands of a 100,000-job output dir whose jobs are all done.

Builds the dir once with `batchrun.sandbox.donedir` (the manifest, then every job recorded through the
ledger's own API in a run's order, each video written and stat-recorded, its `<id>.json`, the media facts,
results.jsonl: the state a `--sandbox` run of every job leaves, in about a minute instead of hours), then
runs each command `--runs` times in a fresh process and prints each run's wall time and the child's peak
RSS (`ru_maxrss` from `os.wait4`), then the medians and each median against the baseline's.

    python bench/bench_big.py [--jobs 100000] [--runs 3] [--dir DIR] [--with-report]

`--dir DIR` keeps the built dir there and reuses it on the next call (building 100,000 jobs takes 1-3
minutes); without it a temporary dir is used and removed.

The baseline, measured in the same run, is the floor of any command that must read both the manifest and
the ledger: a fresh interpreter that imports `batchrun.cli`, reads the manifest's bytes and fetches every
row of the ledger's `jobs` table with plain sqlite3, and does nothing with them. A command's ratio to it
is what batchrun adds on top of starting up and reading its two inputs.

After the no-op runs it says whether results.jsonl and a sample `<id>.json` kept their inode and mtime
(a no-op re-run must rewrite neither).

Each command that takes the manifest runs twice per round: "(cold)" with the validated-manifest cache off
(`BATCHRUN_MANIFEST_CACHE=off`: a first run, or a changed manifest), and without the mark with the cache
`validate` refreshed just before (the manifest unchanged since its last load). `validate` always checks in
full; its figure is taken with the cache off, and "validate + cache write" shows what writing it adds.

The "-val us/job" columns are, for the cold commands (which load the manifest as `validate` does), their
median wall time (then CPU time, user + system) minus validate's, per job: what reading the ledger and
checking the done files costs. CPU time is the steadier figure on a machine doing other work.

Targets (issue 13): no-op re-run <= 5 s and <= 250 MB; plan <= 5 s; status MANIFEST <= 2 s; validate <= 4 s.
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

BASELINE = """
import sqlite3, sys
import batchrun.cli
data = open(sys.argv[1], 'rb').read()
conn = sqlite3.connect(f"file:{sys.argv[2]}?mode=ro", uri=True)
rows = conn.execute("SELECT * FROM jobs").fetchall()
print(len(data), len(rows))
"""

# name -> (argv after the interpreter, target seconds or None, target MB or None, validated-manifest cache on)
# "cold" commands run with the cache off (BATCHRUN_MANIFEST_CACHE=off): they parse and validate the manifest
# as a first run or a changed manifest does. The others find it in the cache that `validate` (run just
# before them in each round, with the cache on) wrote. `validate` itself always checks in full: "validate"
# is the cold figure (cache off), "validate + cache write" what writing the cache adds.
COMMANDS = {
    "baseline": (["-c", BASELINE, "m.yaml", "out/ledger.sqlite"], None, None, False),
    "validate": (["-m", "batchrun", "validate", "m.yaml"], 4.0, None, False),
    "validate + cache write": (["-m", "batchrun", "validate", "m.yaml"], None, None, True),
    "plan (cold)": (["-m", "batchrun", "plan", "m.yaml", "--no-balance-check"], 5.0, None, False),
    "plan": (["-m", "batchrun", "plan", "m.yaml", "--no-balance-check"], 5.0, None, True),
    "status MANIFEST (cold)": (["-m", "batchrun", "status", "m.yaml"], 2.0, None, False),
    "status MANIFEST": (["-m", "batchrun", "status", "m.yaml"], 2.0, None, True),
    "export": (["-m", "batchrun", "export", "out"], None, None, True),
    "no-op re-run (cold)": (["-m", "batchrun", "run", "--sandbox", "m.yaml", "--no-progress", "--quiet"], 5.0,
                            250.0, False),
    "no-op re-run": (["-m", "batchrun", "run", "--sandbox", "m.yaml", "--no-progress", "--quiet"], 5.0, 250.0,
                     True),
}
REPORT = (["-m", "batchrun", "report", "out"], None, None, True)
# Commands that load and validate the manifest as `validate` does, then read the ledger: their time minus
# validate's is what reading the ledger and checking the done files costs ("-val us/job").
AFTER_LOAD = ("plan (cold)", "status MANIFEST (cold)", "no-op re-run (cold)")


def _maxrss_mb(rusage) -> float:
    return rusage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def run_once(argv: list[str], folder: Path, env: dict) -> tuple[float, float, int, float]:
    """(wall s, peak RSS MB, exit code, CPU s: user + system, which other work on the machine sways less)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *argv], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    _, status, rusage = os.wait4(child.pid, 0)
    return (time.perf_counter() - start, _maxrss_mb(rusage), os.waitstatus_to_exitcode(status),
            rusage.ru_utime + rusage.ru_stime)


BUILD = """
import sys
from pathlib import Path
from batchrun.sandbox.donedir import fill, write_manifest
fill(write_manifest(Path(sys.argv[1]), int(sys.argv[2])))
"""


def build(folder: Path, jobs: int, env: dict) -> None:
    """In a child process: this one stays small, since a child's peak RSS counts the parent it forked from."""
    if (folder / "out" / "ledger.sqlite").exists():
        print(f"reusing {folder} (built earlier)")
        return
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", BUILD, str(folder / "m.yaml"), str(jobs)], env=env, check=True)
    print(f"built {jobs} done jobs in {folder} in {time.perf_counter() - start:.1f} s")


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="build (or reuse) the output dir here and keep it")
    parser.add_argument("--with-report", action="store_true", help="also time `batchrun report` (slow)")
    args = parser.parse_args(argv)
    folder = args.dir.absolute() if args.dir else Path(tempfile.mkdtemp(prefix="bench_big_"))
    state = Path(tempfile.mkdtemp(prefix="bench_big_state_"))
    # No token: nothing here may reach the network (plan skips the balance call too).
    env = {**{k: v for k, v in os.environ.items() if k != "RUNCOMFY_API_TOKEN"}, "PYTHONPATH": str(REPO),
           "XDG_STATE_HOME": str(state), "HOME": str(state), "XDG_CACHE_HOME": str(state / "cache")}
    env.pop("BATCHRUN_MANIFEST_CACHE", None)
    cold = {**env, "BATCHRUN_MANIFEST_CACHE": "off"}
    commands = dict(COMMANDS)
    if args.with_report:
        commands["report"] = REPORT
    try:
        build(folder, args.jobs, env)
        out = folder / "out"
        sample = sorted(out.glob("*.json"))[0]
        before = _stamp(out / "results.jsonl"), _stamp(sample)
        results: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name in commands}
        for run in range(1, args.runs + 1):
            for name, (child_argv, _, _, cached) in commands.items():  # interleaved: drift hits all alike
                wall, rss, code, cpu = run_once(child_argv, folder, env if cached else cold)
                results[name].append((wall, rss, code, cpu))
                print(f"run {run} {name:<22} {wall:7.2f} s {rss:7.0f} MB exit {code} cpu {cpu:6.2f} s", flush=True)
        after = _stamp(out / "results.jsonl"), _stamp(sample)
        base = statistics.median(w for w, _, _, _ in results["baseline"])
        print(f"\n{args.jobs} done jobs, medians of {args.runs} (baseline: import batchrun.cli + read manifest "
              "bytes + fetch the ledger's jobs rows)")
        # What a command costs once the manifest is loaded: its time minus validate's, per job (wall; CPU).
        validate = statistics.median(w for w, _, _, _ in results["validate"])
        validate_cpu = statistics.median(c for _, _, _, c in results["validate"])
        print(f"{'command':<22} {'wall s':>7} {'x base':>7} {'RSS MB':>7} {'CPU s':>6} {'-val us/job':>11}"
              f" {'CPU':>5}  target")
        for name, (_, target_s, target_mb, _) in commands.items():
            wall = statistics.median(w for w, _, _, _ in results[name])
            rss = statistics.median(r for _, r, _, _ in results[name])
            cpu = statistics.median(c for _, _, _, c in results[name])
            codes = sorted({c for _, _, c, _ in results[name]})
            target = ", ".join(t for t in (f"<= {target_s:g} s" if target_s else "",
                                           f"<= {target_mb:g} MB" if target_mb else "") if t)
            met = "" if not target else (" met" if (not target_s or wall <= target_s)
                                         and (not target_mb or rss <= target_mb) else " NOT met")
            per_job = (f"{(wall - validate) / args.jobs * 1e6:11.1f} {(cpu - validate_cpu) / args.jobs * 1e6:5.1f}"
                       if name in AFTER_LOAD else " " * 17)
            print(f"{name:<22} {wall:7.2f} {wall / base:7.2f} {rss:7.0f} {cpu:6.2f} {per_job}  {target}{met}"
                  + (f"  exit codes {codes}" if codes != [0] else ""))
        print(f"no-op re-runs left results.jsonl {'unchanged' if after[0] == before[0] else 'REWRITTEN'} and "
              f"{sample.name} {'unchanged' if after[1] == before[1] else 'REWRITTEN'} (inode, mtime)")
    finally:
        shutil.rmtree(state, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
