"""What a run will do with each job, decided from the ledger before anything is sent, and
`batchrun plan`: that decision and its cost shown without sending or writing anything."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from batchrun import filecheck, gcpause, settled, takes
from batchrun.errors import LedgerError
from batchrun.ledger import LEDGER_NAME, JobRow, Ledger
from batchrun.manifest import Job, Manifest
from batchrun.owners import FileOwners
from batchrun.results import ProvenanceStat, provenance_check
from batchrun.spend import Spend

if TYPE_CHECKING:  # balance brings aiohttp, which `plan --no-balance-check` and `status` never use
    from batchrun.balance import Balance

log = logging.getLogger("batchrun.run")


@dataclass(frozen=True)
class RunOptions:
    retry_failed: bool = False
    resubmit_unknown: bool = False
    download_concurrency: int = 4
    preflight: bool = True  # check image URLs before paying for jobs that would fail
    preflight_ssl: object = None  # aiohttp's `ssl` for preflight (tests trust their own CA)
    # Which addresses output downloads may reach: an `outputhosts.HostPolicy`, or None to decide from the
    # API base URL (public API: public addresses only; API on loopback/private network: any address).
    # Tests serving on loopback pass a policy that treats their server as the public internet.
    output_hosts: object = None
    new_output: bool = False  # start a new ledger in the default output dir though the manifest has one elsewhere
    # Hash every done file in full (`run --verify`); by default a file whose size, mtime and inode are as
    # recorded at download is taken as intact without reading it (see batchrun.filecheck).
    verify: bool = False


@dataclass
class Plan:
    """What a run will do with each job, decided from the ledger before anything is sent.

    `poll` and `collect` also hold ledger jobs that are not the manifest's job as written: a request
    made with a job's previous input, or for a job no longer in the manifest. They are rebuilt from the
    ledger row (`ledger_job`), so they are collected with the input they were made with; `previous`
    names them, with why.
    """

    submit: list[Job] = field(default_factory=list)
    poll: list[tuple[Job, JobRow]] = field(default_factory=list)  # accepted remotely, not finished
    collect: list[tuple[Job, JobRow]] = field(default_factory=list)  # finished remotely or files damaged
    # --retry-failed jobs with a request id: asked first, submitted again only if it is unknown or failed
    recheck: list[tuple[Job, JobRow]] = field(default_factory=list)
    skip: list[Job] = field(default_factory=list)  # done and verified
    held: list[tuple[Job, str]] = field(default_factory=list)  # not touched, with the reason
    refused: list[tuple[Job, str]] = field(default_factory=list)  # input changed after submission, or
    # its file names are another ledger job's
    previous: dict[str, tuple[JobRow, str]] = field(default_factory=dict)  # id -> (row, PREVIOUS_INPUT | GONE)
    gone: list[JobRow] = field(default_factory=list)  # ledger jobs the manifest no longer lists
    new: list[Job] = field(default_factory=list)  # manifest jobs never sent (not in the ledger, or pending)
    provenance: list[JobRow] = field(default_factory=list)  # done jobs whose <id>.json is missing or damaged
    provenance_failed: list[str] = field(default_factory=list)  # of those, ids whose file the run could not write
    # (job id, output idx, mtime_ns, inode) of done files hashed and found intact whose recorded stat was
    # absent or stale: a run records them, so the next check of each is a stat
    restat: list[tuple[str, int, int, int]] = field(default_factory=list)
    # The ledger rows `decide` kept, by id: every row but those of done jobs settled as the manifest asks
    # them (files intact), which a re-run of a large finished batch does not hold in memory.
    unsettled: dict[str, JobRow] = field(default_factory=dict, repr=False)
    # (job id, identity, bytes, mtime_ns, inode) of `<id>.json` files read and found intact whose stat was not
    # recorded: a run records them, so the next check of each is a stat (results.provenance_check)
    provenance_restat: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    # The ledger's `provenance_stats` of the rows kept in `unsettled` (what `_check_provenance` compares with).
    provenance_known: dict[str, ProvenanceStat] = field(default_factory=dict, repr=False)


PREVIOUS_INPUT = "made with its previous input"
GONE = "no longer in the manifest"
COLLECTABLE = ("queued", "running", "downloading", "done")  # states whose request a run still collects


def outputs_intact(output_dir: Path, row: JobRow, kind: str | None = None, *, full: bool = False,
                   restat: list[tuple[str, int, int, int]] | None = None) -> bool:
    """Every recorded output of a done job is on disk with its recorded size and sha256, and is media of
    `kind` (None: any media), so an error page accepted by an older batchrun is fetched again.

    A file whose size, mtime and inode are as recorded at download is taken as intact without reading it
    unless `full` (see batchrun.filecheck); files hashed and found intact with another stat are appended
    to `restat` as (job id, idx, mtime_ns, inode), when given."""
    intact, found = filecheck.check_outputs(output_dir, row.outputs, kind, full=full)
    if restat is not None:
        restat.extend((row.id, *r) for r in found)
    return intact


def ledger_job(row: JobRow) -> Job:
    """A job as the ledger recorded it: what a request was made with, whatever the manifest says now."""
    return Job(index=-1, id=row.id, input=row.input, input_sha256=row.input_sha256, line=0, file=LEDGER_NAME)


def refusal(job: Job, row: JobRow) -> str | None:
    """Why `job` is not run as written, or None. Only a job that may exist remotely is refused: one whose
    POSTs all certainly created nothing (refused with 429, rejected as invalid) simply runs with its
    new input."""
    if row.input_sha256 == job.input_sha256 or not (row.request_id or row.state in ("submitting", "unknown")):
        return None
    made = f"request {row.request_id}" if row.request_id else "a POST that may have created a job"
    if row.request_id and row.state in COLLECTABLE:
        kept = "the render of its previous input is collected and kept under this id"
    else:
        kept = f"the ledger keeps the job as it was submitted ({row.state})"
    return (f"{job.label}: its input changed after it was submitted ({made}); {kept}; "
            "to run the new input give the job a new id, or restore the old input")


def make_plan(manifest: Manifest, ledger: Ledger, options: RunOptions) -> Plan:
    """Record what a run starts from (new jobs `pending`, interrupted submits `unknown`, refusals), then decide.

    The bookkeeping reads the states the ledger keeps in memory and two small queries; `decide` then
    reads the ledger's rows once, streamed, and keeps only those still to act on (see `decide`)."""
    takes.with_rerolls(manifest, ledger.rerolls())
    states = ledger.states()
    for job_id, state in states.items():
        if state == "submitting":  # a run died between the intent and the POST's answer
            ledger.set_state(job_id, "unknown", error=("unknown", "the run stopped while this job was being "
                                                       "submitted; the POST may have created a job"))
    new = [job for job in manifest.jobs if states.get(job.id, "pending") == "pending"]
    if new:
        ledger.add_pending(
            (job.id, manifest.model_of(job).model_id, job.input, job.input_sha256, manifest.estimate_or_none(job))
            for job in new)
    taking = [job for job in manifest.jobs if job.take > 1]
    if taking:
        told = ledger.ids_with_take()
        untold = {job.id: (job.take, job.take_of) for job in taking if job.id not in told}
        if untold:
            ledger.record_takes(untold)
    with gcpause.paused():
        plan = decide(manifest, ledger, options)
    # Stats of files only: nothing results.jsonl shows (the ledger's change count does not move).
    ledger.record_file_stats(plan.restat)
    ledger.record_provenance_stats(plan.provenance_restat)
    ledger.set_refusals({job.id: why for job, why in plan.refused})
    for job in plan.submit:
        row = plan.unsettled.get(job.id)
        if row is not None and row.input_sha256 != job.input_sha256:
            ledger.update_input(job.id, job.input, job.input_sha256, manifest.estimate_or_none(job))
    return plan


