"""One ledger per manifest whatever the current directory: `run` from elsewhere never pays again, and
`status`, `plan`, `export`, `report` find the ledger. Real subprocesses, each with its own cwd, against a
sandbox whose POST count is read from the server itself."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys

import pytest
from crash_harness import ThreadedSandbox
from helpers import IMAGE, ledger_rows
from proc_helpers import batchrun, env

from batchrun.cli import main
from batchrun.ledger_index import INDEX_NAME, LedgerIndex, state_dir
from batchrun.sandbox import Sandbox


def _manifest(folder, n: int = 3, name: str = "campaign.yaml", extra: str = ""):
    """A manifest without `output:`, as a new user writes one."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = "".join(f"  - id: shot-{i}\n    prompt: waves crash below ({i})\n" for i in range(n))
    path = folder / name
    path.write_text(f"version: 1\n{extra}poll_min_interval: 0.05\npoll_max_interval: 0.2\nrequests_per_second: 0\n"
                    f"defaults:\n  duration: 5\n  generate_audio: false\n  start_image_url: {IMAGE}\njobs:\n{jobs}")
    return path


@pytest.fixture(scope="module")
def sandbox_server():
    """A sandbox serving from a thread of this process, for batchrun subprocesses; yields (base URL, a
    function giving the POSTs it has received so far: the server's own count)."""
    server = ThreadedSandbox(render_seconds=0)
    try:
        yield server.base_url, lambda: server.read(lambda sb: sb.posts_total)
    finally:
        server.close()


def _run(manifest, cwd, base_url, *flags):
    return batchrun("run", str(manifest), "--base-url", base_url, "--no-progress", "--no-preflight", *flags,
                    cwd=cwd, RUNCOMFY_API_TOKEN="sandbox")


