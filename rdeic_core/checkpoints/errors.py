"""Errors of checkpoint loading and conversion.

They subclass ValueError so callers that already catch bad-input errors keep
working; every message names the offending file, key or shape, because a
silently half-loaded model (DiffEIC #28: renamed compressai buffers, 10x the
bitrate, no error) is the failure this package exists to prevent.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded or converted as it is."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle needs code beyond tensors and plain containers; it is never executed."""
