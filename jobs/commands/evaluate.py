"""``rdeic evaluate``: rate-distortion of RDEIC models against JPEG and WebP on a folder of images.

    rdeic evaluate --images data/photos/val768 --model mini
    rdeic evaluate --images DIR --model mini-lo --model mini --model mini-hi --out outputs/evaluate/mini
    rdeic evaluate --images DIR --model lo=runs/mini/mini-lo/stage2/model   # LABEL=DIR
    rdeic evaluate --images DIR --model mini --tile-batch 1               # least codec memory
    python -m jobs.commands.evaluate ...                 # the same

Each image is encoded once per model and decoded at every S of ``--steps`` (S = 0 decodes the
compressed latent c_latent with the VAE, without diffusion). JPEG (quality 1..95) and WebP
(quality 0..100) come from Pillow at its default settings, on the same images. bpp counts the
actual bytes; PSNR and MS-SSIM are measured on uint8 RGB; every curve is the mean over the images,
and each model point is matched to the baselines by interpolating them at its bpp (definitions:
``jobs/rd_eval.py``).

Writes rd.md (the table, also printed), rd.csv (the curves), rd_per_image.csv, rd.json and
rd.png (PSNR and MS-SSIM against bpp) to ``--out``.

Exit status: 0 on success, 2 for a usage error (no images, unknown model, bad option value).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import rd_eval
from ..codec import DEFAULT_MODEL, add_tile_batch_option, load_codec
from ..exits import EXIT_OK, UsageError, run_command

HELP = 'evaluate a codec on an image set (rate/distortion/perception)'


def int_list(text: str) -> list[int]:
    """``"0,2,5"`` or ranges ``"1-95"`` / ``"0-100:5"`` (start-stop[:step], inclusive), comma separated."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                rng, _, step = part.partition(":")
                a, b = rng.split("-", 1)
                out += list(range(int(a), int(b) + 1, int(step) if step else 1))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers or ranges like 0,2,5 or 1-95:2, got {text!r}") from None
    return out


def model_label(arg: str) -> tuple[str, str]:
    """``LABEL=NAME|DIR`` or ``NAME|DIR`` (labelled by its last path component) -> (label, model)."""
    label, sep, path = arg.partition("=")
    if sep and label and path:
        return label, path
    return Path(arg).name or arg, arg


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``rdeic evaluate`` (the hook jobs/cli.py calls)."""
    p = subparsers.add_parser("evaluate", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (png, jpg, webp, ...)")
    p.add_argument("--model", action="append", default=None, metavar="[LABEL=]NAME|DIR",
                   help=f"model to evaluate; repeat for several rate points (default: {DEFAULT_MODEL})")
    p.add_argument("--steps", type=int_list, default=list(rd_eval.DEFAULT_STEPS), metavar="S,S,...",
                   help="decoder sampler steps to evaluate (default: 0,2,5; 0 = c_latent without diffusion)")
    p.add_argument("--jpeg-qualities", type=int_list, default=list(rd_eval.DEFAULT_JPEG_QUALITIES), metavar="Q",
                   help="JPEG quality sweep (default 1-95; empty string: no JPEG)")
    p.add_argument("--webp-qualities", type=int_list, default=list(rd_eval.DEFAULT_WEBP_QUALITIES), metavar="Q",
                   help="WebP quality sweep (default 0-100; empty string: no WebP)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: outputs/evaluate/<model>)")
    p.add_argument("--max-bpp", type=float, default=1.0, help="right end of the plot's bpp axis")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    add_tile_batch_option(p)
    p.set_defaults(func=lambda args: run_command("evaluate", lambda: run(args)))
    return p


def _check(args: argparse.Namespace) -> None:
    if any(s < 0 for s in args.steps) or not args.steps:
        raise UsageError(f"--steps must be non-negative integers, got {args.steps}")
    if any(not 0 <= q <= 100 for q in args.jpeg_qualities + args.webp_qualities):
        raise UsageError("qualities must lie in 0..100")
    if args.max_bpp <= 0:
        raise UsageError(f"--max-bpp must be > 0, got {args.max_bpp}")


def run(args: argparse.Namespace) -> int:
    import torch

    _check(args)
    try:
        images = rd_eval.load_images(args.images)
    except FileNotFoundError as exc:  # no such folder, or no images in it
        raise UsageError(str(exc)) from None
    models = {}
    for m in args.model or [DEFAULT_MODEL]:
        label, path = model_label(m)
        if label in models:
            raise UsageError(f"two --model arguments are labelled {label!r}; use LABEL=DIR to tell them apart")
        models[label] = load_codec(path, "cpu", args.tile_batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("outputs") / "evaluate" / "+".join(models)
    report = rd_eval.evaluate(images, models, args.steps, args.jpeg_qualities, args.webp_qualities,
                              progress=lambda m: print(f"rdeic evaluate: {m}", file=sys.stderr, flush=True))
    title = f"{', '.join(models)} on {Path(args.images)} ({len(images)} images)"
    paths = rd_eval.save_report(report, out, args.max_bpp, title)
    print(report.markdown)
    print(f"rdeic evaluate: wrote {', '.join(str(p) for p in paths.values())}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.commands.evaluate ARGS``: the same as ``rdeic evaluate ARGS``."""
    from ..cli import main as rdeic

    return rdeic(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
