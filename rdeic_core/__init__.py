"""rdeic_core: the RDEIC codec as a library (no Ray, no S3, no Parquet here).

Public names are imported lazily so that ``import rdeic_core.bitstream`` (used
by pipeline code that only reads headers) does not pull in torch/diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RDEICCodec", "BitstreamError", "ModelMismatchError", "CodecConfig", "get_config", "TileConfig"]
__version__ = "0.1.0"

_LAZY = {
    "RDEICCodec": ".codec",
    "BitstreamError": ".bitstream",
    "ModelMismatchError": ".bitstream",
    "CodecConfig": ".config",
    "get_config": ".config",
    "TileConfig": ".tiling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'rdeic_core' has no attribute {name!r}")