def test_running_from_another_directory_refuses_and_names_the_ledger(tmp_path, sandbox_server):
    base_url, posts = sandbox_server
    proj, home = tmp_path / "proj", tmp_path / "home"
    home.mkdir()
    manifest = _manifest(proj)
    before = posts()
    first = _run("campaign.yaml", proj, base_url)
    assert first.returncode == 0, first.stderr
    assert posts() == before + 3
    ledger_dir = proj / "output" / "campaign"
    assert len(ledger_rows(ledger_dir)) == 3

    # From elsewhere: refused before anything is sent or created.
    again = _run(manifest, home, base_url)
    assert again.returncode == 2, again.stderr
    assert str(ledger_dir) in again.stderr and "--new-output" in again.stderr and "Nothing was sent" in again.stderr
    assert "Traceback" not in again.stderr
    assert not (home / "output").exists()
    assert posts() == before + 3

    # Every read-only command finds the existing ledger from there, and says which dir it read.
    status = batchrun("status", str(manifest), "--json", cwd=home)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"] == {"done": 3}
    assert str(ledger_dir) in status.stderr
    plan = batchrun("plan", str(manifest), "--json", cwd=home)
    assert plan.returncode == 0, plan.stderr
    info = json.loads(plan.stdout)
    assert (info["submit"], info["skip"], info["output"]) == (0, 3, str(ledger_dir))
    assert str(ledger_dir) in plan.stderr
    dry = batchrun("run", str(manifest), "--dry-run", cwd=home)
    assert dry.returncode == 0 and "already done" in dry.stdout and str(ledger_dir) in dry.stdout
    export = batchrun("export", str(manifest), cwd=home)
    assert export.returncode == 0, export.stderr
    assert sorted(json.loads(line)["id"] for line in export.stdout.splitlines()) == ["shot-0", "shot-1", "shot-2"]
    report = batchrun("report", str(manifest), cwd=home)
    assert report.returncode == 0, report.stderr
    assert str(ledger_dir / "report.html") in report.stdout
    cancel = batchrun("cancel", str(manifest), "--base-url", base_url, cwd=home, RUNCOMFY_API_TOKEN="sandbox")
    assert cancel.returncode == 0 and str(ledger_dir) in cancel.stderr, cancel.stderr
    assert not (home / "output").exists()

    # Naming the existing dir resumes it: nothing paid again.
    resumed = _run(manifest, home, base_url, "--output", str(ledger_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "0 to submit" in resumed.stderr
    assert posts() == before + 3


def test_a_new_ledger_elsewhere_only_when_the_user_says_so(tmp_path, sandbox_server):
    base_url, posts = sandbox_server
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    elsewhere.mkdir()
    manifest = _manifest(proj, n=1)
    before = posts()
    assert _run(manifest, proj, base_url).returncode == 0
    fresh = _run(manifest, elsewhere, base_url, "--new-output")
    assert fresh.returncode == 0, fresh.stderr
    assert posts() == before + 2
    assert len(ledger_rows(elsewhere / "output" / "campaign")) == 1
    # Both are now known; a third directory is refused and told of the most recent one.
    third = tmp_path / "third"
    third.mkdir()
    refused = _run(manifest, third, base_url)
    assert refused.returncode == 2 and str(elsewhere / "output" / "campaign") in refused.stderr
    assert "and 1 more" in refused.stderr
    # Naming a dir, by flag or in the manifest, is the user's choice: no refusal.
    named = _run(manifest, third, base_url, "--output", "mine")
    assert named.returncode == 0, named.stderr
    assert (third / "mine" / "ledger.sqlite").is_file()
    assert posts() == before + 3


async def _in_process(argv: list[str], cwd, monkeypatch) -> tuple[int, str, str]:
    """`main(argv)` from `cwd`, in a worker thread so that the test's own sandbox keeps serving."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "t")
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _run_argv(manifest, sandbox, *flags: str) -> list[str]:
    return ["run", str(manifest), "--base-url", sandbox.base_url, "--no-progress", "--no-preflight", *flags]


async def test_output_in_the_manifest_is_the_users_choice_and_is_found_from_anywhere(tmp_path, monkeypatch):
    manifest = _manifest(tmp_path / "proj", n=1, extra="output: renders\n")
    async with Sandbox() as sandbox:
        assert (await _in_process(_run_argv(manifest, sandbox), tmp_path, monkeypatch))[0] == 0
        code, out, _ = await _in_process(["status", str(manifest)], tmp_path / "proj", monkeypatch)
    assert code == 0 and str(tmp_path / "proj" / "renders") in out


async def test_a_ledger_made_before_the_index_is_found_beside_the_manifest(tmp_path, monkeypatch, private_user_state):
    """Upgraded from a batchrun without the index: the usual place (run from the manifest's folder) counts."""
    proj = tmp_path / "proj"
    manifest = _manifest(proj, n=1)
    async with Sandbox() as sandbox:
        assert (await _in_process(_run_argv(manifest, sandbox), proj, monkeypatch))[0] == 0
        shutil.rmtree(private_user_state)
        code, _, err = await _in_process(_run_argv(manifest, sandbox), tmp_path, monkeypatch)
        assert sandbox.posts_total == 1
    assert code == 2 and str(proj / "output" / "campaign") in err
    assert not (tmp_path / "output").exists()


async def test_entries_whose_ledger_is_gone_are_ignored_and_pruned(tmp_path, monkeypatch, private_user_state):
    manifest = _manifest(tmp_path / "proj", n=1)
    first = tmp_path / "a"
    async with Sandbox() as sandbox:
        assert (await _in_process(_run_argv(manifest, sandbox, "--output", str(first)), tmp_path, monkeypatch))[0] == 0
        shutil.rmtree(first)
        assert LedgerIndex(private_user_state).ledgers_of(manifest) == []
        # Nothing left anywhere: a run from here is a plain first run, and the index forgets the gone one.
        code, _, err = await _in_process(_run_argv(manifest, sandbox), tmp_path, monkeypatch)
        assert code == 0, err
    index = json.loads((private_user_state / INDEX_NAME).read_text())
    assert [e["output"] for e in index["manifests"][str(manifest.resolve())]] == [str(tmp_path / "output" / "campaign")]


async def test_an_unreadable_index_is_set_aside_and_a_run_still_works(tmp_path, monkeypatch, private_user_state):
    private_user_state.mkdir(parents=True)
    (private_user_state / INDEX_NAME).write_text('{"version": 1, "manifests": {"/x": [')
    manifest = _manifest(tmp_path / "proj", n=1)
    async with Sandbox() as sandbox:
        code, _, err = await _in_process(_run_argv(manifest, sandbox), tmp_path / "proj", monkeypatch)
    assert code == 0, err
    assert "unreadable" in err and "Traceback" not in err
    assert (private_user_state / (INDEX_NAME + ".unreadable")).exists()
    assert LedgerIndex(private_user_state).ledgers_of(manifest) == [tmp_path / "proj" / "output" / "campaign"]


async def test_an_unwritable_state_dir_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    (tmp_path / "state").write_text("a file where the state dir should be")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    manifest = _manifest(tmp_path / "proj", n=1)
    async with Sandbox() as sandbox:
        code, _, err = await _in_process(_run_argv(manifest, sandbox), tmp_path / "proj", monkeypatch)
    assert code == 0, err
    assert "could not record this ledger" in err and "Traceback" not in err


def test_concurrent_runs_of_different_manifests_all_land_in_the_index(tmp_path, sandbox_server, private_user_state):
    base_url, _ = sandbox_server
    manifests = [_manifest(tmp_path / f"p{i}", n=1) for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(m), "--base-url", base_url,
                               "--no-progress", "--no-preflight"], cwd=m.parent,
                              env=env(RUNCOMFY_API_TOKEN="sandbox"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for m in manifests]
    for proc in procs:
        assert proc.wait(60) == 0, proc.stderr.read()
    index = LedgerIndex(private_user_state)
    for m in manifests:
        assert index.ledgers_of(m) == [m.parent / "output" / "campaign"]
    data = json.loads((private_user_state / INDEX_NAME).read_text())
    assert len(data["manifests"]) == 3


def test_the_index_lives_under_the_xdg_state_dir_else_under_home():
    assert state_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == state_dir({"XDG_STATE_HOME": "/s"})
    assert str(state_dir({"XDG_STATE_HOME": "/s"})) == "/s/batchrun"
    assert str(state_dir({"HOME": "/h"})) == "/h/.local/state/batchrun"
    assert str(state_dir({"XDG_STATE_HOME": "relative", "HOME": "/h"})) == "/h/.local/state/batchrun"
