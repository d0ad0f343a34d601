"""Entropy-coding helpers of the compression module: checkerboard, bit packing, deterministic parameters.

Checkerboard (reference ``utils/ckbd.py``): the *anchor* positions are those
with (row + col) odd, i.e. ``[0::2, 1::2]`` and ``[1::2, 0::2]``; the
*non-anchor* positions are the rest. "Squeezing" packs one of the two sets
into an H x W/2 map, even rows first taking their odd (anchor) / even
(non-anchor) columns; the rANS symbol order is the row-major order of these
squeezed maps, so it must never change.

Deterministic entropy parameters: the decoder can only follow the rANS stream
if it selects exactly the same CDF table and mean for every symbol as the
encoder did. The networks that predict them run in float64 and their outputs
are snapped here: means to a 2**-16 grid (kept as int64 fixed point, so that
y_hat = symbol + mean is exact), scales to an index into the scale table
(compressai's ``build_indexes`` rule). A float64 difference of ~1e-16 between
two machines then only matters if a value sits on a grid/table boundary.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

__all__ = [
    "EntropyCodingError",
    "MEAN_FRAC_BITS",
    "MEAN_SCALE",
    "get_scale_table",
    "index_bits",
    "pack_indices",
    "unpack_indices",
    "ckbd_anchor",
    "ckbd_nonanchor",
    "squeeze_anchor",
    "squeeze_nonanchor",
    "unsqueeze_anchor",
    "unsqueeze_nonanchor",
    "merge_squeezed",
    "snap_means",
    "fixed_to_float",
    "scale_indexes",
    "check_symbols",
    "y_hat_checksum",
]

MEAN_FRAC_BITS = 16
MEAN_SCALE = 1 << MEAN_FRAC_BITS  # means live on a grid of 2**-16
# |mean| and |symbol| limits: far beyond anything a trained model produces, and small enough that
# symbol * 2**16 + mean fits int64 and the symbol fits the rANS coder's int32 arithmetic.
MAX_ABS_MEAN = float(2**30)
MAX_ABS_SYMBOL = 2**30


class EntropyCodingError(RuntimeError):
    """The entropy coder could not produce (or reproduce) a decodable stream."""


# ---------------------------------------------------------------------------- tables and bit packing
def get_scale_table(min: float = 0.11, max: float = 256.0, levels: int = 64) -> torch.Tensor:
    """Log-spaced Gaussian scales, float32: ``exp(linspace(ln 0.11, ln 256, 64))`` (compressai default)."""
    return torch.exp(torch.linspace(math.log(min), math.log(max), levels))


def index_bits(codebook_size: int) -> int:
    """Bits per hyper-latent index: ceil(log2(codebook_size)), computed exactly on integers."""
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    return (int(codebook_size) - 1).bit_length()


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ValueError(f"bits per index must be in [1, 32], got {bits}")


def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers (row-major) at ``bits`` bits each, MSB first, zero-padded to a byte.

    The hyper-latent indices are uniform over the codebook in the reference's
    model (a uniform CDF), so fixed-width packing costs the same as entropy
    coding them and needs no coder at all.
    """
    _check_bits(bits)
    a = np.asarray(indices)
    if a.dtype.kind not in "iu":
        raise ValueError(f"indices must be integers, got dtype {a.dtype}")
    a = a.ravel().astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= (1 << bits)):
        raise ValueError(f"indices must be in [0, {1 << bits}) for {bits} bits, got min {a.min()}, max {a.max()}")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bit_matrix = ((a[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel()).tobytes()


def unpack_indices(data: bytes, count: int, bits: int, num_symbols: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_indices` -> int64 array of ``count`` indices.

    Raises ValueError if ``data`` does not have exactly ceil(count*bits/8)
    bytes, if the padding bits are not zero, or (with ``num_symbols``) if an
    index is >= num_symbols: each is a corrupt or foreign payload.
    """
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    expected = (count * bits + 7) // 8
    if len(data) != expected:
        raise ValueError(f"packed indices: expected {expected} bytes for {count} x {bits} bits, got {len(data)}")
    bit_array = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8))
    if bit_array[count * bits:].any():
        raise ValueError("packed indices: padding bits are not zero (corrupt payload)")
    weights = np.left_shift(np.int64(1), np.arange(bits - 1, -1, -1, dtype=np.int64))
    values = bit_array[: count * bits].reshape(count, bits).astype(np.int64) @ weights
    if num_symbols is not None and values.size and values.max() >= num_symbols:
        raise ValueError(f"packed indices: index {int(values.max())} out of range [0, {num_symbols})")
    return values


# ---------------------------------------------------------------------------- checkerboard
def _check_even(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.size(2) % 2 or x.size(3) % 2:
        raise ValueError(f"checkerboard needs a [B, C, H, W] tensor with even H and W, got {tuple(x.shape)}")


def ckbd_anchor(y: torch.Tensor) -> torch.Tensor:
    """``y`` at anchor positions ((row+col) odd), zero elsewhere (differentiable)."""
    out = torch.zeros_like(y)
    out[:, :, 0::2, 1::2] = y[:, :, 0::2, 1::2]
    out[:, :, 1::2, 0::2] = y[:, :, 1::2, 0::2]
    return out


def ckbd_nonanchor(y: torch.Tensor) -> torch.Tensor:
    """``y`` at non-anchor positions ((row+col) even), zero elsewhere (differentiable)."""
    out = torch.zeros_like(y)
    out[:, :, 0::2, 0::2] = y[:, :, 0::2, 0::2]
    out[:, :, 1::2, 1::2] = y[:, :, 1::2, 1::2]
    return out


def _squeeze(y: torch.Tensor, even_row_col: int) -> torch.Tensor:
    _check_even(y)
    b, c, h, w = y.shape
    out = y.new_empty(b, c, h, w // 2)
    out[:, :, 0::2] = y[:, :, 0::2, even_row_col::2]
    out[:, :, 1::2] = y[:, :, 1::2, 1 - even_row_col::2]
    return out


def _unsqueeze(x: torch.Tensor, even_row_col: int) -> torch.Tensor:
    b, c, h, w2 = x.shape
    if h % 2:
        raise ValueError(f"squeezed checkerboard map needs an even height, got {tuple(x.shape)}")
    out = x.new_zeros(b, c, h, 2 * w2)
    out[:, :, 0::2, even_row_col::2] = x[:, :, 0::2]
    out[:, :, 1::2, 1 - even_row_col::2] = x[:, :, 1::2]
    return out


def squeeze_anchor(y: torch.Tensor) -> torch.Tensor:
    """Anchor values of ``y`` [B, C, H, W] packed into [B, C, H, W/2] (reference order)."""
    return _squeeze(y, 1)


def squeeze_nonanchor(y: torch.Tensor) -> torch.Tensor:
    """Non-anchor values of ``y`` [B, C, H, W] packed into [B, C, H, W/2] (reference order)."""
    return _squeeze(y, 0)


def unsqueeze_anchor(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze_anchor`; non-anchor positions are zero."""
    return _unsqueeze(x, 1)


def unsqueeze_nonanchor(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze_nonanchor`; anchor positions are zero."""
    return _unsqueeze(x, 0)


def merge_squeezed(anchor: torch.Tensor, nonanchor: torch.Tensor) -> torch.Tensor:
    """Full [B, C, H, W] map from its squeezed anchor and non-anchor halves."""
    if anchor.shape != nonanchor.shape:
        raise ValueError(f"anchor {tuple(anchor.shape)} and non-anchor {tuple(nonanchor.shape)} shapes differ")
    b, c, h, w2 = anchor.shape
    out = anchor.new_empty(b, c, h, 2 * w2)
    out[:, :, 0::2, 1::2] = anchor[:, :, 0::2]
    out[:, :, 1::2, 0::2] = anchor[:, :, 1::2]
    out[:, :, 0::2, 0::2] = nonanchor[:, :, 0::2]
    out[:, :, 1::2, 1::2] = nonanchor[:, :, 1::2]
    return out


# ---------------------------------------------------------------------------- deterministic parameters
def snap_means(means: torch.Tensor) -> torch.Tensor:
    """float64 means -> int64 fixed point on the 2**-16 grid: ``round(mu * 65536)`` (half to even).

    The value of the snapped mean is ``fixed / 65536``, exactly representable,
    so ``round(y - mu) + mu`` is exact and the same on both sides.
    """
    if means.dtype != torch.float64:
        raise TypeError(f"snap_means expects float64 means (the deterministic path), got {means.dtype}")
    if not bool(torch.isfinite(means).all()):
        raise EntropyCodingError("entropy parameters: non-finite mean (NaN/inf in the entropy-parameter nets)")
    peak = float(means.abs().max()) if means.numel() else 0.0
    if peak > MAX_ABS_MEAN:
        raise EntropyCodingError(
            f"entropy parameters: |mean| = {peak:.3g} exceeds the codable range {MAX_ABS_MEAN:.3g}")
    return torch.round(means * MEAN_SCALE).to(torch.int64)


def fixed_to_float(fixed: torch.Tensor) -> torch.Tensor:
    """int64 fixed point (2**-16 grid) -> exact float64 value."""
    return fixed.to(torch.float64) / MEAN_SCALE


def scale_indexes(scales: torch.Tensor, scale_table: torch.Tensor, lower_bound: float) -> torch.Tensor:
    """CDF-table index of each scale, compressai's ``build_indexes`` rule evaluated in float64.

    ``index = len(table) - 1 - #{s in table[:-1] : scale <= s}`` after
    ``scale = max(scale, lower_bound)``; for an ascending table this is the
    number of entries of ``table[:-1]`` strictly below the scale (searchsorted).
    The table itself (float32 values) converts to float64 exactly.
    """
    if scales.dtype != torch.float64:
        raise TypeError(f"scale_indexes expects float64 scales (the deterministic path), got {scales.dtype}")
    if not bool(torch.isnan(scales).logical_not().all()):
        raise EntropyCodingError("entropy parameters: NaN scale (NaN in the entropy-parameter nets)")
    table = scale_table.to(device=scales.device, dtype=torch.float64).contiguous()
    if table.numel() < 1 or bool((table[1:] < table[:-1]).any()):
        raise ValueError(f"scale table must be non-empty and ascending, got {table.tolist()}")
    s = torch.clamp_min(scales, float(lower_bound)).contiguous()
    idx = torch.searchsorted(table[:-1], s.reshape(-1), right=False)
    return idx.reshape(s.shape).to(torch.int64)


def check_symbols(symbols: torch.Tensor) -> None:
    """Refuse symbols the rANS coder cannot represent (they come from absurd latents)."""
    if symbols.numel() and int(symbols.abs().max()) > MAX_ABS_SYMBOL:
        raise EntropyCodingError(
            f"latent symbol magnitude {int(symbols.abs().max())} exceeds {MAX_ABS_SYMBOL}; input features out of range"
        )


def y_hat_checksum(y_hat_fixed: torch.Tensor) -> int:
    """CRC32 of one image's y_hat in int64 fixed point [M, H, W] (little-endian, C order).

    Fixed point rather than float bytes: it is canonical (no -0.0 vs 0.0).
    """
    arr = y_hat_fixed.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return zlib.crc32(arr.tobytes()) & 0xFFFFFFFF