def decide(manifest: Manifest, ledger: Ledger | None, options: RunOptions) -> Plan:
    """What each manifest job needs, given the ledger (None: nothing has run here), and which paid requests
    of other inputs or removed jobs are still to collect. Reads files (to verify), writes nothing.

    Linear in ledger and manifest size, and light: done jobs the manifest asks for as they were made, whose
    files are as recorded, are told apart from a short tuple per job (batchrun.settled) and skipped
    without building their rows; only the other rows are read in full and kept (`Plan.unsettled`), so a
    re-run of 100,000 done jobs holds the manifest and not the ledger too."""
    plan = Plan()
    output_dir = manifest.output_dir
    by_id = {job.id: job for job in manifest.jobs}
    owners = FileOwners(())
    settled_ids: set[str] = set()
    intact: dict[str, bool] = {}  # done rows kept: whether their outputs are intact (read once, here)
    if ledger is not None:
        with ledger.snapshot():  # the sweep and the rows read after it see the same ledger
            found = settled.sweep(ledger, output_dir, by_id, full=options.verify)
            settled_ids = found.settled
            for row, known in ledger.rows_of(found.unsettled):
                job = by_id.get(row.id)
                if (row.state == "pending" and row.submissions == 0 and job is not None
                        and job.input_sha256 == row.input_sha256):
                    # Never sent, asked for as recorded: decided exactly as a job the ledger does not hold,
                    # so its row is not kept (a first run of 100,000 jobs held 150 MB of them).
                    continue
                if row.state == "done":
                    as_asked = job is not None and (job.input_sha256 == row.input_sha256 or refusal(job, row) is None)
                    kind = manifest.model_of(job).output_kind if as_asked else None
                    intact[row.id] = outputs_intact(output_dir, row, kind, full=options.verify, restat=plan.restat)
                    if as_asked and intact[row.id] and job.input_sha256 == row.input_sha256:
                        ok, stat_found = provenance_check(output_dir, row, known, full=options.verify)
                        if ok:
                            if stat_found is not None:
                                plan.provenance_restat.append((row.id, *stat_found))
                            settled_ids.add(row.id)
                            del intact[row.id]
                            continue
                plan.unsettled[row.id] = row
                if known is not None:
                    plan.provenance_known[row.id] = known
            # Which names ledger jobs own matters only to a job not sent yet (read only if there is one).
            if any(job.id not in settled_ids and ((row := plan.unsettled.get(job.id)) is None or
                                                  (row.state == "pending" and row.submissions == 0))
                   for job in manifest.jobs):
                owners = FileOwners.of_ids(ledger.owner_ids())
    kept = plan.unsettled
    resubmit_unknown = options.resubmit_unknown or manifest.settings.resubmit_unknown
    listed: set[str] = set()
    for job in manifest.jobs:
        listed.add(job.id)
        if job.id in settled_ids:
            plan.skip.append(job)
            continue
        row = kept.get(job.id)
        if row is None or (row.state == "pending" and row.submissions == 0):
            # A job not yet sent owns no file names: it may not take any that a sent one owns.
            clash = owners.clash(job.id)
            if clash:
                plan.refused.append((job, f"{job.label}: {clash}"))
            else:
                plan.new.append(job)
                plan.submit.append(job)
            continue
        why = refusal(job, row)
        if why is not None:
            plan.refused.append((job, why))
            _keep(output_dir, plan, row, PREVIOUS_INPUT, options, intact)
            continue
        state = "unknown" if row.state == "submitting" else row.state
        if state == "pending":
            plan.submit.append(job)
        elif state in ("queued", "running"):
            plan.poll.append((job, row))
        elif state == "downloading":
            plan.collect.append((job, row))
        elif state == "done":
            if intact[row.id]:
                plan.skip.append(job)
                _check_provenance(output_dir, plan, row, options)
            else:
                log.info("%s: a file is missing or damaged; downloading it again", job.id)
                plan.collect.append((job, row))
        elif state == "unknown":
            if resubmit_unknown:
                plan.submit.append(job)
            else:
                plan.held.append((job, "unknown: its POST may have created a job; check your RunComfy "
                                       "dashboard: if it did (a run that could not record it names its request "
                                       f"id in run.log), 'batchrun adopt MANIFEST {job.id} REQUEST_ID' collects "
                                       "it; if not, use --resubmit-unknown to send it again"))
        elif state == "failed" and row.submissions == 0 and not row.request_id:
            plan.submit.append(job)  # it never reached the server (a local image changed, say): nothing was paid
        elif state in ("failed", "cancelled"):
            if options.retry_failed and row.request_id:
                plan.recheck.append((job, row))
            elif options.retry_failed:
                plan.submit.append(job)
            else:
                plan.held.append((job, f"{state}: use --retry-failed to submit it again"))
    for row in kept.values():
        if row.id not in listed:
            plan.gone.append(row)
            _keep(output_dir, plan, row, GONE, options, intact)
    return plan


