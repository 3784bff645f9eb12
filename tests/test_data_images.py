"""Image checks and coding: the fast structural check vs the full decode, lossless PNG, original bytes kept."""
import io

import numpy as np
import pytest
from PIL import Image

from lgff_core.data.images import ImageCheckError, decode_image, encode_png, probe_image


def _jpeg(progressive=False):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90,
                                                                            progressive=progressive)
    return buf.getvalue()


@pytest.mark.parametrize("check", ["fast", "decode"])
@pytest.mark.parametrize("progressive", [False, True])
def test_valid_jpeg_and_png_are_kept_byte_exact(check, progressive):
    data = _jpeg(progressive)
    assert probe_image(data, check) == (data, 56, 40)
    png = encode_png(np.zeros((7, 9, 3), dtype=np.uint8))
    assert probe_image(png, check) == (png, 9, 7)


@pytest.mark.parametrize("check", ["fast", "decode"])
def test_truncated_and_garbage_are_rejected(check):
    data = _jpeg()
    png = encode_png(np.full((30, 30, 3), 7, dtype=np.uint8))
    for bad in (data[: len(data) // 2], data[:300], png[:-20], b"\xff\xd8garbage", b"", b"hello world"):
        with pytest.raises(ImageCheckError, match="not a decodable image"):
            probe_image(bad, check)


def test_decode_check_catches_damage_inside_the_scan_data():
    data = bytearray(_jpeg())
    sos = data.index(b"\xff\xda")
    for i in range(sos + 20, len(data) - 10, 7):
        data[i] = 0xFF  # marker bytes inside entropy-coded data
    probe_image(bytes(data), "fast")  # structure intact: the fast check trusts the scan data
    with pytest.raises(ImageCheckError):
        probe_image(bytes(data), "decode")


def test_other_formats_become_lossless_png():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "BMP")
    stored, w, h = probe_image(buf.getvalue())
    assert stored[:4] == b"\x89PNG" and (w, h) == (10, 12)
    assert np.array_equal(np.asarray(decode_image(stored)), pixels)
    assert encode_png(pixels) == encode_png(pixels)  # deterministic bytes
    gray = decode_image(encode_png(np.full((4, 4), 9, dtype=np.uint8)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (9, 9, 9)
