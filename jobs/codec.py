"""The RDEIC codec behind the pipeline's ``EncoderFactory`` / ``Encoder`` protocols.

Jobs are the one place that knows both sides: ``pipeline`` sees only images -> bytes and an
identity; ``rdeic_core`` sees only arrays. The factory is a frozen dataclass holding a model name
or directory (never weights), so it pickles cheaply to every Ray worker, and each worker loads the
model itself, once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.encoder import CodecIdentity

from .config import TILE_BATCH_HELP

MODEL_CONFIG_FILE = "config.json"
VERSIONED_PACKAGES = ("rdeic-archive", "torch", "diffusers", "compressai", "numpy", "pillow", "pyarrow",
                      "fsspec", "s3fs", "ray")


def library_versions() -> dict[str, str]:
    """Installed versions of what shapes the archive bytes (and the Python that ran it)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_tile_batch_option(p: argparse.ArgumentParser) -> None:
    """``--tile-batch N`` (dest ``tile_batch``; None keeps the codec's default): every command that runs the codec."""
    p.add_argument("--tile-batch", type=positive_int, default=None, metavar="N", help=TILE_BATCH_HELP)


def check_tile_batch(tile_batch: int | None) -> int | None:
    """``tile_batch`` if it is None or an int >= 1; ValueError naming the flag otherwise."""
    if tile_batch is not None and (isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1):
        raise ValueError(f"--tile-batch must be an integer >= 1, got {tile_batch!r}")
    return tile_batch


def apply_tile_batch(codec: Any, tile_batch: int | None) -> Any:
    """Set the codec's memory bound (``codec.tiling.batch``: tiles per network pass); None leaves its default.

    Only the batch changes, never the tile grid, so which pixels are computed stays the same.
    Returns ``codec``.
    """
    if check_tile_batch(tile_batch) is not None:
        codec.tiling = dataclasses.replace(codec.tiling, batch=tile_batch)
    return codec


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    return device


def _describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"


class RDEICEncoder:
    """A loaded RDEIC codec; every bitstream's header is checked against the image it encodes."""

    def __init__(self, codec: Any, device: str) -> None:
        self.codec = codec
        self.fingerprint: bytes = codec.fingerprint
        self.device = _describe_device(device)

    def encode(self, images: Sequence[np.ndarray]) -> list[bytes]:
        from rdeic_core.bitstream import peek_header

        streams = self.codec.encode(list(images))
        for image, stream in zip(images, streams):
            header = peek_header(stream)
            if (header.height, header.width) != image.shape[:2] or header.fingerprint != self.fingerprint[:4]:
                # A codec bug, not a property of this image: fail the shard loudly.
                raise RuntimeError(
                    f"codec wrote a header for {header.width}x{header.height} by model {header.fingerprint.hex()} "
                    f"for an image of {image.shape[1]}x{image.shape[0]} (model {self.fingerprint[:4].hex()})"
                )
        return streams


@dataclass(frozen=True)
class RDEICEncoderFactory:
    """Args:
        model: a model directory written by ``RDEICCodec.save_pretrained`` or a shipped model name.
        compute_dtype: torch dtype name for the VAE/UNet on GPU (e.g. ``bfloat16``); CPU always
            runs float32. None keeps float32 everywhere.
        tile_batch: tiles per network pass of every codec this factory loads (``codec.tiling.batch``,
            the memory bound; ``--tile-batch``). None keeps the codec's default.
    """

    model: str
    compute_dtype: str | None = None
    tile_batch: int | None = None

    def __post_init__(self) -> None:
        check_tile_batch(self.tile_batch)

    def _model_dir(self) -> Path | None:
        path = Path(self.model).expanduser()
        return path.resolve() if path.is_dir() else None

    def identity(self) -> CodecIdentity:
        """Identity from the model's config.json when it is a directory (no weights loaded), else by loading."""
        from rdeic_core import __version__ as codec_version
        from rdeic_core.bitstream import VERSION as bitstream_version

        model_dir = self._model_dir()
        meta: dict[str, Any] = {}
        if model_dir is not None:
            config_path = model_dir / MODEL_CONFIG_FILE
            if not config_path.is_file():
                raise FileNotFoundError(f"model directory {model_dir} has no {MODEL_CONFIG_FILE}")
            meta = json.loads(config_path.read_text())
        name = meta.get("config", {}).get("name")
        fingerprint, digest = meta.get("fingerprint"), meta.get("entropy_table_digest")
        if not (name and fingerprint and digest):
            codec = self._load_codec()
            name, fingerprint = codec.config.name, codec.fingerprint.hex()
            digest = codec.compression.entropy_table_digest()
        hashes = ({p.name: _sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file()}
                  if model_dir is not None else {})
        return CodecIdentity(name=name, fingerprint=fingerprint, entropy_table_digest=digest,
                             codec_version=codec_version, bitstream_version=str(bitstream_version),
                             model_hashes=hashes, versions=library_versions())

    def _load_codec(self) -> Any:
        from rdeic_core import RDEICCodec

        return apply_tile_batch(RDEICCodec.from_pretrained(self._model_dir() or self.model), self.tile_batch)

    def load(self, device: str = "auto") -> RDEICEncoder:
        """Load the model onto ``device`` (``auto``: CUDA if this process sees a GPU, else CPU float32)."""
        return RDEICEncoder(*self._load_placed(device))

    def _load_placed(self, device: str) -> tuple[Any, str]:
        """(codec, resolved device): the model on the device, in ``compute_dtype`` on CUDA, float32 on CPU."""
        import torch

        resolved = _resolve_device(device)
        codec = self._load_codec()
        if resolved.startswith("cuda") and self.compute_dtype:
            codec.to(resolved, getattr(torch, self.compute_dtype))
        else:
            codec.to(resolved)
        return codec, resolved