def _keep(output_dir: Path, plan: Plan, row: JobRow, why: str, options: RunOptions, intact: dict[str, bool]) -> None:
    """A request that is not the manifest's job as written is still collected if it was paid for:
    polled while in flight, downloaded, and downloaded again if its files are damaged."""
    if not row.request_id or row.state not in COLLECTABLE:
        return  # nothing to collect: never sent, finished without a render, or its request id is unknown
    job = ledger_job(row)
    if row.state in ("queued", "running"):
        plan.poll.append((job, row))
    elif row.state == "downloading" or not intact[row.id]:
        plan.collect.append((job, row))
    else:
        _check_provenance(output_dir, plan, row, options)
        return
    plan.previous[row.id] = (row, why)


def _check_provenance(output_dir: Path, plan: Plan, row: JobRow, options: RunOptions) -> None:
    """A done job's `<id>.json`: to rewrite when missing or damaged, its stat to record when read intact."""
    intact, found = provenance_check(output_dir, row, plan.provenance_known.get(row.id), full=options.verify)
    if not intact:
        plan.provenance.append(row)
    elif found is not None:
        plan.provenance_restat.append((row.id, *found))


def compute(manifest: Manifest, options: RunOptions = RunOptions()) -> tuple[Plan, Spend]:
    """The plan and the money already committed in this output dir (none when nothing has run)."""
    if not (manifest.output_dir / LEDGER_NAME).exists():
        return decide(manifest, None, options), Spend()
    ledger = Ledger.open(manifest.output_dir, create=False, readonly=True)
    try:
        takes.with_rerolls(manifest, ledger.rerolls())
        with gcpause.paused():
            return decide(manifest, ledger, options), ledger.spend()
    finally:
        ledger.close()


