"""The RDEIC codec behind the pipeline's encoder and decoder protocols, and the one way jobs load it.

Jobs are the one place that knows both sides: ``pipeline`` sees only images -> bytes (and back)
and an identity; ``rdeic_core`` sees only arrays. The two factories are frozen dataclasses holding
a model name or directory (never weights), so they pickle cheaply to every Ray worker, and each
worker loads the model itself, once.

One model loader (:func:`load_codec`: the factories, ``rdeic encode``/``decode``/``evaluate``/``get``)
and one device rule (:func:`resolve_device`), so every command reads ``--model``, ``--device`` and
``--tile-batch`` the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.decoder import RejectedStream, StreamDecodeError, StreamInfo
from pipeline.encoder import CodecIdentity

from .exits import UsageError
from .options import MODEL_ENV, TILE_BATCH_HELP, at_least

if TYPE_CHECKING:
    from pipeline.archives import ArchiveLocation

MODEL_CONFIG_FILE = "config.json"
DEFAULT_MODEL = "mini"
VERSIONED_PACKAGES = ("rdeic-archive", "torch", "diffusers", "compressai", "numpy", "pillow", "pyarrow",
                      "fsspec", "s3fs", "ray")


class ModelLoadError(UsageError):
    """The codec cannot be loaded as asked (``--model``, ``--device``, ``--tile-batch``); the message
    names the flag. Exit 2."""


# ------------------------------------------------------------------------------------ which model, where
def default_model() -> str:
    """``$RDEIC_MODEL`` or the shipped default (the model ``rdeic archive`` and ``encode`` use)."""
    return os.environ.get(MODEL_ENV, DEFAULT_MODEL)


def resolve_model(explicit: str | None, run: dict[str, Any]) -> str:
    """``--model``, else ``$RDEIC_MODEL``, else the model recorded in the archive's run.json."""
    if explicit:
        return explicit
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    model = (run.get("job") or {}).get("model")
    if not model:
        raise ValueError("the archive's run.json names no model; pass --model")
    return str(model)


