"""Which network addresses an output download may reach, so that an API answer cannot make batchrun fetch
a local service (loopback, private, link-local or unspecified addresses, IPv4 or IPv6).

A `HostPolicy` checks every hop of a download: a URL naming an address is checked before anything is sent;
a URL naming a host is checked by the policy's resolver, which sits in the download session's connector.
So the addresses checked are the very addresses the connection is made to: a name that answers a public
address to one lookup and a private one to the next (DNS rebinding) gains nothing.

`run` applies `HostPolicy()` (public addresses only) when the API base URL is itself public; when the API
is on loopback or a private network (the sandbox, a test server, a company gateway), outputs there are
expected and no policy applies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import weakref
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from .errors import OutputUrlRefused

__all__ = ["HostPolicy", "is_private_base", "is_public", "refusal_of"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv6 prefixes whose last 32 bits are an IPv4 address: NAT64, IPv4-compatible (deprecated, ::/96, which
# also holds :: and ::1) and IPv4-translated (::ffff:0:0/96).
_CARRY_IPV4 = tuple(ipaddress.ip_network(net) for net in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))


def is_public(address: IPAddress) -> bool:
    """True for a globally reachable unicast address. IPv6 forms that carry an IPv4 address (mapped
    ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``, IPv4-compatible ``::a.b.c.d``, 6to4 ``2002:ab:cd::``)
    are judged by that address; deprecated site-local ``fec0::/10`` is not public."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if any(address in net for net in _CARRY_IPV4):
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None:
            return is_public(address.sixtofour)
        if address.is_site_local:
            return False
    return address.is_global and not address.is_multicast


def _kind(address: IPAddress | None) -> str:
    """"a loopback address", "an unspecified address"...: what kind of address was refused."""
    name = "unusable"
    if address is not None:
        tests = (("is_loopback", "loopback"), ("is_link_local", "link-local"), ("is_unspecified", "unspecified"),
                 ("is_multicast", "multicast"), ("is_private", "private"))
        name = next((name for test, name in tests if getattr(address, test)), "non-public")
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} address"


def _literal(host: str | None) -> IPAddress | None:
    try:
        return ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return None


class HostPolicy:
    """Which addresses output downloads may connect to: `allowed(address)` says (default `is_public`).

    `resolver` is the DNS resolver names go through (default aiohttp's); tests pass their own to map
    names without DNS, and an `allowed` that treats their loopback server as the public internet.
    Build the download session with `session()`: `batchrun.download` refuses a session not made here.
    """

    def __init__(self, allowed: Callable[[IPAddress], bool] = is_public, resolver: AbstractResolver | None = None):
        self.allowed = allowed
        self._resolver = resolver
        self._sessions: weakref.WeakSet[aiohttp.ClientSession] = weakref.WeakSet()

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """A ClientSession (no credentials) whose connector resolves names through this policy."""
        connector = aiohttp.TCPConnector(limit=0, resolver=_CheckedResolver(self, self._resolver))
        made = aiohttp.ClientSession(connector=connector, **kwargs)
        self._sessions.add(made)
        return made

    def applies_to(self, session: aiohttp.ClientSession) -> bool:
        return session in self._sessions

    def check_url(self, url: URL, where: str) -> None:
        """Refuse a URL that is not http(s), or that names a refused address. Names are left to the resolver."""
        if url.scheme not in ("http", "https"):
            raise OutputUrlRefused(f"{where}: refusing a {url.scheme or 'relative'}: URL; only http and https")
        address = _literal(url.host)
        if address is not None and not self.allowed(address):
            raise OutputUrlRefused(f"{where} points at {address}, {_kind(address)}; refused because "
                                   "the API is not on a private network")


class AddressRefused(OSError):
    """Raised by the resolver: the name resolves to an address the policy refuses."""


class _CheckedResolver(AbstractResolver):
    def __init__(self, policy: HostPolicy, inner: AbstractResolver | None):
        self.policy = policy
        self._inner = inner
        self._own = inner is None

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        if self._inner is None:
            self._inner = aiohttp.DefaultResolver()
        found = await self._inner.resolve(host, port, family)
        # A name with any refused address is refused as a whole: no public storage host has one.
        for entry in found:
            address = _literal(str(entry["host"]).partition("%")[0])
            if address is None or not self.policy.allowed(address):
                shown = address if address is not None else entry["host"]
                raise AddressRefused(f"{host} resolves to {shown}, {_kind(address)}")
        return found

    async def close(self) -> None:
        if self._own and self._inner is not None:
            await self._inner.close()


def refusal_of(exc: BaseException) -> AddressRefused | None:
    """The resolver's refusal inside an aiohttp connection error, if that is what it was."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, AddressRefused):
            return exc
        inner = getattr(exc, "os_error", None)
        exc = inner if inner is not None and inner is not exc else exc.__cause__
        seen += 1
    return None


async def is_private_base(base_url: str, timeout: float = 5.0) -> bool:
    """True when the API base URL's host is (or resolves only to) non-public addresses: then the API is the
    sandbox, a test server or a private gateway, and outputs on such addresses are expected. A name that
    does not resolve within `timeout` seconds counts as public (the stricter side)."""
    try:
        host = URL(base_url).host or ""
    except (TypeError, ValueError):
        return False
    address = _literal(host)
    if address is not None:
        return not is_public(address)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    if not host:
        return False
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout)
    except (OSError, UnicodeError, asyncio.TimeoutError):
        return False
    addresses = [_literal(str(info[4][0]).partition("%")[0]) for info in infos]
    return bool(addresses) and all(a is not None and not is_public(a) for a in addresses)