def summary(manifest: Manifest, plan: Plan, spend: Spend) -> dict:
    # A job to recheck may be submitted again: counted as if it will be.
    may_submit = plan.submit + [job for job, _ in plan.recheck]
    seconds = sum(manifest.model_of(job).video_seconds(job.input) for job in may_submit)
    estimates = [manifest.estimate_or_none(job) for job in may_submit]
    unpriced = sum(1 for e in estimates if e is None)
    estimate = round(sum(e for e in estimates if e is not None), 4)
    budget = manifest.settings.budget_usd
    spent = spend.total_usd
    return {
        "manifest": str(manifest.path),
        "output": str(manifest.output_dir),
        "model": manifest.model.model_id,
        "jobs": len(manifest.jobs),
        "submit": len(plan.submit),
        "recheck": len(plan.recheck),
        "resume": len(plan.poll),
        "download": len(plan.collect),
        "skip": len(plan.skip),
        "held": [{"id": job.id, "reason": why} for job, why in plan.held],
        "refused": [{"id": job.id, "reason": why} for job, why in plan.refused],
        # Paid requests collected though they are not the manifest's job as written.
        "collect_previous": [{"id": job_id, "state": row.state, "request_id": row.request_id, "why": why}
                             for job_id, (row, why) in plan.previous.items()],
        # Listed once something has run here: on a first run every job is new.
        "new": [job.id for job in plan.new] if plan.gone or len(plan.new) < len(manifest.jobs) else [],
        "no_longer_in_manifest": [{"id": row.id, "state": row.state} for row in plan.gone],
        "provenance_to_rewrite": [f"{row.id}.json" for row in plan.provenance],
        "video_seconds": seconds,
        "estimated_cost_usd": None if unpriced else estimate,  # None: some job's price is unknown
        "unpriced_jobs": unpriced,
        "price": manifest.price.describe(),
        "models": _per_model(manifest, may_submit),
        "spent_usd": round(spent, 4),
        "simulated_usd": round(spend.simulated_usd, 4),
        "spent": spend.describe(),
        "budget_usd": budget,
        "budget_left_usd": None if budget is None else round(budget - spent, 4),
        "over_budget": budget is not None and spent + estimate > budget + 1e-9,
        # Absolute, so a path that climbs out of the manifest's folder with .. is plain to see.
        "local_files": sorted({str(path) for job in plan.submit for path in job.local_files.values()}),
    }


