"""``rdeic convert``: official SD 2.1 + RDEIC checkpoints -> a model directory ``RDEICCodec`` loads.

    rdeic convert --sd v2-1_512-ema-pruned.ckpt --rdeic rdeic_2_step2.ckpt -o models/rdeic-2-step2

The directory gets ``config.json`` + ``model.safetensors`` (what
``RDEICCodec.from_pretrained`` reads), ``README.md`` (model card with the
sha256 of every input) and ``conversion_report.json`` (where every source
tensor went). Nothing is downloaded; pickles are read with
``torch.load(weights_only=True)``. Any unexplained key, unfilled parameter or
shape mismatch stops the conversion with a list of them (exit status 1).
See docs/weights.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..exits import EXIT_OK, EXIT_USAGE, PlainError, run_command

HELP = 'convert the official SD 2.1 + RDEIC checkpoints into a model directory'


def register(subparsers: Any) -> None:
    """Add the ``convert`` subcommand (its ``func`` runs :func:`run`)."""
    p = subparsers.add_parser("convert", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", required=True, metavar="PATH",
                   help="SD 2.1-base: v2-1_512-ema-pruned.ckpt / .safetensors (LDM layout) or a diffusers folder")
    p.add_argument("--rdeic", required=True, metavar="PATH",
                   help="RDEIC checkpoint (rdeic_<lambda>_step<S>.ckpt, or its state dict as .safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--context", default=None, metavar="PATH",
                   help="empty-prompt embedding [1,77,1024] as a tensor file "
                        "(default: computed from the SD checkpoint's OpenCLIP text tower)")
    p.add_argument("--config", default=None, metavar="NAME_OR_JSON",
                   help="explicit architecture (named config, CodecConfig JSON or model dir); "
                        "default: inferred from the tensor shapes")
    p.add_argument("--hint", action="append", default=[], metavar="NAME=VALUE",
                   help="architecture numbers that shapes do not show, e.g. unet_head_channels=64 "
                        "(see ArchHints; repeatable)")
    p.add_argument("--name", default=None, help="model name stored in the config (default: the RDEIC file's stem)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(func=lambda args: run_command("convert", lambda: run(args)))


add_parser = register  # the name jobs/cli.py looks up


def run(args: argparse.Namespace) -> int:
    """Convert; 0 on success, 1 on a checkpoint problem (the message lists every offending key), 2 on usage."""
    from rdeic_core.checkpoints import ArchHints, CheckpointError, convert

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise PlainError(f"{out} exists and is not empty (use --force to overwrite)", EXIT_USAGE)
    try:
        hints = ArchHints.from_pairs(args.hint)
    except ValueError as e:
        raise PlainError(str(e), EXIT_USAGE) from None
    try:
        report = convert(args.sd, args.rdeic, out, context=args.context, config=args.config, hints=hints,
                         name=args.name)
    except CheckpointError as e:
        raise PlainError(str(e)) from None
    mapped = sum(len(f.mapped) for f in report.files)
    ignored = sum(len(f.ignored) for f in report.files)
    rebuilt = sum(len(f.rebuilt) for f in report.files)
    print(f"wrote {out}: {mapped} tensors mapped, {rebuilt} entropy tables rebuilt, {ignored} ignored by rule, "
          f"context from {report.context.get('from')}; architecture {report.config_source}")
    if report.overridden_differing:
        print(f"note: {len(report.overridden_differing)} tensors differ between the SD and RDEIC files; the RDEIC "
              "file's values were used (as the reference does)", file=sys.stderr)
    return EXIT_OK
