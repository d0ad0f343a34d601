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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.images import DEFAULT_MAX_PIXELS, SampleFailure, decode_image

from ..codec import DEFAULT_MODEL, MODEL_ENV, add_tile_batch_option, default_model, load_codec
from ..exits import EXIT_OK, FailedError, UsageError, run_command
from ..options import at_least

HELP = 'compress one image file to an .rde bitstream (like cwebp)'

BITSTREAM_SUFFIX = ".rde"


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --device, --steps, --detail-scale and --tile-batch of ``encode`` and ``decode``."""
    p.add_argument("--model", default=default_model(), metavar="NAME_OR_DIR",
                   help=f"model directory or shipped name (default: ${MODEL_ENV} or {DEFAULT_MODEL!r})")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=at_least(0), default=None, metavar="S",
                   help="denoising steps (encode: stored as the decoder default; decode: override)")
    p.add_argument("--detail-scale", type=_non_negative_float, default=None, metavar="X",
                   help="detail scale (encode: stored as the decoder default; decode: override)")
    add_tile_batch_option(p)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def read_input(args: argparse.Namespace, suffix: str) -> tuple[Path, Path, bytes]:
    """(IN, OUT: ``-o`` or IN with ``suffix``, the bytes of IN); FailedError when IN cannot be read."""
    src = Path(args.input)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise FailedError(f"cannot read {str(src)!r}: {exc.strerror or exc}") from None
    return src, Path(args.output) if args.output else src.with_suffix(suffix), data


def add_file_command(subparsers: Any, name: str, help: str, doc: str | None, body: Callable[[argparse.Namespace], int],
                     input_: tuple[str, str], output: tuple[str, str]) -> argparse.ArgumentParser:
    """A one-file command (``encode``, ``decode``): IN and ``-o OUT`` (``(metavar, help)`` each), the model
    options, and ``body(args)`` run by ``run_command``."""
    p = subparsers.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar=input_[0], help=input_[1])
    p.add_argument("-o", "--output", metavar=output[0], default=None, help=output[1])
    add_model_options(p)
    p.set_defaults(func=lambda args: run_command(name, lambda: body(args)))
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_file_command(subparsers, "encode", HELP, __doc__, encode_file,
                         ("IN", "image file (PNG, JPEG, WebP, TIFF, ...)"),
                         ("OUT.rde", f"bitstream file to write (default: IN with suffix {BITSTREAM_SUFFIX})"))
    p.add_argument("--seed", type=at_least(0), default=None,
                   help="decoder noise seed stored in the header (default: derived from the payload)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (decompression-bomb guard)")
    return p


def encode_file(args: argparse.Namespace) -> int:
    from rdeic_core.bitstream import bits_per_pixel

    src, out, data = read_input(args, BITSTREAM_SUFFIX)
    try:
        image = decode_image(data, max_pixels=args.max_pixels)
    except SampleFailure as exc:
        raise FailedError(f"{src} is not a usable image ({exc.reason}): {exc.message}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    codec = load_codec(args.model, args.device, args.tile_batch)
    t0 = time.perf_counter()
    try:
        stream = codec.encode([image.pixels], steps=args.steps, detail_scale=args.detail_scale, seed=args.seed)[0]
    except (ValueError, MemoryError) as exc:
        raise FailedError(f"the codec refused {src}: {exc}") from None
    seconds = time.perf_counter() - t0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(stream)
    except OSError as exc:
        raise FailedError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    bpp = bits_per_pixel(stream, image.height, image.width)
    print(f"{src} ({image.width}x{image.height} {image.mode}) -> {out}: {len(stream)} bytes, {bpp:.4f} bpp "
          f"in {seconds:.2f}s (model {codec.config.name}, fingerprint {codec.fingerprint.hex()[:8]})")
    return EXIT_OK