def _print_changes(info: dict, out: TextIO, limit: int = 20) -> None:
    """Jobs that are new beside those no longer in the manifest (a job without an id whose input changed
    is both: its id is derived from its input), and the paid requests of either still to collect."""
    if info["new"]:
        print(f"  new ({len(info['new'])}): {', '.join(info['new'][:limit])}"
              f"{' ...' if len(info['new']) > limit else ''}", file=out)
    gone = info["no_longer_in_manifest"]
    if gone:
        shown = ", ".join(f"{item['id']} ({item['state']})" for item in gone[:limit])
        print(f"  no longer in the manifest ({len(gone)}, kept in the ledger): {shown}"
              f"{' ...' if len(gone) > limit else ''}", file=out)
    for item in info["collect_previous"][:limit]:
        print(f"  to collect: {item['id']}, {item['why']} (request {item['request_id']}, {item['state']})", file=out)
    if info["provenance_to_rewrite"]:
        print(f"  provenance files to rewrite (missing or damaged): {', '.join(info['provenance_to_rewrite'][:limit])}",
              file=out)


def balance_summary(manifest: Manifest, plan: Plan, balance: Balance) -> dict:
    """The balance and how many of the jobs to submit it covers, for `plan` (and its --json)."""
    from batchrun.balance import judge

    in_flight = sum(row.cost_usd if row.cost_usd is not None else manifest.estimate_cost(job)
                    for job, row in plan.poll)
    verdict = judge(balance, [manifest.estimate_cost(job) for job in plan.submit], in_flight,
                    manifest.settings.budget_usd)
    return {"balance_usd": balance.usd, "balance_covers": verdict.covered, "balance_error": balance.error}


