"""`status` and `plan --no-balance-check` of a finished output dir do not import aiohttp (about a fifth of
a second of start-up): it is imported where a file is hashed, the balance asked or a notification sent.
Checked in a fresh interpreter, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import jobs, run, write_manifest

from batchrun.sandbox import Sandbox

PROBE = """
import io, json, sys
from batchrun.cli import main
out = io.StringIO()
code = main(sys.argv[1:], stdout=out, stderr=io.StringIO())
print(json.dumps({"code": code, "aiohttp": "aiohttp" in sys.modules, "out": out.getvalue()}))
"""


def _probe(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


async def test_status_and_plan_of_a_done_dir_do_not_import_aiohttp(tmp_path):
    manifest = write_manifest(tmp_path, jobs(2))
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    status = _probe("status", str(manifest), "--json")
    assert status["code"] == 0 and json.loads(status["out"])["counts"] == {"done": 2}
    assert not status["aiohttp"]
    plan = _probe("plan", str(manifest), "--no-balance-check")
    assert plan["code"] == 0 and "already done" in plan["out"] and not plan["aiohttp"]
    # Hashing a file (status --verify) does import it, and still finds both jobs intact.
    verify = _probe("status", str(manifest), "--json", "--verify")
    assert verify["code"] == 0 and json.loads(verify["out"])["damaged"] == [] and verify["aiohttp"]
