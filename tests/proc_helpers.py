"""Helpers for tests that run `batchrun` as a real subprocess, the way a user or cron does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict[str, str]:
    """This test's environment (its XDG_STATE_HOME included) without any RUNCOMFY_ setting, plus `extra`."""
    result = {k: v for k, v in os.environ.items() if not k.startswith("RUNCOMFY_")}
    result["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), result.get("PYTHONPATH")]))
    result.update(extra)
    return result


def batchrun(*args: str, cwd: Path, timeout: float = 60, **extra_env: str) -> subprocess.CompletedProcess:
    """`batchrun ARGS...` run from `cwd` to its end; stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "batchrun", *args], cwd=cwd, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def start(*args: str, cwd: Path, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchrun", *args], cwd=cwd, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
