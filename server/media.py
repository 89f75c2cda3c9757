"""Images: from a request's `image_url` (a data: URI or an http(s) URL) to a decoded RGB picture.

Everything here assumes hostile input. Data URIs are size-checked before base64 decoding; URLs are
fetched with a byte cap enforced while streaming, timeouts, bounded redirects, and (unless the
configuration allows it) no loopback/private/link-local/metadata targets. Decoding checks the pixel
count from the header before decoding (decompression bombs), keeps the first frame of animations,
applies EXIF orientation and converts every mode to RGB. Decoding runs in a worker thread.

Every failure is a `BadRequestError` naming the offending message part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import BadRequestError
from server.settings import ImageSettings

# Formats accepted from clients; anything else is refused before decoding.
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}
MAX_REDIRECTS = 3
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass(slots=True)
class FetchedImage:
    data: bytes
    source: str  # "data" or "url", for metrics


class ImageLoader:
    """Fetches and decodes images under the limits of `ImageSettings`."""

    def __init__(self, settings: ImageSettings) -> None:
        self.settings = settings
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(settings.fetch_timeout_seconds),
            headers={"User-Agent": "gemma-server/0.1 (image fetch)"},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def load(self, url: str, param: str) -> Image.Image:
        fetched = await self.fetch(url, param)
        return await asyncio.to_thread(decode_image, fetched.data, self.settings.max_pixels, param)

    async def fetch(self, url: str, param: str) -> FetchedImage:
        if url[:5].lower() == "data:":
            return FetchedImage(decode_data_uri(url, self.settings.max_bytes, param), "data")
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise BadRequestError(
                "image_url must be an http(s) URL or a data: URI", param=param, code="invalid_image_url"
            )
        try:
            async with asyncio.timeout(self.settings.fetch_timeout_seconds):
                return FetchedImage(await self._fetch_url(url, param), "url")
        except TimeoutError as exc:
            raise BadRequestError("timed out fetching the image", param=param, code="image_fetch_failed") from exc

    async def _fetch_url(self, url: str, param: str) -> bytes:
        for _hop in range(MAX_REDIRECTS + 1):
            await self._check_destination(url, param)
            try:
                async with self._client.stream("GET", url) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise BadRequestError(
                                "image URL redirected nowhere", param=param, code="image_fetch_failed"
                            )
                        url = str(response.url.join(location))
                        continue
                    if response.status_code != 200:
                        raise BadRequestError(
                            f"fetching the image returned HTTP {response.status_code}",
                            param=param,
                            code="image_fetch_failed",
                        )
                    return await self._read_capped(response, param)
            except httpx.HTTPError as exc:
                raise BadRequestError(
                    f"could not fetch the image ({type(exc).__name__})", param=param, code="image_fetch_failed"
                ) from exc
        raise BadRequestError("too many redirects fetching the image", param=param, code="image_fetch_failed")

    async def _read_capped(self, response: httpx.Response, param: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_bytes:
            raise _too_large(self.settings.max_bytes, param)
        buffer = bytearray()
        async for chunk in response.aiter_bytes():
            buffer.extend(chunk)
            if len(buffer) > self.settings.max_bytes:
                raise _too_large(self.settings.max_bytes, param)
        return bytes(buffer)

    async def _check_destination(self, url: str, param: str) -> None:
        if self.settings.allow_private_networks:
            return
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        if not host:
            raise BadRequestError("image URL has no host", param=param, code="invalid_image_url")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise BadRequestError("image host could not be resolved", param=param, code="image_fetch_failed") from exc
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global and not self._allowlisted(address, port):
                raise BadRequestError(
                    "image URL points to a private or local network address, which is not allowed",
                    param=param,
                    code="invalid_image_url",
                )

    def _allowlisted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        for entry in self.settings.private_network_allowlist:
            if "/" in entry:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            elif entry == f"{address}:{port}":
                return True
        return False


def decode_data_uri(uri: str, max_bytes: int, param: str) -> bytes:
    match = _DATA_URI.match(uri[:256])
    if match is None or not match.group("b64"):
        raise BadRequestError(
            "image data URIs must look like data:image/png;base64,<data>", param=param, code="invalid_image_url"
        )
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise BadRequestError(f"data URI type {mime!r} is not an image", param=param, code="invalid_image")
    payload = uri[match.end() :]
    # Base64 is 4 characters per 3 bytes: refuse before decoding anything.
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise _too_large(max_bytes, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError("image data URI is not valid base64", param=param, code="invalid_image") from exc


def decode_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """Decodes one image to RGB. Blocking: call it in a worker thread."""
    image: Image.Image
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadRequestError("the image has too many pixels", param=param, code="image_too_large") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadRequestError("the image could not be decoded", param=param, code="invalid_image") from exc
    if image.format not in ALLOWED_FORMATS:
        raise BadRequestError(f"image format {image.format} is not supported", param=param, code="invalid_image")
    width, height = image.size
    if width < 1 or height < 1:
        raise BadRequestError("the image is empty", param=param, code="invalid_image")
    if width * height > max_pixels:
        raise BadRequestError(
            f"the image is {width}x{height} pixels; at most {max_pixels} pixels are allowed",
            param=param,
            code="image_too_large",
        )
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequestError("the image data is corrupt or truncated", param=param, code="invalid_image") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, as most viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clipping at 255.
        return image.point(lambda value: value / 256).convert("L").convert("RGB")
    return image.convert("RGB")


def _too_large(max_bytes: int, param: str) -> BadRequestError:
    return BadRequestError(f"the image is larger than {max_bytes} bytes", param=param, code="image_too_large")
