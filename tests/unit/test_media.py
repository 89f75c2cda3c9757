"""Image decoding with real images of every awkward kind (generated with Pillow)."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from server.errors import BadRequestError
from server.media import decode_data_uri, decode_image
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
