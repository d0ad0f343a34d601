"""Train the embedded ``mini`` model from scratch and ship it to ``rdeic_core/zoo/<name>/``.

    make mini                                   # = python tools/train_mini.py
    python tools/train_mini.py --lambda-g 2 --name mini --out-dir runs/mini-l2

No Stable Diffusion weights exist in this project, so every part is trained here at a small
size, on the 22 training photos of ``data/photos`` only (the validation photos are refused by
the trainer): ``vae`` -> ``prior`` (plain eps-prediction DDPM on the VAE latents) -> ``stage1``
-> ``stage2``. Each stage is one ``python -m jobs.commands.train`` call, exactly the code path of an
``sd21`` training; only the starting weights and the step counts differ. Seeds and step counts
are fixed, so re-running the command reproduces the recipe (and resumes an interrupted run:
each stage resumes from its last checkpoint, a finished stage only re-exports its model).

The recipe choices that differ from the reference (small crops, a wide ``--scale-range`` because
there are only 22 photos, larger learning rates for the from-scratch parts, few steps) are
written in the model card next to the wall time of every stage, the sha256 of every training
photo and the git commit that trained the model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ZOO = REPO / "rdeic_core" / "zoo"


@dataclass
class Stage:
    """One ``jobs.commands.train`` call of the recipe."""

    name: str  # vae | prior | stage1 | stage2
    steps: int
    args: list[str] = field(default_factory=list)  # everything but --stage/--run-dir/--steps/--init/--config


def shared_stages(a: argparse.Namespace) -> list[Stage]:
    """VAE and prior: trained once, shared by every rate point."""
    common = ["--seed", str(a.seed), "--ckpt-every", str(a.ckpt_every), "--log-every", "10"]
    return [
        # VAE: most of the time budget, since its reconstruction bounds every later PSNR. 64-px
        # crops of photos resized to a 64..512 short side (val768 is a 512 short side).
        Stage("vae", a.steps_vae, ["--crop", "64", "--batch", "8", "--lr", "5e-4", "--scale-range", "0.125,1.0",
                                   *common]),
        Stage("prior", a.steps_prior, ["--crop", "128", "--batch", "8", "--lr", "5e-4", "--scale-range", "0.25,1.0",
                                       *common]),
    ]


def rate_stages(a: argparse.Namespace, lambda_g: float) -> list[Stage]:
    """Stage 1 and stage 2 of one rate point."""
    common = ["--seed", str(a.seed), "--ckpt-every", str(a.ckpt_every), "--log-every", "10"]
    return [
        # A fresh control module as wide as the UNet (sd21 uses 0.2x; 0.2x of mini's 16-channel UNet is 3
        # channels, too narrow to carry c_latent, and the sampler then lost detail instead of adding it).
        Stage("stage1", a.steps_stage1, ["--crop", "128", "--batch", "4", "--lr", "3e-4", "--scale-range", "0.25,1.0",
                                         "--lambda-g", f"{lambda_g:g}", "--control-ratio", f"{a.control_ratio:g}",
                                         *common]),
        # Stage 2 keeps the reference's crop fractions (0.4, 0.5) and runs the S-step sampler with gradients.
        Stage("stage2", a.steps_stage2, ["--crop", "128", "--batch", "2", "--lr", "5e-5",
                                         "--lambda-g", f"{lambda_g:g}", "--fixed-step", str(a.fixed_step),
                                         "--perceptual", "auto", *common]),
    ]


def stage_command(stage: Stage, run_dir: Path, prev_model: Path | None, threads: int) -> list[str]:
    src = ["--config", "mini"] if prev_model is None else ["--init", str(prev_model)]
    return [sys.executable, "-m", "jobs.commands.train", "--stage", stage.name, "--run-dir", str(run_dir),
            "--steps", str(stage.steps), *src, *stage.args, "--threads", str(threads), "--no-progress"]


def run_stages(cmds: list[list[str]], log_paths: list[Path]) -> float:
    """Run stage commands side by side (one per rate point), each appending to its log; returns the wall time.

    Every process uses ``--threads`` torch threads; their numbers do not depend on running in parallel.
    """
    t0 = time.monotonic()
    procs = []
    for cmd, log_path in zip(cmds, log_paths):
        log = log_path.open("a")
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        procs.append((subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log, log_path))
    failed = []
    for proc, log, log_path in procs:
        if proc.wait() != 0:
            failed.append(f"{log_path} (exit status {proc.returncode})")
        log.close()
    if failed:
        raise SystemExit(f"train_mini: stage command failed; see {', '.join(failed)}")
    return time.monotonic() - t0


def last_checkpoint_step(run_dir: Path) -> int:
    """Step of the newest complete checkpoint of a stage run (0 before it starts); the trainer always
    checkpoints its last step, so this grows exactly when a stage trained."""
    from rdeic_core.training.trainer import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][0] if ckpts else 0


def training_photo_hashes(photos_dir: Path) -> dict[str, str]:
    """sha256 of each training original (the ``train`` list of split.json): the model card's data record."""
    split = json.loads((photos_dir / "split.json").read_text())
    out = {}
    for name in split["train"]:
        out[name] = hashlib.sha256((photos_dir / "full" / name).read_bytes()).hexdigest()
    return out


