"""Conversion of caller images to the codec's input: uint8 RGB, H x W x 3.

The rule (documented in docs/bitstream.md and the README):

* uint8 ``H x W x 3`` arrays are used as they are.
* ``H x W`` and ``H x W x 1`` (grayscale) are replicated to three channels.
* ``H x W x 4`` (RGBA) and ``H x W x 2`` (gray + alpha): the alpha channel is
  dropped, not composited — an archive keeps the colour data and says so in
  its records; alpha is not part of what RDEIC can code.
* uint16 arrays (16-bit PNG/TIFF) are reduced to 8 bits by rounding v/257.
* bool arrays map to 0/255.
* PIL images: 16-bit and 32-bit integer modes are scaled to 8 bits the same
  way; float modes ("F") must already be in 0..255; palette and CMYK/YCbCr/LAB
  images are converted with Pillow's ``convert("RGB")``; alpha is dropped.
  EXIF orientation is *not* applied here (the pipeline applies it when it
  decodes files; an in-memory image is taken as given).

Anything else (float arrays, >4 channels, empty images) is an error that says
what was received.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


class ImageInputError(ValueError):
    """An input image cannot be converted to 8-bit RGB."""


def _from_pil(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16)
        return _from_array(arr)
    if mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageInputError(f"32-bit integer image with values outside 0..65535 ({arr.min()}..{arr.max()})")
        return _from_array(arr.astype(np.uint16))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
            raise ImageInputError("float ('F' mode) image must hold finite values in 0..255")
        return _from_array(np.rint(arr).astype(np.uint8))
    if mode == "1":
        return _from_array(np.asarray(img.convert("L")))
    if mode in ("L", "RGB"):
        return _from_array(np.asarray(img))
    if mode in ("LA", "RGBA", "RGBa", "La"):
        return _from_array(np.asarray(img.convert("RGBA" if mode.startswith("RGB") else "LA")))
    # P, PA, CMYK, YCbCr, LAB, HSV, ...: Pillow knows how to reach RGB.
    return _from_array(np.asarray(img.convert("RGB")))


def _from_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageInputError(f"expected an H x W or H x W x C image, got shape {arr.shape}")
    h, w, c = arr.shape
    if h < 1 or w < 1:
        raise ImageInputError(f"empty image of shape {arr.shape}")
    if c not in (1, 2, 3, 4):
        raise ImageInputError(f"unsupported channel count {c} (shape {arr.shape}); expected 1, 2, 3 or 4")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageInputError(f"unsupported pixel type {arr.dtype}; expected uint8 (or uint16/bool)")
    if c in (2, 4):
        arr = arr[:, :, : c - 1]  # drop alpha
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Return an H x W x 3 uint8 array for a PIL image or numpy array (see module doc)."""
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise ImageInputError(f"expected a PIL image or numpy array, got {type(image).__name__}")


def padded_size(h: int, w: int, multiple: int) -> tuple[int, int]:
    """Size after zero-padding bottom/right to a multiple (the reference pads to 64)."""
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def pad_batch(images: list[np.ndarray], multiple: int) -> np.ndarray:
    """Stack same-padded-size images into B x Hp x Wp x 3, zero-padded bottom/right."""
    hp, wp = padded_size(images[0].shape[0], images[0].shape[1], multiple)
    out = np.zeros((len(images), hp, wp, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        if padded_size(im.shape[0], im.shape[1], multiple) != (hp, wp):
            raise ValueError("pad_batch needs images of one padded size")
        out[i, : im.shape[0], : im.shape[1]] = im
    return out
