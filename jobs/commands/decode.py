"""``rdeic decode``: one RDEIC bitstream file -> one image file (like ``dwebp``).

    rdeic decode photo.rde -o photo.png [--model NAME_OR_DIR] [--steps S] [--detail-scale X] [--tile-batch N]

The bitstream's header says its size, the model that wrote it (first 4 bytes of its fingerprint)
and the default steps/detail scale; ``--steps``/``--detail-scale`` override those. A stream from
another model, a truncated or corrupted file is refused with a message, never decoded to garbage.
The output format follows the suffix of ``-o`` (PNG by default).

Exit status: 0 on success, 1 when the input is not a valid bitstream for this model, 2 for a
usage error (missing model, bad option value).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .encode import EXIT_INPUT, EXIT_OK, EXIT_USAGE, ModelLoadError, add_model_options, default_output, load_codec

HELP = 'decompress one .rde bitstream to a PNG (like dwebp)'

IMAGE_SUFFIX = ".png"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("decode", help="decompress one .rde bitstream to a PNG (like dwebp)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.rde", help="bitstream file written by `rdeic encode` or an archive row")
    p.add_argument("-o", "--output", metavar="OUT.png", default=None,
                   help=f"image to write; format from the suffix (default: IN with suffix {IMAGE_SUFFIX})")
    add_model_options(p)
    p.set_defaults(func=run)
    return p


def _fail(message: str, status: int) -> int:
    print(f"rdeic decode: error: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from rdeic_core.bitstream import BitstreamError, bits_per_pixel, peek_header

    src = Path(args.input)
    out = Path(args.output) if args.output else default_output(src, IMAGE_SUFFIX)
    try:
        stream = src.read_bytes()
    except OSError as exc:
        return _fail(f"cannot read {str(src)!r}: {exc.strerror or exc}", EXIT_INPUT)
    try:
        header = peek_header(stream)
    except (BitstreamError, ValueError) as exc:
        return _fail(f"{src} is not a valid RDEIC bitstream: {exc}", EXIT_INPUT)
    ext = out.suffix.lower().lstrip(".")
    if ext not in {e.lower().lstrip(".") for e in Image.registered_extensions()}:
        return _fail(f"cannot tell an image format from the output name {str(out)!r} (use e.g. .png)", EXIT_USAGE)
    try:
        codec = load_codec(args.model, args.device, args.tile_batch)
    except ModelLoadError as exc:
        return _fail(str(exc), EXIT_USAGE)
    t0 = time.perf_counter()
    try:
        pixels = codec.decode([stream], steps=args.steps, detail_scale=args.detail_scale)[0]
    except BitstreamError as exc:
        return _fail(f"cannot decode {src} with model {str(args.model)!r}: {exc}", EXIT_INPUT)
    seconds = time.perf_counter() - t0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out)
    except (OSError, ValueError, KeyError) as exc:
        return _fail(f"cannot write {str(out)!r}: {exc}", EXIT_INPUT)
    steps = header.steps if args.steps is None else args.steps
    print(f"{src} ({len(stream)} bytes, {bits_per_pixel(stream, header.height, header.width):.4f} bpp) -> {out}: "
          f"{header.width}x{header.height}, {steps} step(s) in {seconds:.2f}s")
    return EXIT_OK
