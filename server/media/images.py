"""Images: from a request's `image_url` (a data: URI or an http(s) URL) to a decoded RGB picture.

Everything here assumes hostile input.

Fetching (`ImageLoader`): http and https only; every connection, redirect hops included, goes
through `server/media/netguard.py` (no loopback/private/link-local/metadata targets unless configured,
DNS resolved once and pinned); at most `images.max_redirects` hops; connect, read and total
timeouts; the byte cap is enforced while streaming (and from Content-Length up front);
compressed transfer encodings are refused (no gzip bombs); the Content-Type must be an image (or
unspecified/octet-stream) and the first bytes must be the magic number of an accepted format; at
most `images.max_concurrent_fetches` fetches run at once.

Decoding (`decode_image`, always in a worker thread, at most `images.max_concurrent_decodes` at
once): only PNG, JPEG, WebP, GIF, BMP and TIFF, recognised by magic bytes and opened with only that
format's decoder; the pixel count is checked from the header before any pixel is decoded
(decompression bombs); only the first frame of animated or multi-page files is decoded; EXIF
orientation is applied; every colour mode becomes RGB. Data URIs are size-checked before base64
decoding, which also runs in the worker thread: the event loop never decodes. Each loaded image
carries a digest of its encoded bytes (`LoadedImage.content_id`), computed in the same thread.

Every failure is a `BadRequestError` naming the offending message part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import BadRequestError
from server.media.netguard import (
    DestinationPolicy,
    ForbiddenDestination,
    GuardedNetworkBackend,
    Resolver,
    check_url,
    guarded_transport,
    resolve,
)
from server.settings import ImageSettings

# Accepted formats: magic bytes -> the Pillow decoders allowed to open them.
_MAGIC: tuple[tuple[bytes, int, tuple[str, ...]], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, ("PNG",)),
    (b"\xff\xd8\xff", 0, ("JPEG",)),  # multi-picture JPEGs open as MPO through this decoder
    (b"GIF87a", 0, ("GIF",)),
    (b"GIF89a", 0, ("GIF",)),
    (b"WEBP", 8, ("WEBP",)),  # RIFF....WEBP
    (b"BM", 0, ("BMP",)),
    (b"II*\x00", 0, ("TIFF",)),
    (b"MM\x00*", 0, ("TIFF",)),
)
MAGIC_BYTES_NEEDED = 12
SUPPORTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_IMAGE_CONTENT_TYPES_EXTRA = {"application/octet-stream", "binary/octet-stream"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_READ_CHUNK = 64 * 1024


def sniff_format(head: bytes) -> tuple[str, ...] | None:
    """The Pillow format names allowed for data starting with `head`, or None if not an image we take."""
    for magic, offset, formats in _MAGIC:
        if head[offset : offset + len(magic)] == magic and (offset == 0 or head[:4] == b"RIFF"):
            return formats
    return None


class ImageLoader:
    """Fetches and decodes images under the limits of `ImageSettings`."""

    def __init__(self, settings: ImageSettings, *, resolver: Resolver = resolve) -> None:
        self.settings = settings
        self.policy = DestinationPolicy(
            allow_private_networks=settings.allow_private_networks,
            private_network_allowlist=settings.private_network_allowlist,
            allowed_domains=settings.allowed_domains,
        )
        self._fetches = asyncio.Semaphore(settings.max_concurrent_fetches)
        self._decodes = asyncio.Semaphore(settings.max_concurrent_decodes)
        backend = GuardedNetworkBackend(self.policy, resolver=resolver)
        self._client = httpx.AsyncClient(
            transport=guarded_transport(backend, max_connections=settings.max_concurrent_fetches),
            follow_redirects=False,
            timeout=httpx.Timeout(
                settings.fetch_timeout_seconds,
                connect=settings.fetch_connect_timeout_seconds,
                read=settings.fetch_read_timeout_seconds,
            ),
            headers={
                "User-Agent": "gemma-server/0.1 (image fetch)",
                "Accept": "image/*",
                "Accept-Encoding": "identity",  # no gzip: a compressed body could expand past the cap
            },
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def load(self, url: str, param: str) -> LoadedImage:
        if url[:5].lower() == "data:":
            payload = data_uri_payload(url, self.settings.max_bytes, param)
            async with self._decodes:
                return await asyncio.to_thread(_decode_base64_image, payload, self.settings.max_pixels, param)
        async with self._fetches:
            data = await self.fetch(url, param)
        async with self._decodes:
            return await asyncio.to_thread(_decode_identified, data, self.settings.max_pixels, param)

    async def fetch(self, url: str, param: str) -> bytes:
        """The bytes behind an http(s) URL, under every limit above."""
        try:
            async with asyncio.timeout(self.settings.fetch_timeout_seconds):
                return await self._fetch_url(url, param)
        except TimeoutError as exc:
            raise _fetch_failed("timed out fetching the image", param) from exc

    async def _fetch_url(self, url: str, param: str) -> bytes:
        target = self._checked(url, param)
        for _hop in range(self.settings.max_redirects + 1):
            try:
                async with self._client.stream("GET", target) as response:
                    if response.is_redirect:
                        target = self._checked(str(response.url.join(response.headers["location"])), param)
                        continue
                    if response.status_code != 200:
                        raise _fetch_failed(f"fetching the image returned HTTP {response.status_code}", param)
                    _check_headers(response, param)
                    return await self._read_capped(response, param)
            except ForbiddenDestination as exc:
                raise BadRequestError(str(exc), param=param, code="invalid_image_url") from exc
            except httpx.TimeoutException as exc:
                raise _fetch_failed("timed out fetching the image", param) from exc
            except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
                raise _fetch_failed(f"could not fetch the image ({type(exc).__name__})", param) from exc
        raise _fetch_failed(f"the image URL redirected more than {self.settings.max_redirects} times", param)

    def _checked(self, url: str, param: str) -> httpx.URL:
        try:
            return check_url(url, self.policy)
        except ForbiddenDestination as exc:
            raise BadRequestError(str(exc), param=param, code="invalid_image_url") from exc

    async def _read_capped(self, response: httpx.Response, param: str) -> bytes:
        limit = self.settings.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit, param)
        buffer = bytearray()
        checked = False
        async for chunk in response.aiter_raw(_READ_CHUNK):
            buffer.extend(chunk)
            if len(buffer) > limit:
                raise _too_large(limit, param)
            if not checked and len(buffer) >= MAGIC_BYTES_NEEDED:
                _check_magic(bytes(buffer[:MAGIC_BYTES_NEEDED]), param)
                checked = True
        if not checked:
            _check_magic(bytes(buffer), param)
        return bytes(buffer)


def _check_headers(response: httpx.Response, param: str) -> None:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadRequestError(
            "the image host sent a compressed response; images must be sent as they are",
            param=param,
            code="invalid_image",
        )
    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type and not content_type.startswith("image/") and content_type not in _IMAGE_CONTENT_TYPES_EXTRA:
        raise BadRequestError(
            f"the image URL returned {content_type[:60]!r}, not an image", param=param, code="invalid_image"
        )


def _check_magic(head: bytes, param: str) -> tuple[str, ...]:
    formats = sniff_format(head)
    if formats is None:
        raise BadRequestError(f"the data is not a {SUPPORTED} image", param=param, code="invalid_image")
    return formats


def data_uri_payload(uri: str, max_bytes: int, param: str) -> str:
    """The base64 part of an image data URI, after checking its form and size (nothing decoded)."""
    match = _DATA_URI.match(uri[:256])
    if match is None or not match.group("b64"):
        raise BadRequestError(
            "image data URIs must look like data:image/png;base64,<data>", param=param, code="invalid_image_url"
        )
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise BadRequestError(f"data URI type {mime[:60]!r} is not an image", param=param, code="invalid_image")
    # Base64 is 4 characters per 3 bytes: refuse before decoding anything.
    if (len(uri) - match.end()) * 3 // 4 > max_bytes + 3:
        raise _too_large(max_bytes, param)
    return uri[match.end() :]


def decode_data_uri(uri: str, max_bytes: int, param: str) -> bytes:
    return _b64decode(data_uri_payload(uri, max_bytes, param), param)


def _b64decode(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError("image data URI is not valid base64", param=param, code="invalid_image") from exc


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """A decoded picture and the id of its content: a digest of the encoded bytes it came from.

    The id is what vLLM is given as the image's `multi_modal_uuids` entry, so vLLM keys its
    processor cache and prefix cache on it instead of hashing every decoded pixel (~4x the work on
    a 1080p picture). Equal bytes decode to equal pixels here (one decoder, frame 0, the same EXIF
    and colour handling), so equal ids mean equal model inputs; vLLM mixes the processor options
    (pan-and-scan) into the key itself."""

    pixels: Image.Image
    content_id: str


def content_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _decode_identified(data: bytes, max_pixels: int, param: str) -> LoadedImage:
    return LoadedImage(decode_image(data, max_pixels, param), content_id(data))


def _decode_base64_image(payload: str, max_pixels: int, param: str) -> LoadedImage:
    return _decode_identified(_b64decode(payload, param), max_pixels, param)


def decode_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """Decodes the first frame of one image to RGB. Blocking: call it in a worker thread."""
    formats = _check_magic(data[:MAGIC_BYTES_NEEDED], param)
    image: Image.Image
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(None, max_pixels, param) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadRequestError("the image could not be decoded", param=param, code="invalid_image") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise BadRequestError("the image is empty", param=param, code="invalid_image")
    if width * height > max_pixels:
        raise _too_many_pixels((width, height), max_pixels, param)
    try:
        image.load()  # the current frame only: frame 0 right after open (never count or seek frames)
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError) as exc:
        raise BadRequestError("the image data is corrupt or truncated", param=param, code="invalid_image") from exc
    image = _apply_orientation(image)
    try:
        return _to_rgb(image)
    except (OSError, ValueError) as exc:
        raise BadRequestError(
            f"images in colour mode {image.mode} are not supported", param=param, code="invalid_image"
        ) from exc


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, ZeroDivisionError):
        return image  # unreadable EXIF: keep the pixels as stored


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, as most viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_grey_to_rgb(image)
    return image.convert("RGB")


def _wide_grey_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit and float greyscale: scaled to 8 bits rather than clipped at 255."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
        scale = 1 / 256
    else:
        extrema = image.getextrema()
        low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]
        if image.mode == "F" and low >= 0 and high <= 1:
            scale = 255.0
        elif high <= 255:
            scale = 1.0
        elif high <= 65535:
            scale = 1 / 256
        else:
            scale = 255 / high
    return image.point(lambda value: value * scale).convert("L").convert("RGB")


def _too_large(max_bytes: int, param: str) -> BadRequestError:
    return BadRequestError(f"the image is larger than {max_bytes} bytes", param=param, code="image_too_large")


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int, param: str) -> BadRequestError:
    shown = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return BadRequestError(
        f"the image is {shown}; at most {max_pixels} pixels are allowed", param=param, code="image_too_large"
    )


def _fetch_failed(message: str, param: str) -> BadRequestError:
    return BadRequestError(message, param=param, code="image_fetch_failed")
