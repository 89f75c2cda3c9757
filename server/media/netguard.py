"""Where image fetches may connect: the SSRF policy, enforced on the socket that is actually opened.

An image URL is checked twice. `check_url` refuses what is wrong on its face (a scheme other than
http/https, user info, backslashes, a host outside `images.allowed_domains`, a literal private
address) with a clear message before anything is sent. The decisive check is in
`GuardedNetworkBackend.connect_tcp`, which httpx calls for every new connection, including each
redirect hop: it resolves the host name once, refuses the connection if *any* resolved address is
loopback, private, link-local, multicast, reserved, unspecified or a cloud metadata address, and
then connects to the address it validated. The name is never resolved again for that connection,
so a rebinding DNS name cannot switch targets between the check and the connect; TLS still uses the
name for SNI and certificate checks. URL-parser disagreements do not matter at this layer: whatever
host and port the HTTP client ends up dialling is what gets checked.

`images.allow_private_networks` turns the address check off (development and tests);
`images.private_network_allowlist` lets chosen private destinations through (CIDRs, or
`address:port` pairs such as an internal image store).

This module imports neither FastAPI nor vLLM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[Address]]]

MAX_URL_CHARS = 8192

# Cloud metadata services. Most are link-local or private anyway; listed so that a future change of
# the generic rules cannot let them through.
METADATA_ADDRESSES: frozenset[Address] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS DNS
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (classic)
        "fd00:ec2::254",  # AWS IMDS over IPv6
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class ForbiddenDestination(Exception):
    """The URL or the address it leads to is not allowed. The message is safe to show a client."""


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in an IPv6 one (mapped, 6to4, Teredo, NAT64, IPv4-compatible)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public_address(address: Address) -> bool:
    """True only for globally routable unicast addresses that are not metadata services."""
    candidates: list[Address] = [address]
    inner = embedded_ipv4(address)
    if inner is not None:
        candidates.append(inner)
    for candidate in candidates:
        if candidate in METADATA_ADDRESSES:
            return False
        if (
            not candidate.is_global
            or candidate.is_private
            or candidate.is_loopback
            or candidate.is_link_local
            or candidate.is_multicast
            or candidate.is_reserved
            or candidate.is_unspecified
            or (isinstance(candidate, ipaddress.IPv6Address) and candidate.is_site_local)
        ):
            return False
    return True


def parse_address(text: str) -> Address | None:
    """An IP literal (brackets and IPv6 zone ids allowed), or None for a host name."""
    text = text.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class DestinationPolicy:
    """Decides which host names and (address, port) pairs image fetches may reach."""

    def __init__(
        self,
        *,
        allow_private_networks: bool = False,
        private_network_allowlist: Iterable[str] = (),
        allowed_domains: Iterable[str] = (),
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._endpoints: set[tuple[Address, int]] = set()
        for entry in private_network_allowlist:
            self._add_allowlist_entry(entry.strip())
        self._exact_domains: set[str] = set()
        self._domain_suffixes: list[str] = []
        for domain in allowed_domains:
            domain = domain.strip().lower().rstrip(".")
            if domain.startswith("*."):
                self._domain_suffixes.append(domain[1:])
            elif domain:
                self._exact_domains.add(domain)

    def _add_allowlist_entry(self, entry: str) -> None:
        if "/" in entry:
            self._networks.append(ipaddress.ip_network(entry, strict=False))
            return
        host, sep, port = entry.rpartition(":")
        address = parse_address(host) if sep and port.isdigit() else None
        if address is not None:
            self._endpoints.add((address, int(port)))
            return
        single = parse_address(entry)
        if single is None:
            raise ValueError(f"images.private_network_allowlist: cannot parse {entry!r} (CIDR or address:port)")
        self._networks.append(ipaddress.ip_network(single))

    def check_host_name(self, host: str) -> None:
        if not self._exact_domains and not self._domain_suffixes:
            return
        name = host.lower().rstrip(".")
        if name in self._exact_domains or any(name.endswith(suffix) for suffix in self._domain_suffixes):
            return
        raise ForbiddenDestination("the image URL's host is not in the server's list of allowed image domains")

    def check_address(self, address: Address, port: int) -> None:
        if self.allow_private_networks or is_public_address(address):
            return
        if (address, port) in self._endpoints or any(address in network for network in self._networks):
            return
        raise ForbiddenDestination(
            "the image URL points to a private, local or metadata network address, which is not allowed"
        )


def check_url(url: str, policy: DestinationPolicy) -> httpx.URL:
    """Refuses URLs that are wrong on their face; returns the parsed URL the client will use."""
    if len(url) > MAX_URL_CHARS:
        raise ForbiddenDestination(f"the image URL is longer than {MAX_URL_CHARS} characters")
    if "\\" in url or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise ForbiddenDestination("the image URL contains backslashes, spaces or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ForbiddenDestination("the image URL could not be parsed") from exc
    if parsed.scheme not in ("http", "https"):
        raise ForbiddenDestination("image URLs must use http or https (or be data: URIs)")
    if parsed.userinfo:
        raise ForbiddenDestination("image URLs must not contain user names or passwords")
    if not parsed.host:
        raise ForbiddenDestination("the image URL has no host")
    policy.check_host_name(parsed.host)
    literal = parse_address(parsed.host)
    if literal is not None:
        policy.check_address(literal, parsed.port or (443 if parsed.scheme == "https" else 80))
    return parsed


async def resolve(host: str, port: int) -> list[Address]:
    """All addresses of `host` (getaddrinfo in a worker thread, so the event loop never blocks)."""
    literal = parse_address(host)
    if literal is not None:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[Address] = []
    for info in infos:
        address = parse_address(str(info[4][0]))
        if address is not None and address not in addresses:
            addresses.append(address)
    return addresses


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the policy applied to every connection it opens."""

    def __init__(
        self,
        policy: DestinationPolicy,
        resolver: Resolver = resolve,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.policy = policy
        self._resolve = resolver
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.policy.check_host_name(host)
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError("the image host could not be resolved") from exc
        if not addresses:
            raise httpcore.ConnectError("the image host could not be resolved")
        for address in addresses:  # every address must pass, not just the one we would use
            self.policy.check_address(address, port)
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise ForbiddenDestination("unix sockets are not allowed for image fetches")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guarded_transport(
    backend: GuardedNetworkBackend, *, max_connections: int, keepalive_expiry: float = 5.0
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connection pool dials through `backend` (no proxies, HTTP/1.1)."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx does not take a network backend as an argument: give the transport a pool that uses ours.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=keepalive_expiry,
        http1=True,
        http2=False,
        retries=0,
        network_backend=backend,
    )
    return transport
