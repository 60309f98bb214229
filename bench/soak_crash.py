"""Crash soak: SIGKILL a real `batchrun run` at random moments, many times, then finish the batch and
count double payments (jobs the server created twice without being told to resubmit) and lost results.

    python bench/soak_crash.py [--kills 200] [--jobs 40] [--seed N]

Target (issue: resume and run unattended): 200 random kills, zero double payments, zero lost results.
"""

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from crash_harness import make_harness  # noqa: E402


def _settled(h) -> bool:
    """Nothing left for a plain run to do: every job done, or `unknown` (held until --resubmit-unknown)."""
    return all(row["state"] in ("done", "unknown") for row in h.ledger_rows().values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = time.monotonic()
    kills = runs = unknown_total = double_total = lost_total = created_total = jobs_total = rounds = 0
    with tempfile.TemporaryDirectory(prefix="batchrun-soak-") as tmp:
        # Rounds: once a batch is settled, its runs end in about a second and most kill timers fire after the
        # run has ended, so the kills would stop counting; a new batch in a new output dir keeps them landing.
        while kills < args.kills:
            rounds += 1
            root = Path(tmp) / f"round-{rounds}"
            root.mkdir()
            h = make_harness(root, jobs=args.jobs, concurrency=4, render=0.3)
            try:
                double = 0
                while kills + h.kills < args.kills and not (h.runs and _settled(h)):
                    h.kill_after(rng.uniform(0.05, 1.5))
                    created = h.jobs_created()
                    # No run in this loop is told to resubmit, so any job created twice is a double payment.
                    double = max(double, sum(n - 1 for n in created.values() if n > 1))
                unknown = h.unknown_jobs()
                final = h.run("--resubmit-unknown")
                created = h.check_final(unknown)
                lost = sum(1 for job_id, row in h.ledger_rows().items() if row["state"] != "done")
                print(f"round {rounds}: {h.kills} kills, {len(h.runs)} runs ended on their own, {len(unknown)} jobs "
                      f"left unknown and resubmitted on request, final exit {final}, double payments without a "
                      f"resubmit request: {double}, lost results: {lost}, server jobs created: "
                      f"{sum(created.values())} for {args.jobs} jobs", flush=True)
                kills += h.kills
                runs += len(h.runs)
                unknown_total += len(unknown)
                double_total += double
                lost_total += lost
                created_total += sum(created.values())
                jobs_total += args.jobs
            finally:
                h.sandbox.close()
    print(f"seed {args.seed}: {kills} kills over {rounds} batches, {runs} runs ended on their own, "
          f"{unknown_total} jobs left unknown and resubmitted on request, double payments without a resubmit "
          f"request: {double_total}, lost results: {lost_total}, server jobs created: {created_total} for "
          f"{jobs_total} jobs, {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