def resolve_device(device: str) -> str:
    """``auto``: CUDA if this process sees a GPU, else CPU; ``cuda``/``cuda:N`` without CUDA: ModelLoadError."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device!r} requested but CUDA is not available here")
    return device


def _describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"


def _model_dir(model: str) -> Path | None:
    path = Path(model).expanduser()
    return path.resolve() if path.is_dir() else None


def load_codec(model: str, device: str = "auto", tile_batch: int | None = None,
               compute_dtype: str | None = None) -> Any:
    """``RDEICCodec.from_pretrained(model)`` (a model directory or a shipped name) on ``device``
    (:func:`resolve_device`), with ``tiling.batch`` set to ``tile_batch`` (None: the codec's default).

    ``compute_dtype`` (a torch dtype name, e.g. ``bfloat16``) is the VAE/UNet dtype on CUDA; CPU
    always runs float32. ModelLoadError says what is wrong.
    """
    import torch

    from rdeic_core import RDEICCodec

    resolved = resolve_device(device)
    try:
        codec = RDEICCodec.from_pretrained(_model_dir(model) or model)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"--model {model!r}: {exc}") from None
    try:
        apply_tile_batch(codec, tile_batch)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if compute_dtype and resolved.startswith("cuda"):
        return codec.to(resolved, getattr(torch, compute_dtype))
    return codec.to(resolved)


# ------------------------------------------------------------------------------------ flags
positive_int = at_least(1)  # argparse type of --tile-batch


def add_tile_batch_option(p: argparse.ArgumentParser) -> None:
    """``--tile-batch N`` (dest ``tile_batch``; None keeps the codec's default): every command that runs the codec."""
    p.add_argument("--tile-batch", type=positive_int, default=None, metavar="N", help=TILE_BATCH_HELP)


def add_decode_overrides(p: argparse.ArgumentParser) -> None:
    """--steps / --detail-scale of restore, audit and get: override what each bitstream header says."""
    p.add_argument("--steps", type=int, default=None, help="relay steps (default: each bitstream header's)")
    p.add_argument("--detail-scale", type=float, default=None, help="detail scale (default: each header's)")


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


# ------------------------------------------------------------------------------------ identity
def library_versions() -> dict[str, str]:
    """Installed versions of what shapes the archive bytes (and the Python that ran it)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ the adapters
class _LoadedCodec:
    """A codec loaded on a device, as the executors see a model: its fingerprint and where it runs."""

    def __init__(self, codec: Any, device: str) -> None:
        self.codec = codec
        self.fingerprint: bytes = codec.fingerprint
        self.placement = device  # the torch device it runs on (``device`` describes it for markers and logs)
        self.device = _describe_device(device)


class RDEICEncoder(_LoadedCodec):
    """``pipeline.encoder.Encoder`` over a loaded codec; every bitstream's header is checked against its image."""

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


class RDEICDecoder(_LoadedCodec):
    """``pipeline.decoder.Decoder`` over a loaded codec: codec errors become per-stream reasons."""

    def inspect(self, bitstream: bytes, steps: int | None = None, detail_scale: float | None = None) -> StreamInfo:
        from rdeic_core.bitstream import BitstreamError, ModelMismatchError
        from rdeic_core.images import padded_size

        try:
            header = self.codec.parse(bitstream).header
        except ModelMismatchError as exc:
            raise RejectedStream("foreign_model", str(exc)) from None
        except BitstreamError as exc:
            raise RejectedStream("corrupt_bitstream", str(exc)) from None
        s = header.steps if steps is None else int(steps)
        d = header.detail_scale if detail_scale is None else float(detail_scale)
        ph, pw = padded_size(header.height, header.width, self.codec.config.pad_multiple)
        # streams decoded whole batch by padded size; tiled ones share tile batches whatever their size
        size_key = tuple(header.z_shape) if self.codec.fits_untiled(header.z_shape) else "tiled"
        return StreamInfo(width=header.width, height=header.height, steps=s, detail_scale=d,
                          bucket=(size_key, s, d), pixels=ph * pw)

    def decode(self, bitstreams: Sequence[bytes], steps: int | None = None,
               detail_scale: float | None = None) -> list[np.ndarray]:
        from rdeic_core.entropy import EntropyCodingError

        try:
            return self.codec.decode(list(bitstreams), steps=steps, detail_scale=detail_scale)
        except (ValueError, EntropyCodingError, MemoryError) as exc:
            raise StreamDecodeError(f"{type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                raise StreamDecodeError(f"out of device memory: {exc}") from exc
            raise


@dataclass(frozen=True)
class CodecFactory:
    """The recipe of a codec every worker loads (picklable: a name or directory, never weights).

    Args:
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

    def identity(self) -> CodecIdentity:
        """Identity from the model's config.json when it is a directory (no weights loaded), else by loading."""
        from rdeic_core import __version__ as codec_version
        from rdeic_core.bitstream import VERSION as bitstream_version

        model_dir = _model_dir(self.model)
        meta: dict[str, Any] = {}
        if model_dir is not None:
            config_path = model_dir / MODEL_CONFIG_FILE
            if not config_path.is_file():
                raise FileNotFoundError(f"model directory {model_dir} has no {MODEL_CONFIG_FILE}")
            meta = json.loads(config_path.read_text())
        name = meta.get("config", {}).get("name")
        fingerprint, digest = meta.get("fingerprint"), meta.get("entropy_table_digest")
        if not (name and fingerprint and digest):
            codec = load_codec(self.model, "cpu")
            name, fingerprint = codec.config.name, codec.fingerprint.hex()
            digest = codec.compression.entropy_table_digest()
        hashes = ({p.name: _sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file()}
                  if model_dir is not None else {})
        return CodecIdentity(name=name, fingerprint=fingerprint, entropy_table_digest=digest,
                             codec_version=codec_version, bitstream_version=str(bitstream_version),
                             model_hashes=hashes, versions=library_versions())

    def _load_placed(self, device: str) -> tuple[Any, str]:
        """(codec, resolved device): the model on ``device`` (``auto``: CUDA if this process sees a GPU), in
        ``compute_dtype`` on CUDA, float32 on CPU."""
        resolved = resolve_device(device)
        return load_codec(self.model, resolved, self.tile_batch, self.compute_dtype), resolved


@dataclass(frozen=True)
class RDEICEncoderFactory(CodecFactory):
    """The archive's encoder factory: ``identity`` is the codec's, ``load`` gives an :class:`RDEICEncoder`."""

    def load(self, device: str = "auto") -> RDEICEncoder:
        return RDEICEncoder(*self._load_placed(device))


@dataclass(frozen=True)
class RDEICDecoderFactory(CodecFactory):
    """The decoding side of the same recipe: ``load`` gives an :class:`RDEICDecoder`."""

    def load(self, device: str = "auto") -> RDEICDecoder:
        return RDEICDecoder(*self._load_placed(device))


def open_archive(url: str, storage_options: dict[str, Any], model: str | None, compute_dtype: str | None,
                 tile_batch: int | None = None) -> tuple[ArchiveLocation, dict[str, Any], RDEICDecoderFactory, str]:
    """(archive, its run.json, a decoder factory of the archive's codec, fingerprint); ValueError if not.

    ``model`` as :func:`resolve_model`; ``tile_batch`` (``--tile-batch``) becomes ``tiling.batch`` of
    every codec the factory loads.
    """
    from pipeline.archives import ArchiveLocation

    archive = ArchiveLocation(url, storage_options)
    run = archive.read_run()
    expected = (run.get("codec") or {}).get("fingerprint")
    factory = RDEICDecoderFactory(resolve_model(model, run), compute_dtype, tile_batch)
    try:
        identity = factory.identity()
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"--model {factory.model!r}: {exc}") from None
    if expected and identity.fingerprint != expected:
        raise ValueError(f"model {factory.model!r} has codec fingerprint {identity.fingerprint}, but {url} was "
                         f"archived with {expected}; pass the --model that wrote it")
    return archive, run, factory, identity.fingerprint
