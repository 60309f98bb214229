"""Tests for batchrun.outputhosts: which addresses count as public, and how the API base URL is judged."""

from __future__ import annotations

import ipaddress

import pytest
from yarl import URL

from batchrun.errors import OutputUrlRefused
from batchrun.outputhosts import HostPolicy, is_private_base, is_public


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
        "100.64.0.1", "224.0.0.1", "255.255.255.255",
        "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "2002:a00:1::1",
        "::127.0.0.1", "::ffff:0:7f00:1", "fec0::1", "2001::1", "2001:db8::1", "198.18.0.1", "240.0.0.1",
    ],
)
def test_non_public_addresses(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses(address):
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("base", "private"),
    [
        ("http://127.0.0.1:8765", True),
        ("http://[::1]:8765", True),
        ("http://localhost:8765", True),
        ("http://sandbox.localhost", True),
        ("http://10.0.0.7", True),
        ("https://93.184.216.34", False),
        ("https://[2606:4700:4700::1111]", False),
        ("http://[::1", False),  # unusable: the stricter side (its own error is reported elsewhere)
    ],
)
async def test_api_base_is_judged_by_its_address(base, private):
    assert await is_private_base(base) is private


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:9/v.mp4", "127.0.0.1, a loopback address"),
        ("http://[::1]:9/v.mp4", "::1, a loopback address"),
        ("https://169.254.169.254/latest/meta-data", "169.254.169.254, a link-local address"),
        ("http://0.0.0.0/v.mp4", "0.0.0.0, an unspecified address"),
        ("http://192.168.0.10/v.mp4", "192.168.0.10, a private address"),
        ("http://[fe80::1]/v.mp4", "fe80::1, a link-local address"),
        ("file:///etc/passwd", "only http and https"),
        ("ftp://93.184.216.34/v.mp4", "only http and https"),
    ],
)
def test_policy_refuses_urls_naming_private_addresses(url, message):
    with pytest.raises(OutputUrlRefused, match=message):
        HostPolicy().check_url(URL(url), "the output URL")


def test_policy_leaves_public_addresses_and_names_to_the_resolver():
    for url in ("https://93.184.216.34/v.mp4", "https://[2606:4700:4700::1111]/v.mp4", "https://cdn.example/v.mp4"):
        HostPolicy().check_url(URL(url), "the output URL")