def git_commit() -> str:
    """HEAD, with ``-dirty`` when the working tree differs (the weights then come from uncommitted code)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def model_card(a: argparse.Namespace, name: str, lambda_g: float, stages: list[Stage], timings: dict[str, float],
               model_dir: Path, photos: dict[str, str], commit: str, command: str) -> str:
    meta = json.loads((model_dir / "config.json").read_text())
    hist = meta.get("training", {}).get("stages", [])
    perceptual = next((h.get("perceptual_loss") for h in reversed(hist) if h.get("perceptual_loss")), "n/a")
    size = (model_dir / "model.safetensors").stat().st_size
    others = [n for n, _ in a.rate_points if n != name]
    lines = [
        f"# `{name}`: an embedded RDEIC model",
        "",
        "Trained from scratch on CPU by this repository's own training code (no Stable Diffusion weights):",
        "its own VAE, its own small UNet prior (eps-prediction DDPM on its VAE latents), then RDEIC stage 1",
        "and stage 2 on top. Architecture: the `mini` config of `rdeic_core/config.py`.",
        "Evaluation (rate-distortion against JPEG/WebP on the validation photos): `docs/mini.md`.",
        "",
        f"- rate point: lambda_g = {lambda_g:g}"
        + (f" (other rate points of the same recipe, sharing its VAE and prior: {', '.join(others)})"
           if others else ""),
        f"- stage 2 fine-tuned for S = {a.fixed_step} sampler steps",
        f"- perceptual loss of stage 2: `{perceptual}`"
        + (" (the MS-SSIM substitute: LPIPS weights are not available here, see docs/training.md)"
           if perceptual and perceptual.startswith("ms-ssim") else ""),
        f"- trained by commit: `{commit}`",
        f"- finished: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- weights: `model.safetensors`, {size / 1e6:.2f} MB (fp32)",
        "",
        "## Recipe",
        "",
        "```bash",
        command,
        "```",
        "",
        "| stage | steps | options | wall time |",
        "|-------|-------|---------|-----------|",
    ]
    for s in stages:
        lines.append(f"| {s.name} | {s.steps} | `{' '.join(s.args)}` | {timings.get(s.name, float('nan')):.0f} s |")
    total = sum(timings.values())
    lines += [
        "",
        f"Total wall time of the recipe (all rate points; stage 1 and stage 2 of the rate points run side by "
        f"side): {total / 60:.1f} min on a shared 2-core CPU, {a.threads} torch thread(s) per process.",
        "",
        "## Data",
        "",
        f"Only the {len(photos)} training photos of `data/photos/full` (`make photos`; the `train` list of",
        "`split.json`). The 4 validation photos are never trained on.",
        "",
        "| photo | sha256 |",
        "|-------|--------|",
        *[f"| {n} | `{h}` |" for n, h in photos.items()],
        "",
    ]
    return "\n".join(lines)


def _rate_point(text: str) -> tuple[str, float]:
    name, sep, lam = text.partition("=")
    try:
        if not sep or not name or "/" in name:
            raise ValueError
        return name, float(lam)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate-point must be NAME=LAMBDA_G (e.g. mini=4), got {text!r}") from None


DEFAULT_RATE_POINTS = [("mini-lo", 1.0), ("mini", 4.0), ("mini-hi", 17.0)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate-point", dest="rate_points", type=_rate_point, action="append", default=None,
                   metavar="NAME=LAMBDA_G", help="zoo name and lambda_g of one rate point (larger = more bits); "
                   "repeat for several (default: mini-lo=1, mini=4, mini-hi=17)")
    p.add_argument("--fixed-step", type=int, default=2, help="stage 2 sampler steps S")
    p.add_argument("--out-dir", default=str(REPO / "runs" / "mini"), help="run directory (default: runs/mini)")
    p.add_argument("--steps-vae", type=int, default=2200)
    p.add_argument("--steps-prior", type=int, default=2000)
    p.add_argument("--steps-stage1", type=int, default=2000)
    p.add_argument("--steps-stage2", type=int, default=500)
    p.add_argument("--control-ratio", type=float, default=1.0,
                   help="stage 1 control module width relative to the UNet (see rate_stages)")
    p.add_argument("--seed", type=int, default=231)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: on a shared 2-core machine more threads were 4x slower)")
    p.add_argument("--photos-dir", default=str(REPO / "data" / "photos"))
    p.add_argument("--no-install", dest="install", action="store_false",
                   help="leave the results in the run directory instead of copying them to rdeic_core/zoo/")
    a = p.parse_args(argv)
    a.rate_points = a.rate_points or list(DEFAULT_RATE_POINTS)
    if len({n for n, _ in a.rate_points}) != len(a.rate_points):
        p.error(f"--rate-point names must differ, got {[n for n, _ in a.rate_points]}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def record(key: str, wall: float, trained: bool) -> None:
        # A resumed stage adds to its earlier wall time; a pure re-export (no step trained) does not.
        if key not in timings or trained:
            timings[key] = timings.get(key, 0.0) + wall
        timings_path.write_text(json.dumps(timings, indent=2))

    prev: Path | None = None
    for st in shared_stages(a):
        run_dir = out / st.name
        print(f"train_mini: {st.name} ({st.steps} steps) -> {run_dir}", flush=True)
        before = last_checkpoint_step(run_dir)
        wall = run_stages([stage_command(st, run_dir, prev, a.threads)], [out / "train.log"])
        record(st.name, wall, last_checkpoint_step(run_dir) > before)
        print(f"train_mini: {st.name} done in {wall:.0f} s", flush=True)
        prev = run_dir / "model"
    assert prev is not None
    models = {name: prev for name, _ in a.rate_points}
    per_rate = {name: rate_stages(a, lam) for name, lam in a.rate_points}
    for k, stage_name in enumerate(("stage1", "stage2")):
        cmds, logs = [], []
        for name, _ in a.rate_points:
            st = per_rate[name][k]
            (out / name).mkdir(exist_ok=True)
            cmds.append(stage_command(st, out / name / st.name, models[name], a.threads))
            logs.append(out / name / "train.log")
            models[name] = out / name / st.name / "model"
        print(f"train_mini: {stage_name} of {[n for n, _ in a.rate_points]} side by side", flush=True)
        run_dirs = [out / name / per_rate[name][k].name for name, _ in a.rate_points]
        steps_before = [last_checkpoint_step(d) for d in run_dirs]
        wall = run_stages(cmds, logs)
        record(stage_name, wall, any(last_checkpoint_step(d) > b for d, b in zip(run_dirs, steps_before)))
        print(f"train_mini: {stage_name} done in {wall:.0f} s", flush=True)

    command = ("python tools/train_mini.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    photos = training_photo_hashes(Path(a.photos_dir))
    commit = git_commit()
    shared = shared_stages(a)
    for name, lam in a.rate_points:
        card = model_card(a, name, lam, shared + per_rate[name], timings, models[name], photos, commit, command)
        (out / name / "README.md").write_text(card)
        if a.install:
            dest = ZOO / name
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            for f in ("config.json", "model.safetensors"):
                shutil.copy2(models[name] / f, dest / f)
            (dest / "README.md").write_text(card)
            print(f"train_mini: shipped {dest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
