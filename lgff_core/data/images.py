"""Image bytes <-> pixels for the shard format.

Policy (DESIGN.md section 4): JPEG and PNG sources are stored as their original bytes; anything else (TIFF, BMP,
numpy arrays) is stored as lossless PNG written with fixed options, so the same pixels give the same bytes.
`probe_image` checks the bytes (catching corrupt and truncated files) and returns the stored form. Its default
"fast" check walks the JPEG marker / PNG chunk structure in Python (size from SOF / IHDR, and the end-of-image
marker must be present, which catches truncation) without running the entropy decoder: this keeps a conversion
close to byte-copy speed. "decode" runs the full decoder as well (slower; catches damage inside the compressed
data). Formats other than JPEG/PNG are always fully decoded, since they are re-encoded as PNG.

Decompression bombs: both `probe_image` (prep) and `decode_image` (embed / train / report) read the size from the
header first and refuse an image above ``max_pixels`` (config ``data.max_pixels``, default 50 Mpx) before any pixel
is decoded. Error texts are deterministic (no object addresses), so a manifest's skip list is reproducible.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

from ..errors import DataError

__all__ = ["decode_image", "decode_array", "encode_png", "probe_image", "ImageCheckError", "DEFAULT_MAX_PIXELS",
           "check_pixels", "describe_error"]

KEEP_FORMATS = ("JPEG", "PNG")
PNG_COMPRESS_LEVEL = 1  # histology noise barely compresses; level 1 is ~5x faster than 6 for ~10% more bytes


DEFAULT_MAX_PIXELS = 50_000_000  # = DataConfig.max_pixels
_ADDRESS_RE = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>|\s+at 0x[0-9a-fA-F]+")


class ImageCheckError(ValueError):
    """Bytes are not a decodable image (the caller adds which file / row)."""


class PixelLimitError(ImageCheckError):
    """The header declares more pixels than the limit allows."""


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` without memory addresses (PIL names its BytesIO in some messages)."""
    text = _ADDRESS_RE.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Raise `ImageCheckError` when the declared size is above the pixel limit (None = no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise PixelLimitError(f"{width}x{height} = {width * height / 1e6:.1f} Mpx is above the pixel limit "
                              f"{max_pixels / 1e6:g} Mpx (data.max_pixels; decompression bomb?)")


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, sample_id: str | None = None
                 ) -> Image.Image:
    """Encoded bytes -> RGB PIL image (fully loaded). Bad bytes or a size above `max_pixels` (checked from the
    header, before decoding) raise a one-line `DataError` naming `sample_id`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(io.BytesIO(data)) as im:
                check_pixels(*im.size, max_pixels)
                im.load()
                return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except ImageCheckError as exc:
        raise DataError(f"sample_id {sample_id!r}: image is {exc}") from None
    except Exception as exc:  # PIL raises OSError / SyntaxError / ValueError / struct.error for bad data
        raise DataError(f"sample_id {sample_id!r}: not a decodable image ({describe_error(exc)})") from None


def decode_array(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 array."""
    return np.asarray(decode_image(data, max_pixels))


def encode_png(pixels: np.ndarray | Image.Image) -> bytes:
    """Lossless, deterministic PNG bytes ((H, W) or (H, W, 3|4) uint8, or a PIL image)."""
    im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.ascontiguousarray(pixels))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the SOF segment; raises if the marker structure or the EOI marker is missing."""
    if data[:2] != b"\xff\xd8":
        raise ImageCheckError("JPEG: missing start-of-image marker")
    pos, n, size = 2, len(data), None
    while True:
        while pos < n and data[pos] != 0xFF:  # tolerate junk between segments, as decoders do
            pos += 1
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise ImageCheckError("JPEG: truncated before the image data")
        marker = data[pos]
        pos += 1
        if marker in (0x01,) or 0xD0 <= marker <= 0xD8:
            continue
        if marker == 0xD9:
            raise ImageCheckError("JPEG: end-of-image marker before any image data")
        if pos + 2 > n:
            raise ImageCheckError("JPEG: truncated segment header")
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > n:
            raise ImageCheckError(f"JPEG: segment 0xFF{marker:02X} of length {length} runs past the end of the file")
        if marker in _JPEG_SOF:
            if length < 7:
                raise ImageCheckError("JPEG: short frame header")
            height = (data[pos + 3] << 8) | data[pos + 4]
            width = (data[pos + 5] << 8) | data[pos + 6]
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                raise ImageCheckError("JPEG: scan data before a frame header")
            # 0xFF 0xD9 cannot occur inside entropy-coded data (0xFF is stuffed), so it marks the end
            if data.rfind(b"\xff\xd9") < pos:
                raise ImageCheckError("JPEG: truncated (no end-of-image marker)")
            if size[0] == 0 or size[1] == 0:
                raise ImageCheckError(f"JPEG: invalid size {size[0]}x{size[1]}")
            return size
        pos += length


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageCheckError("PNG: missing IHDR chunk")
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    if width == 0 or height == 0:
        raise ImageCheckError(f"PNG: invalid size {width}x{height}")
    if data.rfind(_PNG_IEND, max(0, len(data) - 4096)) < 0:
        raise ImageCheckError("PNG: truncated (no IEND chunk)")
    return width, height


def probe_image(data: bytes, check: str = "fast", max_pixels: int | None = DEFAULT_MAX_PIXELS
                ) -> tuple[bytes, int, int]:
    """``(stored_bytes, width, height)`` for source bytes; raises `ImageCheckError` if they are not an image or
    declare more than `max_pixels` pixels.

    check="fast": structural check of JPEG / PNG (see the module docstring); check="decode": also decode fully.
    """
    if check not in ("fast", "decode"):
        raise ValueError(f"check must be 'fast' or 'decode', got {check!r}")
    if not data:
        raise ImageCheckError("not a decodable image (empty file)")
    try:
        # structure first (both modes): the full decoder tolerates a missing PNG IEND, for example
        if data[:2] == b"\xff\xd8":
            size = _jpeg_size(data)
            check_pixels(*size, max_pixels)
            if check == "fast":
                return (data, *size)
        elif data[:8] == _PNG_SIGNATURE:
            size = _png_size(data)
            check_pixels(*size, max_pixels)
            if check == "fast":
                return (data, *size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                width, height = im.size
                check_pixels(width, height, max_pixels)
                if fmt == "JPEG":  # DCT scaling: still reads every scan (so damage is found), ~10x less work
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
                if fmt in KEEP_FORMATS:
                    return data, width, height
                if im.mode not in ("RGB", "RGBA", "L", "I;16", "LA"):
                    im = im.convert("RGB")
                return encode_png(im), width, height
    except PixelLimitError:
        raise
    except ImageCheckError as exc:
        raise ImageCheckError(f"not a decodable image ({exc})") from None
    except Exception as exc:  # PIL raises OSError / SyntaxError / ValueError for bad data
        raise ImageCheckError(f"not a decodable image ({describe_error(exc)})") from None
