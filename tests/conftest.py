"""Fixtures shared by several test modules."""

import aiohttp
import pytest


@pytest.fixture
async def session():
    """A plain client session, as the API client and the downloader are given one."""
    async with aiohttp.ClientSession() as s:
        yield s
