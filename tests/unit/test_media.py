"""Image decoding with real images of every awkward kind (generated with Pillow)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from server.errors import BadRequestError
from server.media.images import decode_data_uri, decode_image
from tests.support.images import encode, make_image

MAX_PIXELS = 50_000_000


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    image = make_image(40, 30).convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30), 40000)
    data = encode(image, "JPEG" if mode == "CMYK" else "PNG")
    decoded = decode_image(data, MAX_PIXELS, "p")
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 30)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    data = encode(Image.new("I;16", (8, 8), 32768), "PNG")
    pixel = decode_image(data, MAX_PIXELS, "p").getpixel((0, 0))
    assert pixel == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    image = make_image(60, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encode(image, "JPEG", exif=exif.tobytes())
    assert decode_image(data, MAX_PIXELS, "p").size == (20, 60)


def test_animated_gif_keeps_the_first_frame() -> None:
    frames = [make_image(32, 32, (i * 20, 0, 0)).convert("P") for i in range(10)]
    import io

    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue(), MAX_PIXELS, "p")
    assert decoded.size == (32, 32)


@pytest.mark.parametrize("size", [(1, 1), (1, 2000), (2000, 1)])
def test_extreme_sizes_decode(size: tuple[int, int]) -> None:
    assert decode_image(encode(Image.new("RGB", size), "PNG"), MAX_PIXELS, "p").size == size


def test_pixel_cap_is_checked_before_decoding() -> None:
    data = encode(Image.new("RGB", (400, 300)), "PNG")
    with pytest.raises(BadRequestError) as caught:
        decode_image(data, 100_000, "messages[0].content[0].image_url")
    assert caught.value.code == "image_too_large"
    assert caught.value.param == "messages[0].content[0].image_url"


@pytest.mark.parametrize("data", [b"", b"not an image", encode(make_image(50, 50), "PNG")[:200]])
def test_garbage_and_truncated_images_are_400(data: bytes) -> None:
    with pytest.raises(BadRequestError):
        decode_image(data, MAX_PIXELS, "p")


def test_data_uri_decoding_and_limits() -> None:
    png = encode(make_image(10, 10), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert decode_data_uri(uri, 10_000, "p") == png
    with pytest.raises(BadRequestError, match="larger than"):
        decode_data_uri(uri, 10, "p")
    with pytest.raises(BadRequestError, match="base64"):
        decode_data_uri("data:image/png;base64,@@@@", 10_000, "p")
    with pytest.raises(BadRequestError):
        decode_data_uri("data:text/html;base64,PGh0bWw+", 10_000, "p")
    with pytest.raises(BadRequestError):
        decode_data_uri("data:image/png,rawbytes", 10_000, "p")


# ---- hostile and awkward images (the hardening checklist's image rows) -----------------------


def test_decompression_bomb_is_refused_from_its_header() -> None:
    import resource

    from tests.support.images import png_bomb

    bomb = png_bomb(60_000, 60_000)
    assert len(bomb) < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadRequestError) as caught:
        decode_image(bomb, MAX_PIXELS, "p")
    assert caught.value.code == "image_too_large"
    assert "60000x60000" in caught.value.message or "too many pixels" in caught.value.message
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 50_000  # nothing near the 10.8 GB the pixels would take


def test_bomb_just_over_the_cap_is_refused_before_decoding() -> None:
    from tests.support.images import png_bomb

    with pytest.raises(BadRequestError, match="8000x8000 pixels"):
        decode_image(png_bomb(8000, 8000), MAX_PIXELS, "p")


def test_animated_gif_with_many_frames_decodes_only_the_first_quickly() -> None:
    import time

    from tests.support.images import animated_gif

    data = animated_gif(frames=300)
    started = time.perf_counter()
    decoded = decode_image(data, MAX_PIXELS, "p")
    assert time.perf_counter() - started < 2
    assert decoded.size == (64, 64) and decoded.mode == "RGB"
    first = Image.open(io.BytesIO(data)).convert("RGB")
    assert decoded.tobytes() == first.tobytes()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("F", "TIFF"),
        ("I", "TIFF"),
        ("I;16", "TIFF"),
        ("YCbCr", "JPEG"),
        ("LAB", "TIFF"),
        ("RGBA", "WEBP"),
        ("1", "BMP"),
    ],
)
def test_more_modes_become_rgb_or_a_clean_400(mode: str, fmt: str) -> None:
    base = make_image(24, 16)
    image = base.convert("L").convert(mode) if mode in ("F", "I", "I;16") else base.convert(mode)
    data = encode(image, fmt)
    try:
        decoded = decode_image(data, MAX_PIXELS, "p")
    except BadRequestError as error:
        assert error.code == "invalid_image"
        return
    assert decoded.mode == "RGB" and decoded.size == (24, 16)


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (1, 1)])
def test_extreme_aspect_ratios_decode(size: tuple[int, int]) -> None:
    assert decode_image(encode(Image.new("L", size, 128), "PNG"), MAX_PIXELS, "p").size == size


@pytest.mark.parametrize(
    "data",
    [
        b"GIF89a" + b"\x00" * 20,
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"\xff\xd8\xff" + b"\x00" * 40,
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 20,
        b"%!PS-Adobe-3.0 EPSF-3.0\n",  # EPS would run Ghostscript: never opened
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"\x00\x00\x01\x00\x01\x00",  # ICO
    ],
)
def test_magic_bytes_decide_and_broken_or_foreign_formats_are_400(data: bytes) -> None:
    with pytest.raises(BadRequestError) as caught:
        decode_image(data, MAX_PIXELS, "p")
    assert caught.value.code == "invalid_image"


def test_a_jpeg_named_png_is_decoded_by_its_magic() -> None:
    from tests.support.images import data_uri, jpeg_bytes

    uri = data_uri(jpeg_bytes(40, 30), "image/png")
    assert decode_image(decode_data_uri(uri, 10**6, "p"), MAX_PIXELS, "p").size == (40, 30)


def test_data_uri_size_is_checked_before_base64_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    import server.media.images as media

    calls: list[int] = []
    monkeypatch.setattr(media.base64, "b64decode", lambda *a, **k: calls.append(1))
    with pytest.raises(BadRequestError, match="larger than"):
        media.decode_data_uri("data:image/png;base64," + "A" * 40_000_000, 20 * 2**20, "p")
    assert calls == []


def test_corrupt_exif_does_not_fail_the_image() -> None:
    image = make_image(30, 20)
    exif = Image.Exif()
    exif[0x0112] = 99  # an orientation value that does not exist
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()), MAX_PIXELS, "p")
    assert decoded.size == (30, 20)
