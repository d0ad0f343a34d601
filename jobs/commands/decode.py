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
import time
from typing import Any

from ..codec import load_codec
from ..exits import EXIT_OK, FailedError, UsageError
from .encode import add_file_command, read_input

HELP = 'decompress one .rde bitstream to a PNG (like dwebp)'

IMAGE_SUFFIX = ".png"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_file_command(subparsers, "decode", HELP, __doc__, decode_file,
                            ("IN.rde", "bitstream file written by `rdeic encode` or an archive row"),
                            ("OUT.png", "image to write; format from the suffix "
                                        f"(default: IN with suffix {IMAGE_SUFFIX})"))


def decode_file(args: argparse.Namespace) -> int:
    from PIL import Image

    from rdeic_core.bitstream import BitstreamError, bits_per_pixel, peek_header

    src, out, stream = read_input(args, IMAGE_SUFFIX)
    try:
        header = peek_header(stream)
    except (BitstreamError, ValueError) as exc:
        raise FailedError(f"{src} is not a valid RDEIC bitstream: {exc}") from None
    if out.suffix.lower().lstrip(".") not in {e.lower().lstrip(".") for e in Image.registered_extensions()}:
        raise UsageError(f"cannot tell an image format from the output name {str(out)!r} (use e.g. .png)")
    codec = load_codec(args.model, args.device, args.tile_batch)
    t0 = time.perf_counter()
    try:
        pixels = codec.decode([stream], steps=args.steps, detail_scale=args.detail_scale)[0]
    except BitstreamError as exc:
        raise FailedError(f"cannot decode {src} with model {str(args.model)!r}: {exc}") from None
    seconds = time.perf_counter() - t0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out)
    except (OSError, ValueError, KeyError) as exc:
        raise FailedError(f"cannot write {str(out)!r}: {exc}") from None
    steps = header.steps if args.steps is None else args.steps
    print(f"{src} ({len(stream)} bytes, {bits_per_pixel(stream, header.height, header.width):.4f} bpp) -> {out}: "
          f"{header.width}x{header.height}, {steps} step(s) in {seconds:.2f}s")
    return EXIT_OK
