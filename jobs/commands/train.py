"""rdeic train: one training stage of the RDEIC codec (resumable; see docs/training.md).

    rdeic train --stage vae    --config tiny        --run-dir runs/vae    --steps 20000 --crop 128
    rdeic train --stage prior  --init runs/vae/model --run-dir runs/prior  --steps 40000 --crop 128
    rdeic train --stage stage1 --init runs/prior/model --run-dir runs/s1 --lambda-g 2 --crop 128
    rdeic train --stage stage2 --init runs/s1/model --run-dir runs/s2-2 --fixed-step 2 --crop 128

Re-running the same command resumes from the latest checkpoint in --run-dir. Each stage ends
by writing RUN/model (``RDEICCodec.save_pretrained``), the --init of the next stage. For
several GPUs: ``torchrun --nproc_per_node=G -m jobs.commands.train --stage ... ``(DDP, batch per GPU).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..exits import EXIT_INTERRUPTED, EXIT_OK, PlainError, UsageError, run_command

HELP = "train an RDEIC codec (stages of the paper's schedule)"

STAGE_CHOICES = ("vae", "prior", "stage1", "stage2")


def _scale_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--scale-range must be MIN_FRAC,MAX_FRAC (e.g. 0.8,1.0), got {text!r}") from None
    return lo, hi


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``rdeic`` subparsers object."""
    p = subparsers.add_parser("train", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=STAGE_CHOICES)
    p.add_argument("--run-dir", required=True, metavar="DIR", help="checkpoints, log.jsonl and the result model/")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default="tiny", metavar="NAME|DIR",
                     help="architecture of a fresh (random) model: tiny, sd21 or a model dir (default: tiny)")
    src.add_argument("--init", default=None, metavar="DIR",
                     help="start from this saved model (previous stage's RUN/model)")
    p.add_argument("--control-ratio", type=float, default=None, metavar="R",
                   help="stage1: build a fresh control module R times the UNet's width (default: the init "
                        "model's; sd21 uses 0.2)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps of this stage")
    p.add_argument("--batch", type=int, default=4, help="crops per step and process (reference: 4)")
    p.add_argument("--lr", type=float, default=None, help="AdamW lr (default: vae/prior/stage1 1e-4, stage2 2e-5)")
    p.add_argument("--lambda-g", type=float, default=2.0,
                   help="stage1/2 rate point l_guide_weight (2, 1, 0.5, 0.25, 0.1)")
    p.add_argument("--fixed-step", type=int, default=2, help="stage2: sampler steps S to fine-tune for (2 or 5)")
    p.add_argument("--lpips-weight", type=float, default=0.5)
    p.add_argument("--bpp-weight", type=float, default=1.0)
    p.add_argument("--perceptual", default="auto", choices=("auto", "lpips", "ms-ssim", "none"),
                   help="stage2 perceptual term: LPIPS-alex from local weights, else the MS-SSIM substitute")
    p.add_argument("--rec-loss", default="l1", choices=("l1", "mse"), help="vae reconstruction loss")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="vae: weight of the per-element KL")
    p.add_argument("--ssim-weight", type=float, default=0.2, help="vae: weight of the multi-scale DSSIM term")
    p.add_argument("--lowfreq-weight", type=float, default=0.0, metavar="W",
                   help="vae/stage2: weight of an extra MSE of 16x16 block means (colour, low frequencies; 0 = off)")
    p.add_argument("--ema-decay", type=float, default=0.0, metavar="D",
                   help="vae/prior: export an exponential moving average of the weights (e.g. 0.999; 0 = off)")
    p.add_argument("--logvar-init", type=float, default=None, metavar="V",
                   help="vae from random weights: initial posterior log-variance (default: diffusers' ~0)")
    p.add_argument("--train-vae-decoder", action="store_true",
                   help="stage2: also fine-tune the VAE decoder on the chain's own latents (not the reference's)")
    p.add_argument("--no-calibrate-scale", dest="calibrate_scale", action="store_false",
                   help="vae: keep the config's scaling_factor instead of 1/std(latent)")
    p.add_argument("--crop", type=int, default=None,
                   help="crop size in px (default: stage1 512, others 256; stage1/2 need a multiple of 64)")
    p.add_argument("--scale-range", type=_scale_range, default=None, metavar="MIN,MAX",
                   help="crop fractions of the resized short side (default 0.8,1.0; stage2 0.4,0.5 as the reference)")
    p.add_argument("--max-side", type=int, default=1024, help="long side of the in-memory photo copies")
    p.add_argument("--photos-dir", default=None, help="photos root with full/ and split.json (default: data/photos)")
    p.add_argument("--seed", type=int, default=231)
    p.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm (0 = off, as the reference)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute UNet/VAE blocks in backward")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--progress", dest="progress", action="store_true", default=True)
    bars.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=main_from_args)
    return p


add_parser = register  # the name jobs/cli.py looks for


def config_from_args(args: argparse.Namespace):
    from rdeic_core.training import TrainConfig
    from rdeic_core.training.data import DEFAULT_PHOTOS_DIR

    return TrainConfig(
        stage=args.stage, run_dir=args.run_dir, config=args.config, init=args.init,
        control_ratio=args.control_ratio, steps=args.steps,
        batch=args.batch, lr=args.lr, lambda_g=args.lambda_g, fixed_step=args.fixed_step,
        lpips_weight=args.lpips_weight, bpp_weight=args.bpp_weight, rec_loss=args.rec_loss,
        kl_weight=args.kl_weight, ssim_weight=args.ssim_weight, perceptual=args.perceptual, crop=args.crop,
        scale_range=args.scale_range, max_side=args.max_side,
        photos_dir=args.photos_dir or str(DEFAULT_PHOTOS_DIR), seed=args.seed, grad_clip=args.grad_clip,
        precision=args.precision, grad_checkpointing=args.grad_checkpointing,
        calibrate_scale=args.calibrate_scale, ema_decay=args.ema_decay, logvar_init=args.logvar_init,
        train_vae_decoder=args.train_vae_decoder, lowfreq_weight=args.lowfreq_weight,
        ckpt_every=args.ckpt_every, keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every, device=args.device, threads=args.threads, progress=args.progress,
    )


def main_from_args(args: argparse.Namespace) -> int:
    return run_command("train", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from rdeic_core.training import train
    from rdeic_core.training.data import DataError

    try:
        cfg = config_from_args(args)
        with logging_redirect_tqdm():
            result = train(cfg)
    except (ValueError, DataError, FileNotFoundError, KeyError) as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        raise PlainError("interrupted; rerun the same command to resume from the last checkpoint",
                         EXIT_INTERRUPTED) from None
    if result.model_dir is not None:
        last = result.history[-1] if result.history else {}
        terms = " ".join(f"{k}={v:.4g}" for k, v in sorted(last.items()) if k.startswith("l_") or k == "loss")
        print(f"rdeic train: {cfg.stage} steps {result.start_step}->{result.end_step}; model in {result.model_dir}"
              + (f"; last {terms}" if terms else "")
              + (f"; perceptual={result.perceptual_loss}" if result.perceptual_loss else ""))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jobs.commands.train ARGS`` (also torchrun's entry point): the same as ``rdeic train ARGS``."""
    from ..cli import main as rdeic

    return rdeic(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
