"""`batchrun plan --jobs`: one line per job the manifest makes (after `matrix:` and `takes:` expansion),
with its model, seconds, audio, estimate and what a run will do with it, and how many of the jobs to
submit fit the budget left.

Shapes: `job_list` returns a list of dicts {id, model, seconds, audio, estimated_cost_usd, action, fits};
`seconds` is seconds of output (0 for a model without a duration field), `audio` True/False or None when the
model has no audio field, `estimated_cost_usd` USD or None (price unknown), `fits` True/False for a job to
submit when there is a budget, else None. Costs come from the model's price (`Manifest.estimate_or_none`).
"""

from __future__ import annotations

from typing import Any, TextIO

from batchrun.balance import jobs_covered
from batchrun.manifest import Manifest


def _actions(plan) -> dict[str, str]:
    """What a run does with each job id, in the words of the plan's summary."""
    action: dict[str, str] = {}
    for job in plan.submit:
        action[job.id] = "submit"
    for job, _ in plan.recheck:
        action[job.id] = "ask again, then submit if lost"
    for job, _ in plan.poll:
        action[job.id] = "resume"
    for job, _ in plan.collect:
        action[job.id] = "download again"
    for job in plan.skip:
        action[job.id] = "done"
    for job, _ in plan.held:
        action[job.id] = "held"
    for job, _ in plan.refused:
        action[job.id] = "refused"
    return action


def _audio(manifest: Manifest, job) -> bool | None:
    model = manifest.model_of(job)
    field = model.price.audio_field
    if field is None:
        return None
    return bool(job.input.get(field, model.default(field))) != model.price.audio_inverted


def job_list(manifest: Manifest, plan, budget_left_usd: float | None) -> tuple[list[dict[str, Any]], int | None]:
    """(the jobs, in manifest order, as described in the module docstring; how many of the jobs to submit
    fit `budget_left_usd`, taken in order as the budget check does, or None without a budget or when a
    price is unknown)."""
    action = _actions(plan)
    submit_ids = [job.id for job in plan.submit]
    estimates = {job.id: manifest.estimate_or_none(job) for job in manifest.jobs}
    fitting: int | None = None
    if budget_left_usd is not None and all(estimates.get(i) is not None for i in submit_ids):
        fitting = jobs_covered(max(budget_left_usd, 0.0), [estimates[i] for i in submit_ids])
    fits = {job_id: n < fitting for n, job_id in enumerate(submit_ids)} if fitting is not None else {}
    rows = [{"id": job.id, "model": manifest.model_of(job).model_id,
             "seconds": manifest.model_of(job).video_seconds(job.input), "audio": _audio(manifest, job),
             "estimated_cost_usd": estimates[job.id], "action": action.get(job.id, ""),
             "fits": fits.get(job.id)} for job in manifest.jobs]
    return rows, fitting


def print_jobs(rows: list[dict[str, Any]], fitting: int | None, to_submit: int, budget_left_usd: float | None,
               out: TextIO) -> None:
    """The `--jobs` table under the plan's summary."""
    def cost(value: float | None) -> str:
        return "unknown" if value is None else f"${value:.2f}"

    def audio(value: bool | None) -> str:
        return "-" if value is None else ("yes" if value else "no")

    table = [("id", "model", "seconds", "audio", "estimate", "run will")]
    for row in rows:
        will = row["action"] + (" (over budget)" if row["fits"] is False else "")
        table.append((row["id"], row["model"], f"{row['seconds']:g}", audio(row["audio"]),
                      cost(row["estimated_cost_usd"]), will))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    print(f"jobs ({len(rows)}):", file=out)
    for line in table:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip(), file=out)
    if budget_left_usd is not None and to_submit:
        if fitting is None:
            print(f"budget: cannot tell how many of the {to_submit} to submit fit the ${budget_left_usd:.2f} left "
                  "(some price is unknown)", file=out)
        else:
            print(f"budget: {fitting} of the {to_submit} job{'s' * (to_submit != 1)} to submit fit the "
                  f"${max(budget_left_usd, 0.0):.2f} left, taken in order at their estimates", file=out)
