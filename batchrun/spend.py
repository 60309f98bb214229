"""Money: what one job counts for, and what an output dir has spent.

One rule, used everywhere money is shown (the run's closing line, `status`, `plan`, results.jsonl,
report.html) and by the budget, so the figures always agree for the same ledger:

- a job the API gave a cost for counts that cost (a failed job it charged for included);
- else a job that was sent (`submissions > 0`) and may be running or finished counts its estimate;
- a job that was never sent, or whose POSTs were all refused (`pending`), counts nothing: an intent
  that was never sent is never spent; nor does a job that failed or was cancelled without a cost.

Money of `--sandbox` runs is simulated: it is added up apart from real money and always labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_CHARGED = ("failed", "cancelled", "pending")


def job_cost(state: str, submissions: int, cost_usd: float | None,
             estimated_cost_usd: float | None) -> tuple[float | None, str | None]:
    """(USD, "api" | "estimate") that one job counts for, or (None, None) when it counts nothing."""
    if cost_usd is not None:
        return cost_usd, "api"
    if submissions > 0 and state not in NOT_CHARGED:
        return estimated_cost_usd or 0.0, "estimate"
    return None, None


@dataclass(frozen=True)
class Spend:
    """What an output dir has spent, USD: real money and the sandbox's simulated money, apart."""

    real_usd: float = 0.0
    simulated_usd: float = 0.0

    @property
    def total_usd(self) -> float:
        return self.real_usd + self.simulated_usd

    def describe(self) -> str:
        """The figure as people read it, e.g. "$1.26", "$0.84 simulated (sandbox)"."""
        if self.simulated_usd and not self.real_usd:
            return f"${self.simulated_usd:,.2f} simulated (sandbox)"
        if self.simulated_usd:
            return f"${self.real_usd:,.2f} (+ ${self.simulated_usd:,.2f} simulated in sandbox runs)"
        return f"${self.real_usd:,.2f}"


def add_up(rows) -> Spend:
    """The `Spend` of rows of (state, submissions, cost_usd, estimated_cost_usd, simulated)."""
    return _total((job_cost(state, submissions, cost, estimate)[0], is_simulated)
                  for state, submissions, cost, estimate, is_simulated in rows)


def add_up_groups(groups) -> Spend:
    """The `Spend` of jobs summed by kind: rows of (state, sent, has_cost, simulated, money), where `sent`
    is submissions > 0, `has_cost` whether the API gave the jobs' cost, and `money` the kind's sum of
    each job's cost, else its estimate, else 0 (`Ledger.spend`, `Ledger.tally`). A kind counts when
    `job_cost` counts its jobs, so the rule stays the one above."""
    return _total((job_cost(state, int(bool(sent)), money if has_cost else None, money)[0], is_simulated)
                  for state, sent, has_cost, is_simulated, money in groups)


def _total(costs) -> Spend:
    """The `Spend` of (usd or None, simulated) pairs: None is money not spent."""
    real = simulated = 0.0
    for usd, is_simulated in costs:
        if usd is None:
            continue
        if is_simulated:
            simulated += usd
        else:
            real += usd
    return Spend(real, simulated)
