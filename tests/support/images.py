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
