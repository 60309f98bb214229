"""Fixtures shared by several test modules."""

import aiohttp
import pytest


@pytest.fixture(autouse=True)
def private_user_state(tmp_path_factory, monkeypatch):
    """Every test gets its own XDG state dir and home (batchrun's ledger index lives there), set in the
    environment so that subprocesses inherit them: no test reads or writes the real user's state."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))  # the validated-manifest cache
    monkeypatch.delenv("BATCHRUN_MANIFEST_CACHE", raising=False)
    return home / ".local" / "state" / "batchrun"


@pytest.fixture
async def session():
    """A plain client session, as the API client and the downloader are given one."""
    async with aiohttp.ClientSession() as s:
        yield s
