"""Real images for tests, generated with Pillow (no binary fixtures in the repository)."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw


def make_image(
    width: int = 320, height: int = 240, color: tuple[int, int, int] = (200, 40, 40), mode: str = "RGB"
) -> Image.Image:
    """A picture with some structure (a gradient and a shape), so resizing has real work to do."""
    image = Image.new("RGB", (width, height), color)
    draw = ImageDraw.Draw(image)
    for x in range(0, width, max(1, width // 16)):
        draw.line([(x, 0), (width - x, height)], fill=(x * 255 // max(width, 1), 120, 255 - color[2]), width=2)
    draw.ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], outline=(255, 255, 0), width=3)
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_data_uri(width: int = 320, height: int = 240, color: tuple[int, int, int] = (200, 40, 40)) -> str:
    return data_uri(encode(make_image(width, height, color), "PNG"))


def jpeg_bytes(
    width: int = 640, height: int = 480, color: tuple[int, int, int] = (30, 90, 200), quality: int = 90
) -> bytes:
    return encode(make_image(width, height, color), "JPEG", quality=quality)


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A real, complete 1-bit PNG of `width` x `height` black pixels: a few hundred kilobytes that
    would decode to gigabytes (60k x 60k: 3.6 gigapixels, 10.8 GB as RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then zero bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(compressor.compress(row * (height % 1000)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def animated_gif(frames: int = 200, size: int = 64) -> bytes:
    images = [make_image(size, size, ((i * 37) % 256, (i * 11) % 256, 90)).convert("P") for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=20, loop=0)
    return buffer.getvalue()
