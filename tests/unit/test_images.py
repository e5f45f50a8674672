"""Image decoding: every way an image can be bad gives an ImageError that says why."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from annoloop.images import ImageError, decode_image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_decodes_to_bgr():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 255  # red
    out = decode_image(png(rgb), 10_000)
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (0, 0, 255)  # BGR


def test_grey_and_rgba_become_three_channels():
    assert decode_image(png(np.zeros((5, 5), np.uint8)), 10_000).shape == (5, 5, 3)
    assert decode_image(png(np.zeros((5, 5, 4), np.uint8)), 10_000).shape == (5, 5, 3)


def test_exif_orientation_is_applied():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.new("RGB", (40, 20)).save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue(), 10_000).shape[:2] == (40, 20)  # shown as 20 wide, 40 high


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a readable image"),
        (b"GIF89a garbage", "not a readable image"),
        (b"hello world", "not a readable image"),
    ],
)
def test_unreadable_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, 10_000)


def test_truncated_image():
    data = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], 10_000)


def test_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(ImageError, match=r"100x100 = 10000 pixels, above images.max_pixels=9999"):
        decode_image(png(np.zeros((100, 100, 3), np.uint8)), 9_999)
