"""The SSRF policy: addresses, URLs, DNS pinning, and real fetches against local listeners."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from typing import Any

import httpcore
import pytest

from server.errors import BadRequestError
from server.media.images import ImageLoader
from server.media.netguard import (
    Address,
    DestinationPolicy,
    ForbiddenDestination,
    GuardedNetworkBackend,
    check_url,
    is_public_address,
)
from server.settings import ImageSettings
from tests.support.image_host import ImageHost
from tests.support.images import data_uri, encode, make_image


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.170.2",
        "100.64.0.1",
        "100.100.100.200",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.0.192",
        "198.18.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:7f00:1::1",
        "::127.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://127.0.0.1:70/",
        "http://user:pass@example.com/a.png",
        "http://example.com@127.0.0.1/a.png",
        "http://example.com\\@127.0.0.1/a.png",
        "http://127.0.0.1\\.example.com/",
        "http://exa mple.com/",
        "http://example.com/\r\nHost: evil",
        "http://127.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http:///a.png",
        "http://" + "a" * 9000 + ".com/",
    ],
)
def test_urls_wrong_on_their_face_are_refused(url: str) -> None:
    with pytest.raises(ForbiddenDestination):
        check_url(url, DestinationPolicy())


def test_domain_allow_list() -> None:
    policy = DestinationPolicy(allowed_domains=["images.example.com", "*.cdn.example.org"])
    check_url("https://images.example.com/a.png", policy)
    check_url("https://eu.cdn.example.org/a.png", policy)
    for url in ("https://example.com/a.png", "https://cdn.example.org.evil.com/", "https://evilimages.example.com/"):
        with pytest.raises(ForbiddenDestination):
            check_url(url, policy)


def test_private_network_allowlist_entries() -> None:
    policy = DestinationPolicy(private_network_allowlist=["10.1.0.0/16", "127.0.0.1:9000", "[::1]:9001", "10.9.9.9"])
    policy.check_address(ipaddress.ip_address("10.1.200.3"), 80)
    policy.check_address(ipaddress.ip_address("127.0.0.1"), 9000)
    policy.check_address(ipaddress.ip_address("::1"), 9001)
    policy.check_address(ipaddress.ip_address("10.9.9.9"), 1)
    for address, port in (("127.0.0.1", 9001), ("10.2.0.1", 80), ("::1", 9000)):
        with pytest.raises(ForbiddenDestination):
            policy.check_address(ipaddress.ip_address(address), port)
    with pytest.raises(ValueError):
        DestinationPolicy(private_network_allowlist=["not-an-address"])


class _RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.dialled: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        self.dialled.append((host, port))
        raise httpcore.ConnectError("recorded, not connected")


def _resolver(*answers: list[str]) -> tuple[Any, list[str]]:
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[Address]:
        calls.append(host)
        return [ipaddress.ip_address(a) for a in answers[min(len(calls), len(answers)) - 1]]

    return resolve, calls


async def test_every_resolved_address_must_be_public() -> None:
    resolve, _ = _resolver(["93.184.216.34", "127.0.0.1"])
    inner = _RecordingBackend()
    backend = GuardedNetworkBackend(DestinationPolicy(), resolver=resolve, inner=inner)
    with pytest.raises(ForbiddenDestination):
        await backend.connect_tcp("mixed.example", 80)
    assert inner.dialled == []


async def test_the_validated_address_is_the_one_dialled() -> None:
    """DNS rebinding: the name is resolved once per connection and the checked address is dialled,
    never the name (which a rebinding server would answer differently the second time)."""
    resolve, calls = _resolver(["93.184.216.34"], ["127.0.0.1"])
    inner = _RecordingBackend()
    backend = GuardedNetworkBackend(DestinationPolicy(), resolver=resolve, inner=inner)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("rebind.example", 80)
    assert calls == ["rebind.example"]
    assert inner.dialled == [("93.184.216.34", 80)]
    with pytest.raises(ForbiddenDestination):  # the next connection resolves again, and is checked again
        await backend.connect_tcp("rebind.example", 80)
    assert inner.dialled == [("93.184.216.34", 80)]


async def test_rebinding_name_through_the_loader_never_reaches_the_canary(canary: ImageHost) -> None:
    resolve, _ = _resolver(["127.0.0.1"])
    loader = ImageLoader(ImageSettings(), resolver=resolve)
    try:
        with pytest.raises(BadRequestError) as caught:
            await loader.fetch(f"http://images.example:{canary.port}/img/x.png", "p")
        assert caught.value.code == "invalid_image_url"
    finally:
        await loader.aclose()
    assert canary.requests == []


def _loader(image_host: ImageHost, **overrides: Any) -> ImageLoader:
    settings = ImageSettings(private_network_allowlist=[f"127.0.0.1:{image_host.port}"], **overrides)
    return ImageLoader(settings)


HOSTILE_PATHS = [
    "http://localhost:{canary}/x.png",
    "http://127.0.0.1:{canary}/x.png",
    "http://127.1:{canary}/x.png",
    "http://2130706433:{canary}/x.png",
    "http://0x7f000001:{canary}/x.png",
    "http://017700000001:{canary}/x.png",
    "http://[::ffff:127.0.0.1]:{canary}/x.png",
    "http://0.0.0.0:{canary}/x.png",
    "http://127.0.0.1:{host}\\@127.0.0.1:{canary}/x.png",
    "http://127.0.0.1:{host}@127.0.0.1:{canary}/x.png",
    "http://127.0.0.1:{canary}#@127.0.0.1:{host}/x.png",
    "{host_url}/redirect?to=http://127.0.0.1:{canary}/x.png",
    "{host_url}/redirect?to=http://localhost:{canary}/x.png",
    "{host_url}/redirect?to={host_url}/redirect%3Fto%3Dhttp://127.0.0.1:{canary}/x.png",
    "{host_url}/redirect?to=file:///etc/passwd",
    "{host_url}/redirect?to=http://169.254.169.254/latest/meta-data/",
]


@pytest.mark.parametrize("template", HOSTILE_PATHS)
async def test_hostile_urls_never_reach_the_canary(template: str, image_host: ImageHost, canary: ImageHost) -> None:
    url = template.format(canary=canary.port, host=image_host.port, host_url=image_host.base_url)
    loader = _loader(image_host)
    try:
        with pytest.raises(BadRequestError) as caught:
            await loader.load(url, "messages[0].content[0].image_url")
    finally:
        await loader.aclose()
    assert caught.value.param == "messages[0].content[0].image_url"
    assert caught.value.code in ("invalid_image_url", "image_fetch_failed")
    assert canary.requests == []


async def test_allow_listed_host_serves_and_redirects_within_itself(image_host: ImageHost) -> None:
    url = image_host.add("netguard.png", encode(make_image(30, 20), "PNG"))
    loader = _loader(image_host)
    try:
        assert (await loader.load(url, "p")).pixels.size == (30, 20)
        redirected = f"{image_host.base_url}/redirect?to=/img/netguard.png"
        assert (await loader.load(redirected, "p")).pixels.size == (30, 20)
    finally:
        await loader.aclose()


async def test_redirect_hops_are_bounded(image_host: ImageHost) -> None:
    url = "/img/none.png"
    for _ in range(5):
        url = f"/redirect?to={url.replace('?', '%3F').replace('=', '%3D')}"
    loader = _loader(image_host, max_redirects=2)
    try:
        with pytest.raises(BadRequestError, match="redirected more than 2 times"):
            await loader.load(image_host.base_url + url, "p")
    finally:
        await loader.aclose()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/html", "not an image"),
        ("/status/404", "HTTP 404"),
        ("/status/500", "HTTP 500"),
        ("/big", "not a PNG"),
        ("/endless", "larger than"),
        ("/gzip", "compressed"),
        ("/slow", "timed out"),
    ],
)
async def test_misbehaving_image_hosts_give_clean_400s(path: str, message: str, image_host: ImageHost) -> None:
    loader = _loader(image_host, max_bytes=2_000_000, fetch_timeout_seconds=1.5, fetch_read_timeout_seconds=1)
    try:
        with pytest.raises(BadRequestError, match=message):
            await loader.load(image_host.base_url + path, "p")
    finally:
        await loader.aclose()


async def test_decoding_runs_off_the_event_loop_and_is_bounded(
    image_host: ImageHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base64 and image decoding run in worker threads, at most `max_concurrent_decodes` at once."""
    import server.media.images as media

    png = encode(make_image(1500, 1000), "PNG")
    url = image_host.add("netguard-big.png", png)
    loop_thread = threading.get_ident()
    threads: list[int] = []
    active = 0
    most = 0
    lock = threading.Lock()

    def watched(function: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            nonlocal active, most
            with lock:
                threads.append(threading.get_ident())
                active += 1
                most = max(most, active)
            try:
                time.sleep(0.05)
                return function(*args)
            finally:
                with lock:
                    active -= 1

        return wrapper

    monkeypatch.setattr(media, "decode_image", watched(media.decode_image))
    monkeypatch.setattr(media, "_b64decode", watched(media._b64decode))
    loader = _loader(image_host, max_concurrent_decodes=2)
    try:
        sources = [url] * 3 + [data_uri(png)] * 3
        images = await asyncio.gather(*(loader.load(source, "p") for source in sources))
    finally:
        await loader.aclose()
    assert all(image.pixels.size == (1500, 1000) for image in images)
    # The same bytes by URL or data URI: one content id, the engine's cache key for the picture.
    assert len({image.content_id for image in images}) == 1
    assert threads and loop_thread not in threads
    assert most <= 2
