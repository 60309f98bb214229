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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="batchrun-soak-") as tmp:
        h = make_harness(Path(tmp), jobs=args.jobs, concurrency=4, render=0.3)
        try:
            double = 0
            while h.kills < args.kills:
                h.kill_after(rng.uniform(0.05, 1.5))
                created = h.jobs_created()
                # No run in this loop is told to resubmit, so any job created twice is a double payment.
                double = max(double, sum(n - 1 for n in created.values() if n > 1))
            unknown = h.unknown_jobs()
            final = h.run("--resubmit-unknown")
            created = h.check_final(unknown)
            lost = sum(1 for job_id, row in h.ledger_rows().items() if row["state"] != "done")
            print(f"seed {args.seed}: {h.kills} kills, {len(h.runs)} runs ended on their own, "
                  f"{len(unknown)} jobs left unknown and resubmitted on request, final exit {final}, "
                  f"double payments without a resubmit request: {double}, lost results: {lost}, "
                  f"server jobs created: {sum(created.values())} for {args.jobs} jobs, "
                  f"{time.monotonic() - start:.0f}s")
        finally:
            h.sandbox.close()


if __name__ == "__main__":
    main()
