"""Bytes of an image member -> 8-bit RGB pixels, or a specific reason why not.

Every failure is a :class:`SampleFailure` carrying one reason code from ``pipeline.types.REASONS``,
so the archive can say *why* a sample was not archived (and a later job can redo just one kind).

Decisions worth knowing:

* **Pixel limit before decoding.** The size in the header is checked against ``max_pixels`` before
  any pixel is decoded, so a decompression bomb costs a header read. Pillow's process-wide guard
  (``Image.MAX_IMAGE_PIXELS``, refusing above twice its value, ~179 Mpx) is left alone; when it
  refuses first the reason is the same, ``too_large``. Its warning (between 1x and 2x) is
  silenced, since the limit that matters is enforced here.
* **EXIF orientation is applied** (the archive stores the picture as it is meant to be seen); the
  original tag value goes to the ``exif_orientation`` column. Unreadable EXIF is ignored, not fatal.
* **Colour conversion is the codec's rule** (``rdeic_core.images.to_rgb_uint8``: alpha dropped,
  16-bit reduced, palette/CMYK converted), so the pipeline and a direct ``codec.encode`` agree.
* Multi-frame images (GIF, TIFF) contribute their first frame.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rdeic_core.images import ImageInputError, to_rgb_uint8

# Only a decompression-bomb guard, not a memory bound (the codec runs large images on tiles):
# 128 Mi pixels (134 MP) admits 100-megapixel panoramas and stays below Pillow's own refusal (~179 MP).
DEFAULT_MAX_PIXELS = 128 * 1024 * 1024
EXIF_ORIENTATION_TAG = 0x0112
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm", "pgm", "pbm",
                    "pnm", "jp2", "j2k", "jpx", "avif", "tga", "ico")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, MemoryError,
                  AttributeError, ZeroDivisionError)

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class SampleFailure(Exception):
    """A sample cannot be archived; ``reason`` is a code from ``pipeline.types.REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class DecodedImage:
    """Pixels ready for the codec plus what the archive records about the source image."""

    pixels: np.ndarray  # H x W x 3 uint8, EXIF orientation applied
    mode: str  # Pillow mode of the source (e.g. "RGB", "CMYK", "I;16", "P")
    exif_orientation: int | None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def image_extension(ext: str) -> str | None:
    """The image format suffix of a member extension (``b.png`` -> ``png``), or None if not an image."""
    last = ext.rsplit(".", 1)[-1].lower()
    return last if last in IMAGE_EXTENSIONS else None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes to RGB uint8 (see the module doc); raises SampleFailure with a reason."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if not data:
        raise SampleFailure("empty_file", "the image member has 0 bytes")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleFailure("too_large", f"Pillow's decompression-bomb guard refused it: {exc}") from None
    except UnidentifiedImageError:
        detail = f"unknown image format ({len(data)} bytes starting {data[:12]!r})"
        raise SampleFailure("not_an_image", detail) from None
    except _DECODE_ERRORS as exc:
        raise SampleFailure(_reason_for(exc), f"cannot read the image header: {type(exc).__name__}: {exc}") from None
    with img:
        width, height = img.size
        if width < 1 or height < 1:
            raise SampleFailure("corrupt_image", f"image header says {width}x{height}")
        if width * height > max_pixels:
            raise SampleFailure("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit "
                                             f"of {max_pixels} (decompression-bomb guard)")
        mode = img.mode
        try:
            img.load()
        except _DECODE_ERRORS as exc:
            raise SampleFailure(_reason_for(exc), f"{type(exc).__name__}: {exc}") from None
        orientation, img = _apply_exif_orientation(img)
        try:
            pixels = to_rgb_uint8(img)
        except ImageInputError as exc:
            raise SampleFailure("unsupported_mode", f"mode {mode!r}: {exc}") from None
        except _DECODE_ERRORS as exc:
            reason = "out_of_memory" if isinstance(exc, MemoryError) else "corrupt_image"
            raise SampleFailure(reason, f"converting mode {mode!r}: {type(exc).__name__}: {exc}") from None
    return DecodedImage(pixels=pixels, mode=mode, exif_orientation=orientation)


def _reason_for(exc: BaseException) -> str:
    """Pillow reports data that ends early as OSError/EOFError mentioning truncation; a MemoryError is
    the worker's trouble, not the image's (``out_of_memory``, retried by ``--retry-failed``)."""
    if isinstance(exc, MemoryError):
        return "out_of_memory"
    truncated = isinstance(exc, EOFError) or (isinstance(exc, OSError) and "truncated" in str(exc).lower())
    return "truncated_image" if truncated else "corrupt_image"


def _apply_exif_orientation(img: Image.Image) -> tuple[int | None, Image.Image]:
    """(orientation tag or None, the upright image); unreadable EXIF leaves the image as stored."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - any EXIF parsing problem means "no usable orientation"
        return None, img
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        return None, img
    if orientation == 1:
        return 1, img
    try:
        return orientation, ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - keep the stored pixels rather than losing the sample
        return None, img