def show_plan(manifest: Manifest, out: TextIO, *, as_json: bool = False,
              balance: Callable[[], Balance] | None = None, jobs: bool = False) -> int:
    """Print the plan; `balance`, when given, is asked once for the account's balance (see balance.py);
    `jobs` adds one line per job (`planjobs`; key "job_list" and "jobs_fitting_budget" in JSON)."""
    try:
        plan, spent = compute(manifest)
    except LedgerError as exc:
        print(f"batchrun: {exc}", file=out)
        return 2
    info = summary(manifest, plan, spent)
    if balance is not None:
        info.update(balance_summary(manifest, plan, balance()))
    if jobs:
        from batchrun.planjobs import job_list

        info["job_list"], info["jobs_fitting_budget"] = job_list(manifest, plan, info["budget_left_usd"])
    if as_json:
        print(json.dumps(info, indent=2), file=out)
        return 0
    rows = [
        ("jobs in manifest", str(info["jobs"])),
        ("to submit", str(info["submit"])),
        ("to ask again, then submit if lost", str(info["recheck"])),
        ("to resume (in flight)", str(info["resume"])),
        ("to download again", str(info["download"])),
        ("already done", str(info["skip"])),
        ("held", str(len(info["held"]))),
        ("refused", str(len(info["refused"]))),
        ("video seconds to submit", f"{info['video_seconds']:g}"),
        ("estimated cost to submit", _cost_text(info)),
        ("spent in this output dir", info["spent"]),
        ("budget", "none" if info["budget_usd"] is None else f"${info['budget_usd']:.2f}"),
    ]
    if info["budget_left_usd"] is not None:
        rows.append(("budget left", f"${info['budget_left_usd']:.2f}"))
    if "balance_usd" in info:
        rows.append(("balance", f"not checked: {info['balance_error']}" if info["balance_usd"] is None else
                     f"${info['balance_usd']:.2f}, covers {info['balance_covers']} of {info['submit']} "
                     f"job{'s' * (info['submit'] != 1)} to "
                     "submit at their estimates"))
    if len(info["models"]) > 1:
        for model_id, each in info["models"].items():
            rows.append((f"  {model_id}", f"{each['jobs']} job{'s' * (each['jobs'] != 1)}, {each['submit']} to submit, "
                                          + _cost_text(each)))
    width = max(len(label) for label, _ in rows)
    models = info["model"] if len(info["models"]) <= 1 else f"{len(info['models'])} models"
    print(f"plan for {info['manifest']} ({models}) into {info['output']}", file=out)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}", file=out)
    if info["local_files"]:
        print(f"  local image files sent inline ({len(info['local_files'])}):", file=out)
        for path in info["local_files"][:20]:
            print(f"    {path}", file=out)
        if len(info["local_files"]) > 20:
            print(f"    ... and {len(info['local_files']) - 20} more (see --json)", file=out)
    for item in info["held"][:20] + info["refused"][:20]:
        print(f"  {item['id']}: {item['reason']}", file=out)
    _print_changes(info, out)
    if info["over_budget"]:
        print("  the budget does not cover every job: the run will stop submitting when it is reached", file=out)
    if jobs:
        from batchrun.planjobs import print_jobs

        print_jobs(info["job_list"], info["jobs_fitting_budget"], info["submit"], info["budget_left_usd"], out)
    return 0


def _cost_text(info: dict) -> str:
    if info["estimated_cost_usd"] is not None:
        return f"${info['estimated_cost_usd']:.2f}"
    models = info.get("models") or {}
    if len(models) > 1:  # a bake-off: the per-model lines below say which
        return f"unknown: {info['unpriced_jobs']} job(s) cannot be estimated (see the models below)"
    return (f"unknown: no price known for {info['unpriced_jobs']} job(s) ({info['price']}; give 'price:' in the "
            "manifest)")


def _per_model(manifest: Manifest, may_submit: list) -> dict[str, dict]:
    """Per model id, in the manifest's order: jobs, jobs to submit, their estimated cost (None: unknown)."""
    models: dict[str, dict] = {}
    for job in manifest.jobs:
        model = manifest.model_of(job)
        each = models.get(model.model_id)
        if each is None:  # described once per model, not once per job
            each = models[model.model_id] = {"jobs": 0, "submit": 0, "estimated_cost_usd": 0.0, "unpriced_jobs": 0,
                                             "price": manifest.price_of(model).describe(),
                                             "output_kind": model.output_kind}
        each["jobs"] += 1
    for job in may_submit:
        each = models[manifest.model_of(job).model_id]
        each["submit"] += 1
        cost = manifest.estimate_or_none(job)
        if cost is None:
            each["unpriced_jobs"] += 1
        else:
            each["estimated_cost_usd"] += cost
    for each in models.values():
        each["estimated_cost_usd"] = None if each["unpriced_jobs"] else round(each["estimated_cost_usd"], 4)
    return models
