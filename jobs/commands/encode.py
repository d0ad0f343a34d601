"""``rdeic encode``: one image file -> one RDEIC bitstream file (like ``cwebp``).

    rdeic encode photo.png -o photo.rde [--model NAME_OR_DIR] [--steps S] [--detail-scale X] [--tile-batch N]

The image is read exactly as ``rdeic archive`` reads a shard member (EXIF orientation applied,
the codec's colour rule, the same pixel limit), so a file encoded here and the same file archived
give the same bitstream. ``--steps``/``--detail-scale`` are stored in the header as the decoder's
defaults. Prints the size and rate (bpp over the original pixels, header included).

Exit status: 0 on success, 1 when the input cannot be read or encoded, 2 for a usage error
(missing model, bad option value).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.images import DEFAULT_MAX_PIXELS, SampleFailure, decode_image

from ..codec import add_tile_batch_option, apply_tile_batch

HELP = 'compress one image file to an .rde bitstream (like cwebp)'

MODEL_ENV = "RDEIC_MODEL"
DEFAULT_MODEL = "mini"
BITSTREAM_SUFFIX = ".rde"
EXIT_OK, EXIT_INPUT, EXIT_USAGE = 0, 1, 2


class ModelLoadError(RuntimeError):
    """The model named by --model cannot be loaded (message says why)."""


def default_model() -> str:
    """``$RDEIC_MODEL`` or the shipped default, as ``rdeic archive`` does."""
    return os.environ.get(MODEL_ENV, DEFAULT_MODEL)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=default_model(), metavar="NAME_OR_DIR",
                   help=f"model directory or shipped name (default: ${MODEL_ENV} or {DEFAULT_MODEL!r})")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=_non_negative_int, default=None, metavar="S",
                   help="denoising steps (encode: stored as the decoder default; decode: override)")
    p.add_argument("--detail-scale", type=_non_negative_float, default=None, metavar="X",
                   help="detail scale (encode: stored as the decoder default; decode: override)")
    add_tile_batch_option(p)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def load_codec(model: str, device: str = "auto", tile_batch: int | None = None) -> Any:
    """``RDEICCodec.from_pretrained(model)`` on ``device`` (float32), ``tiling.batch`` set to ``tile_batch``
    (None: the codec's default); ModelLoadError says what is wrong."""
    import torch

    from rdeic_core import RDEICCodec

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device!r} requested but CUDA is not available here")
    try:
        codec = RDEICCodec.from_pretrained(model)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"--model {model!r}: {exc}") from None
    try:
        apply_tile_batch(codec, tile_batch)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    return codec.to(device)


def default_output(path: Path, suffix: str) -> Path:
    return path.with_suffix(suffix)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("encode", help="compress one image file to an .rde bitstream (like cwebp)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="image file (PNG, JPEG, WebP, TIFF, ...)")
    p.add_argument("-o", "--output", metavar="OUT.rde", default=None,
                   help=f"bitstream file to write (default: IN with suffix {BITSTREAM_SUFFIX})")
    add_model_options(p)
    p.add_argument("--seed", type=_non_negative_int, default=None,
                   help="decoder noise seed stored in the header (default: derived from the payload)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (decompression-bomb guard)")
    p.set_defaults(func=run)
    return p


def _fail(message: str, status: int) -> int:
    print(f"rdeic encode: error: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    from rdeic_core.bitstream import bits_per_pixel

    src = Path(args.input)
    out = Path(args.output) if args.output else default_output(src, BITSTREAM_SUFFIX)
    try:
        data = src.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {str(src)!r}: {exc.strerror or exc}", EXIT_INPUT)
    try:
        image = decode_image(data, max_pixels=args.max_pixels)
    except SampleFailure as exc:
        return _fail(f"{src} is not a usable image ({exc.reason}): {exc.message}", EXIT_INPUT)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        codec = load_codec(args.model, args.device, args.tile_batch)
    except ModelLoadError as exc:
        return _fail(str(exc), EXIT_USAGE)
    t0 = time.perf_counter()
    try:
        stream = codec.encode([image.pixels], steps=args.steps, detail_scale=args.detail_scale, seed=args.seed)[0]
    except (ValueError, MemoryError) as exc:
        return _fail(f"the codec refused {src}: {exc}", EXIT_INPUT)
    seconds = time.perf_counter() - t0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(stream)
    except OSError as exc:
        return _fail(f"cannot write {str(out)!r}: {exc.strerror or exc}", EXIT_INPUT)
    bpp = bits_per_pixel(stream, image.height, image.width)
    print(f"{src} ({image.width}x{image.height} {image.mode}) -> {out}: {len(stream)} bytes, {bpp:.4f} bpp "
          f"in {seconds:.2f}s (model {codec.config.name}, fingerprint {codec.fingerprint.hex()[:8]})")
    return EXIT_OK
