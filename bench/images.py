"""Benchmark images: varied, realistic sizes and formats, generated with Pillow and encoded once.

Every benchmark request gets its own image (vLLM caches processed images by content hash, and a
repeated image would flatter any server). Images are made from a seed, so every target and every
trial sees the same bytes; they are encoded once and kept on disk (`~/.cache/gemma-server/bench`),
because PNG-encoding a few hundred multi-megapixel pictures takes about a minute.

Two kinds, as clients send them: photo-like JPEGs (gradients, shapes, sensor-like noise: the
entropy of a real photo, ~0.2-1 MB) and screenshot-like PNGs (flat areas, text-like strokes).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Sizes from a phone thumbnail to a 3-megapixel camera picture, in the order they are dealt out.
SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1600, 1200), (1920, 1080), (2048, 1536)]
# Two JPEGs for each PNG: photos dominate what chat clients upload.
FORMATS = ["JPEG", "JPEG", "PNG"]
CACHE_DIR = Path(os.path.expanduser("~/.cache/gemma-server/bench/images-v1"))


@dataclass(frozen=True, slots=True)
class BenchImage:
    index: int
    width: int
    height: int
    fmt: str
    data: bytes

    @property
    def mime(self) -> str:
        return "image/jpeg" if self.fmt == "JPEG" else "image/png"

    def data_uri(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode()


def spec(index: int) -> tuple[int, int, str]:
    """Size and format of image `index`; sizes and formats cycle at co-prime periods (7 and 3)."""
    width, height = SIZES[index % len(SIZES)]
    return width, height, FORMATS[index % len(FORMATS)]


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour gradients, a few soft shapes, and per-pixel noise like a camera sensor's."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = rng.uniform(0, 6.28, size=3).astype(np.float32)
    channels = [127 + 100 * np.sin(3 * x + 2 * y + p) for p in phase]
    pixels = np.stack(channels, axis=-1)
    pixels += rng.normal(0, 6, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        radius = int(rng.integers(width // 20, width // 5))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse([x0 - radius, y0 - radius, x0 + radius, y0 + radius], fill=color)
    return image


def screenshot_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Flat panels, rows of short dark strokes like text, and an embedded picture (as web pages have).

    The embedded picture is what makes real screenshots weigh hundreds of kilobytes as PNG.
    """
    background = tuple(int(c) for c in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (width, height), background)
    picture = photo_like(width // 2, height // 2, rng)
    image.paste(picture, (int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(40, width // 2)), y0 + int(rng.integers(40, height // 2))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(150, 256, size=3)))
    line_height = 18
    for top in range(10, height - line_height, line_height):
        left = 12
        while left < width - 60:
            word = int(rng.integers(12, 60))
            draw.rectangle([left, top, left + word, top + 9], fill=(30, 30, 30))
            left += word + 8
    return image


def render(index: int, seed: int) -> BenchImage:
    width, height, fmt = spec(index)
    rng = np.random.default_rng([seed, index])
    buffer = io.BytesIO()
    if fmt == "JPEG":
        photo_like(width, height, rng).save(buffer, "JPEG", quality=85)
    else:
        screenshot_like(width, height, rng).save(buffer, "PNG")
    return BenchImage(index, width, height, fmt, buffer.getvalue())


def load_images(count: int, seed: int, cache_dir: Path = CACHE_DIR) -> list[BenchImage]:
    """Images 0..count-1 for `seed`, from the disk cache or generated (and cached) now."""
    folder = cache_dir / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index in range(count):
        width, height, fmt = spec(index)
        path = folder / f"{index:05d}-{width}x{height}.{fmt.lower()}"
        if path.exists():
            images.append(BenchImage(index, width, height, fmt, path.read_bytes()))
            continue
        image = render(index, seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(image.data)
        tmp.replace(path)
        images.append(image)
    return images


def fingerprint(images: list[BenchImage]) -> str:
    """A short digest of the image set, printed in the report so runs can be compared."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(hashlib.sha256(image.data).digest())
    return digest.hexdigest()[:12]
