"""The training loop: one stage, one run directory, resumable, single process or torchrun/DDP.

Run directory layout::

    RUN/train_config.json          the TrainConfig of the run (a resume must agree with it)
    RUN/log.jsonl                  one JSON line per ``log_every`` steps: every loss term (window mean),
                                   lr, grad norm, s/step
    RUN/checkpoints/step_00001000/ state.pt (trainable weights + AdamW + RNG states + step) and
                                   rng_rank<r>.pt per DDP rank; COMPLETE is written last
    RUN/model/                     the result: ``RDEICCodec.save_pretrained`` with the training
                                   history under ``training`` in config.json; ``--init`` of the next stage

Determinism: the randomness of step k (crops, posterior samples, ε, t, sampler noise, the rate
proxy's uniform noise) is a pure function of ``(seed, rank, k)``: the step generator and the
global torch RNG are re-seeded from it before every step. A run resumed from a checkpoint
therefore produces the same next-step losses as an uninterrupted one (tested); the RNG states
saved in checkpoints only matter for code that draws outside a step.

Multi-GPU: start with ``torchrun --nproc_per_node=G -m jobs.commands.train ...``. With ``WORLD_SIZE > 1``
the stage module is wrapped in ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU), each
rank reads its own crops, and the VQ state that the forward changes outside autograd (usage
statistics, dead-code re-initialisation) is synchronised after every step so ranks never drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..codec import RDEICCodec
from ..config import CodecConfig, get_config
from .data import (
    DEFAULT_PHOTOS_DIR,
    REFERENCE_SCALE_RANGE,
    REFERENCE_STAGE2_SCALE_RANGE,
    CropSettings,
    PhotoCrops,
)
from .perceptual import MultiScaleDSSIM, build_perceptual_loss
from .stages import (
    STAGES,
    LossSettings,
    StageModule,
    encode_for_training,
    load_trainable_state,
    posterior_sample,
    prepare_for_stage,
    trainable_state_dict,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "rdeic-train-checkpoint"
CHECKPOINT_VERSION = 1
MODEL_SUBDIR = "model"
TRAINING_META_KEY = "training"

# reference: stage 1 lr 1e-4, batch 4, 512 crops; stage 2 lr 2e-5, 256 crops (random_crop_arr_256)
DEFAULT_LR = {"vae": 1e-4, "prior": 1e-4, "stage1": 1e-4, "stage2": 2e-5}
DEFAULT_CROP = {"vae": 256, "prior": 256, "stage1": 512, "stage2": 256}

# TrainConfig fields that may differ between a run and its resumption (they change no numbers)
_RESUMABLE_CHANGES = frozenset({"steps", "ckpt_every", "log_every", "keep_checkpoints", "progress", "device",
                                "threads", "photos_dir", "run_dir"})


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to ``RUN/train_config.json``."""

    stage: str
    run_dir: str
    config: str = "tiny"  # architecture of a fresh model: a named config or a model directory
    init: str | None = None  # start from this model directory (the previous stage's RUN/model)
    # stage1 only: build a fresh control module of this width (relative to the UNet) instead of the
    # init model's. Stage 1 is where the control module is first trained, as the reference builds its
    # ControlNet fresh; a small UNet needs a wider control than SD's 0.2x to carry c_latent.
    control_ratio: float | None = None
    steps: int = 1000  # total optimizer steps of this stage (a resume continues up to it)
    batch: int = 4  # per process
    lr: float | None = None  # None: the stage's reference default
    lambda_g: float = 2.0
    fixed_step: int = 2
    lpips_weight: float = 0.5
    bpp_weight: float = 1.0
    rec_loss: str = "l1"
    kl_weight: float = 1e-4
    ssim_weight: float = 0.2
    lowfreq_weight: float = 0.0  # vae/stage2: extra MSE of 16x16 block means (losses.lowfreq_mse)
    perceptual: str = "auto"  # stage 2: auto | lpips | ms-ssim | none
    crop: int | None = None  # None: the stage's reference default
    scale_range: tuple[float, float] | None = None  # None: reference (stage2: random_crop_arr_256's)
    max_side: int = 1024  # long side of the in-memory photo copies
    photos_dir: str = str(DEFAULT_PHOTOS_DIR)
    seed: int = 231  # the reference's lightning seed
    grad_clip: float = 0.0  # max grad norm; 0 = off (the reference does not clip)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    grad_checkpointing: bool = False
    calibrate_scale: bool = True  # vae: set scaling_factor = 1/std(latent) at the end, as SD did
    # vae/prior: exponential moving average of the trained weights, exported instead of the last step's
    # (0 = off). Small batches on CPU make the last step's weights noisy; the average is what ships.
    ema_decay: float = 0.0
    # vae from random weights: initial posterior log-variance (the quant conv's bias). diffusers starts
    # it near 0, i.e. unit-variance noise on every latent, which the decoder must first learn to
    # ignore; a reconstruction VAE with a tiny KL weight wants it far below 0 anyway.
    logvar_init: float | None = None
    train_vae_decoder: bool = False  # stage2: also fine-tune the VAE decoder (stages.trainable_modules)
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with the stage defaults filled in and every value checked."""
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {STAGES}")
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = DEFAULT_LR[c.stage]
        if c.crop is None:
            c.crop = DEFAULT_CROP[c.stage]
        if c.scale_range is None:
            c.scale_range = REFERENCE_STAGE2_SCALE_RANGE if c.stage == "stage2" else REFERENCE_SCALE_RANGE
        c.scale_range = (float(c.scale_range[0]), float(c.scale_range[1]))
        for name in ("steps", "batch", "ckpt_every", "log_every", "keep_checkpoints", "max_side"):
            if int(getattr(c, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        if c.lr <= 0:
            raise ValueError(f"lr must be > 0, got {c.lr}")
        if c.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {c.grad_clip}")
        if c.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {c.precision!r}")
        if c.stage in ("stage1", "stage2") and c.crop % 64:
            raise ValueError(f"stage1/stage2 crops must be a multiple of 64 (the codec's padding), got {c.crop}")
        if c.crop % 8:
            raise ValueError(f"crop must be a multiple of 8 (the VAE's downsampling), got {c.crop}")
        if not 0.0 <= c.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {c.ema_decay}")
        if c.ema_decay and c.stage not in ("vae", "prior"):
            # stage 1/2 also change the VQ codebook and entropy tables outside the gradient step; an
            # average of those would not match the tables the codec codes with
            raise ValueError(f"ema_decay is a vae/prior option, not {c.stage}")
        if c.lowfreq_weight and c.stage not in ("vae", "stage2"):
            raise ValueError(f"lowfreq_weight is a vae/stage2 option (an image-space loss), not {c.stage}")
        if c.train_vae_decoder and c.stage != "stage2":
            raise ValueError(f"train_vae_decoder is a stage2 option, not {c.stage}")
        if c.logvar_init is not None and (c.stage != "vae" or c.init):
            raise ValueError("logvar_init applies to a vae stage from random weights (--config, no --init)")
        if c.control_ratio is not None:
            if c.stage != "stage1":
                raise ValueError(f"control_ratio is a stage1 option (the control module is built there), "
                                 f"not {c.stage}")
            if not c.control_ratio > 0:
                raise ValueError(f"control_ratio must be > 0, got {c.control_ratio}")
        c.crop_settings()  # validates the range
        self.loss_settings(c).validate()
        return c

    def crop_settings(self) -> CropSettings:
        """The training crop of a :meth:`resolved` config."""
        if self.crop is None or self.scale_range is None:
            raise ValueError("crop and scale_range are unset: resolve the config first (TrainConfig.resolved)")
        return CropSettings(self.crop, self.scale_range)

    @staticmethod
    def loss_settings(c: TrainConfig) -> LossSettings:
        return LossSettings(lambda_g=c.lambda_g, bpp_weight=c.bpp_weight, fixed_step=c.fixed_step,
                            lpips_weight=c.lpips_weight, rec_loss=c.rec_loss, kl_weight=c.kl_weight,
                            ssim_weight=c.ssim_weight, lowfreq_weight=c.lowfreq_weight)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown train config keys: {sorted(unknown)}")
        d = dict(d)
        if d.get("scale_range") is not None:
            d["scale_range"] = tuple(d["scale_range"])
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0; other ranks get ``model_dir=None``)."""

    model_dir: Path | None
    start_step: int
    end_step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # the log records written by this call
    perceptual_loss: str | None = None


# ---------------------------------------------------------------------------------------------------
# distributed environment


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """Rank and world size from the torchrun environment (1 process without it)."""
    return DistEnv(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(requested: str, env: DistEnv) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        if env.distributed and device.index is None:
            device = torch.device(f"cuda:{env.local_rank}")
    return device


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------
# model construction


def _load_codec_config(config: str) -> CodecConfig:
    """A named config, or a model directory / config.json (its ``config`` entry)."""
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        meta = json.loads(p.read_text())
        return CodecConfig.from_dict(meta["config"] if "config" in meta else meta)
    return get_config(config)


CONTROL_PREFIXES = ("noise_estimator.control.", "noise_estimator.enc_zero_convs_out.",
                    "noise_estimator.middle_block_out.", "noise_estimator.dec_zero_convs_out.")


def build_codec(cfg: TrainConfig) -> RDEICCodec:
    """The starting model: ``init`` (a saved model) or a fresh one of ``config`` seeded by ``seed``."""
    if cfg.init:
        codec = RDEICCodec.from_pretrained(cfg.init)
    else:
        codec = RDEICCodec.from_config(_load_codec_config(cfg.config), seed=cfg.seed)
    if cfg.control_ratio is not None and cfg.control_ratio != codec.config.control.ratio:
        codec = with_fresh_control(codec, cfg.control_ratio, cfg.seed)
    if cfg.logvar_init is not None:
        set_logvar_init(codec, cfg.logvar_init)
    return codec


def set_logvar_init(codec: RDEICCodec, value: float) -> None:
    """Start the VAE posterior's log-variance at ``value`` (the logvar half of the quant conv's bias)."""
    vae = codec.vae.vae
    if vae.quant_conv is None:
        raise ValueError("logvar_init needs the VAE's quant_conv (use_quant_conv=True)")
    with torch.no_grad():
        vae.quant_conv.bias[codec.config.latent_channels:] = float(value)
    codec.refresh_fingerprint()


class WeightAverage:
    """EMA of a list of parameters, with the usual warm-up ``min(decay, (1 + n) / (10 + n))`` so the
    average is not dominated by the random start in a short run."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state['shadow'])} tensors, the stage trains {len(self.shadow)}")
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
        self.updates = int(state["updates"])


def with_fresh_control(codec: RDEICCodec, ratio: float, seed: int) -> RDEICCodec:
    """A copy of ``codec`` whose control module (and zero convs) is rebuilt at ``ratio``, seeded by ``seed``.

    Every other weight and buffer (VAE, compression module, UNet, context) is copied unchanged; the new
    control starts as LDM's does (residual outputs and zero convs at zero), so the copy decodes exactly
    like the plain UNet until stage 1 trains it.
    """
    config = dataclasses.replace(codec.config, control=dataclasses.replace(codec.config.control, ratio=ratio))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = RDEICCodec(config)
    state = fresh.state_dict()
    state.update({k: v for k, v in codec.state_dict().items() if not k.startswith(CONTROL_PREFIXES)})
    fresh.load_codec_state(state)
    return fresh.eval()


def _previous_history(codec_dir: str | None) -> list[dict[str, Any]]:
    if not codec_dir:
        return []
    meta = json.loads((Path(codec_dir) / "config.json").read_text())
    return list(meta.get(TRAINING_META_KEY, {}).get("stages", []))


# ---------------------------------------------------------------------------------------------------
# seeding


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for (run seed, rank, step): the whole randomness of one step."""
    h = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & (2**64 - 1)
    h ^= h >> 31
    return h & (2**63 - 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("step_") and (d / "COMPLETE").is_file():
                try:
                    out.append((int(d.name[5:]), d))
                except ValueError:
                    continue
    return sorted(out)


def _save_checkpoint(run_dir: Path, step: int, codec: RDEICCodec, stage: str, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, cfg: TrainConfig, base_fingerprint: str, env: DistEnv,
                     ema: WeightAverage | None = None) -> Path:
    d = checkpoint_root(run_dir) / f"step_{step:08d}"
    if env.is_main:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    _barrier(env)
    torch.save(_rng_state(generator), d / f"rng_rank{env.rank}.pt")
    if env.is_main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "stage": stage,
            "world_size": env.world_size,
            "train_config": cfg.to_dict(),
            "base_fingerprint": base_fingerprint,
            "model": {k: v.detach().cpu()
                      for k, v in trainable_state_dict(codec, stage, cfg.train_vae_decoder).items()},
            "optimizer": optimizer.state_dict(),
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        tmp = d / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, d / "state.pt")
    _barrier(env)
    if env.is_main:
        (d / "COMPLETE").write_text(f"{step}\n")
        for _, old in list_checkpoints(run_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(env)
    return d


def _load_checkpoint(d: Path, codec: RDEICCodec, stage: str, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, base_fingerprint: str, env: DistEnv,
                     ema: WeightAverage | None = None, vae_decoder: bool = False) -> int:
    state = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT or int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"{d} is not a readable {CHECKPOINT_FORMAT} (format={state.get('format')!r}, "
                         f"version={state.get('version')!r})")
    if state["stage"] != stage:
        raise ValueError(f"{d} is a {state['stage']!r} checkpoint, this run trains {stage!r}")
    if state["base_fingerprint"] != base_fingerprint:
        raise ValueError(f"{d} was trained from a different starting model (fingerprint "
                         f"{state['base_fingerprint'][:16]}…, now {base_fingerprint[:16]}…): "
                         "check --init/--config/--seed")
    load_trainable_state(codec, stage, state["model"], vae_decoder)
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        if "ema" not in state:
            raise ValueError(f"{d} holds no EMA state, but this run averages its weights (ema_decay)")
        ema.load_state_dict(state["ema"])
    rng_file = d / f"rng_rank{env.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False), generator)
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?); steps are re-seeded anyway",
                    d, env.rank)
    return int(state["step"])


def _same_setting(key: str, stored: Any, now: Any) -> bool:
    """Equal values; a model path also when it names the same directory (absolute vs relative spelling)."""
    if stored == now:
        return True
    if key in ("init", "config") and isinstance(stored, str) and isinstance(now, str):
        a, b = Path(stored).expanduser(), Path(now).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def _check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    """The run's stored TrainConfig must agree with this one except for harmless fields."""
    path = run_dir / "train_config.json"
    if not path.is_file():
        return
    # a field this run's trainer has and the stored run's did not was at its default there
    defaults = TrainConfig(stage=cfg.stage, run_dir=cfg.run_dir).to_dict()
    stored = {**defaults, **json.loads(path.read_text())}
    now = cfg.to_dict()
    diff = {k: (stored.get(k), now.get(k)) for k in set(stored) | set(now)
            if k not in _RESUMABLE_CHANGES and not _same_setting(k, stored.get(k), now.get(k))}
    if diff:
        raise ValueError(f"{run_dir} holds a run with a different configuration: "
                         + ", ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
                         + " (use a new --run-dir, or the same options)")


# ---------------------------------------------------------------------------------------------------
# the loop


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ValueError("bf16 autocast is for CUDA; CPU training runs in fp32 (--precision fp32)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _perceptual_for(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module | None, str | None]:
    if cfg.stage == "stage2":
        module, name = build_perceptual_loss(cfg.perceptual)
        return (module.to(device) if module is not None else None), name
    if cfg.stage == "vae" and cfg.ssim_weight > 0:
        return MultiScaleDSSIM(), "ms-ssim-dssim"
    return None, None


def _sync_vq_codebook(codec: RDEICCodec, env: DistEnv) -> None:
    """Make the VQ state identical on all ranks after a step.

    The forward updates it outside autograd, from each rank's own batch: the running usage
    ``embed_prob`` is averaged (the usage over the global batch, as one process with the whole
    batch would see it), and the dead-code re-initialisation of the codebook, which pulls codes
    towards rank-local features, is taken from rank 0.
    """
    if env.distributed:
        vq = codec.compression.quantize
        dist.broadcast(vq.embedding.weight.data, src=0)
        dist.all_reduce(vq.embed_prob)
        vq.embed_prob /= env.world_size


def _window_means(window: list[dict[str, torch.Tensor]], env: DistEnv) -> dict[str, float]:
    keys = sorted(window[0])
    stacked = torch.stack([torch.stack([w[k].float() for k in keys]) for w in window]).mean(dim=0)
    if env.distributed:
        dist.all_reduce(stacked)
        stacked /= env.world_size
    return {k: float(v) for k, v in zip(keys, stacked.cpu())}


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) one stage up to ``cfg.steps`` and export ``RUN/model``."""
    cfg = cfg.resolved()
    env = dist_env()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = _pick_device(cfg.device, env)
    if env.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, env, device)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: DistEnv, device: torch.device) -> TrainResult:
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_resume_config(run_dir, cfg)
        stored = dict(cfg.to_dict())
        (run_dir / "train_config.json").write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    _barrier(env)

    _seed_everything(cfg.seed)
    codec = build_codec(cfg)
    base_fingerprint = codec.fingerprint.hex()
    codec.to(device)
    params = prepare_for_stage(codec, cfg.stage, cfg.train_vae_decoder)
    if cfg.grad_checkpointing:
        codec.noise_estimator.gradient_checkpointing = True
        if cfg.stage in ("vae", "stage2"):
            codec.vae.vae.enable_gradient_checkpointing()
    assert cfg.lr is not None  # train() resolved the config
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    ema = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay else None
    perceptual, perceptual_name = _perceptual_for(cfg, device)
    stage_module = StageModule(codec, cfg.stage, TrainConfig.loss_settings(cfg), perceptual)
    model: nn.Module = stage_module
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(stage_module, device_ids=[device.index] if device.type == "cuda" else None)

    generator = torch.Generator(device="cpu")
    start_step = 0
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        start_step = _load_checkpoint(ckpts[-1][1], codec, cfg.stage, optimizer, generator, base_fingerprint, env,
                                      ema, cfg.train_vae_decoder)
        if env.is_main:
            log.info("resumed %s from %s (step %d)", cfg.stage, ckpts[-1][1], start_step)
            _truncate_log(run_dir, start_step)

    history: list[dict[str, Any]] = []
    if start_step < cfg.steps:
        data = PhotoCrops.from_photos_dir(cfg.photos_dir, cfg.crop_settings(), seed=cfg.seed, max_side=cfg.max_side)
        extra = {"perceptual": perceptual_name} if cfg.stage == "stage2" else {}
        history = _loop(cfg, env, device, model, stage_module, optimizer, params, generator, data, start_step,
                        run_dir, base_fingerprint, extra, ema)

    if ema is not None:
        ema.copy_to_params()  # the average is what ships (the checkpoints keep both)
    model_dir = None
    if env.is_main:
        model_dir = _export(cfg, codec, run_dir, perceptual_name, env, device)
    _barrier(env)
    return TrainResult(model_dir=model_dir, start_step=start_step, end_step=max(start_step, cfg.steps),
                       history=history, perceptual_loss=perceptual_name)


def _loop(cfg: TrainConfig, env: DistEnv, device: torch.device, model: nn.Module, stage_module: StageModule,
          optimizer: torch.optim.Optimizer, params: list[nn.Parameter], generator: torch.Generator,
          data: PhotoCrops, start_step: int, run_dir: Path, base_fingerprint: str,
          extra: dict[str, Any], ema: WeightAverage | None = None) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    codec = stage_module.codec
    history: list[dict[str, Any]] = []
    window: list[dict[str, torch.Tensor]] = []
    t_window = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.stage, unit="step",
               disable=not (cfg.progress and env.is_main), dynamic_ncols=True)
    log_path = run_dir / "log.jsonl"
    try:
        for step in range(start_step, cfg.steps):
            seed = step_seed(cfg.seed, env.rank, step)
            generator.manual_seed(seed)
            torch.manual_seed(seed)  # compressai's rate proxy draws from the global RNG
            x = data.batch(step, cfg.batch, env.rank, env.world_size).to(device, non_blocking=True)
            stage_module.generator = generator
            with _autocast(device, cfg.precision):
                loss, terms = model(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            if ema is not None:
                ema.update()
            if cfg.stage in ("stage1", "stage2"):
                _sync_vq_codebook(codec, env)
            window.append({**terms, "grad_norm": grad_norm.detach()})
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                means = _window_means(window, env)
                if not all(math.isfinite(v) for v in means.values()):
                    raise FloatingPointError(f"non-finite loss terms at step {done}: {means}")
                now = time.perf_counter()
                record = {"step": done, "stage": cfg.stage, "lr": optimizer.param_groups[0]["lr"],
                          "s_per_step": (now - t_window) / len(window), "time": time.time(), **extra, **means}
                t_window = now
                window = []
                history.append(record)
                if env.is_main:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record, sort_keys=True) + "\n")
                    bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()
                                     if k in ("loss", "l_bpp", "l_rec", "l_eps")})
            bar.update(1)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                _save_checkpoint(run_dir, done, codec, cfg.stage, optimizer, generator, cfg, base_fingerprint, env,
                                 ema)
    finally:
        bar.close()
    return history


# ---------------------------------------------------------------------------------------------------
# export


@torch.no_grad()
def calibrate_scaling_factor(codec: RDEICCodec, data: PhotoCrops, device: torch.device, crops: int = 64,
                             batch: int = 8, seed: int = 0) -> tuple[float, float]:
    """1/std of posterior samples over ``crops`` training crops (how SD's 0.18215 was chosen).

    Returns (scaling factor, latent std). Applied to ``codec.config`` and the VAE by the caller.
    """
    g = torch.Generator().manual_seed(seed)
    codec.vae.eval()
    sq, n, total = 0.0, 0, 0.0
    for start in range(0, crops, batch):
        # indices far past any training step's: fixed crops that do not depend on how long we trained
        x = torch.stack([data[10**9 + start + j] for j in range(min(batch, crops - start))]).to(device)
        z = posterior_sample(encode_for_training(codec.vae, x), g).double()
        total += float(z.sum())
        sq += float((z**2).sum())
        n += z.numel()
    mean = total / n
    std = math.sqrt(max(sq / n - mean**2, 1e-24))
    return 1.0 / std, std


def _set_scaling_factor(codec: RDEICCodec, factor: float) -> None:
    codec.config.scaling_factor = float(factor)
    codec.config.vae["scaling_factor"] = float(factor)
    codec.vae.scaling_factor = float(factor)


def _export(cfg: TrainConfig, codec: RDEICCodec, run_dir: Path, perceptual_name: str | None, env: DistEnv,
            device: torch.device) -> Path:
    """Write RUN/model from the final weights, with this stage appended to the training history."""
    codec.eval()
    crop = cfg.crop_settings()
    stage_meta: dict[str, Any] = {
        "stage": cfg.stage,
        "steps": cfg.steps,
        "batch_per_process": cfg.batch,
        "world_size": env.world_size,
        "lr": cfg.lr,
        "optimizer": "AdamW",
        "crop": crop.crop,
        "scale_range": list(crop.scale_range),
        "seed": cfg.seed,
        "precision": cfg.precision,
        "data": {"source": "data/photos train split", "max_side": cfg.max_side},
        "init": cfg.init,
        "config": None if cfg.init else cfg.config,
    }
    if cfg.stage in ("stage1", "stage2"):
        stage_meta.update(lambda_g=cfg.lambda_g, bpp_weight=cfg.bpp_weight)
    if cfg.stage == "stage2":
        stage_meta.update(fixed_step=cfg.fixed_step, lpips_weight=cfg.lpips_weight, perceptual_loss=perceptual_name,
                          train_vae_decoder=cfg.train_vae_decoder)
    if cfg.ema_decay:
        stage_meta.update(ema_decay=cfg.ema_decay)
    if cfg.lowfreq_weight:
        stage_meta.update(lowfreq_weight=cfg.lowfreq_weight)
    if cfg.stage == "vae":
        stage_meta.update(rec_loss=cfg.rec_loss, kl_weight=cfg.kl_weight, ssim_weight=cfg.ssim_weight)
        if cfg.logvar_init is not None:
            stage_meta.update(logvar_init=cfg.logvar_init)
        if cfg.calibrate_scale:
            data = PhotoCrops.from_photos_dir(cfg.photos_dir, crop, seed=cfg.seed, max_side=cfg.max_side)
            factor, std = calibrate_scaling_factor(codec, data, device, seed=cfg.seed)
            _set_scaling_factor(codec, factor)
            stage_meta.update(scaling_factor=factor, latent_std=std)
            log.info("vae: latent std %.4g -> scaling_factor %.6g", std, factor)
    last = _last_log_record(run_dir)
    if last:
        stage_meta["final_terms"] = {k: v for k, v in last.items() if k.startswith("l_") or k in ("loss", "q_bpp")}
    history = _previous_history(cfg.init) + [stage_meta]
    codec.refresh_fingerprint()
    out = run_dir / MODEL_SUBDIR
    codec.save_pretrained(out, extra_meta={TRAINING_META_KEY: {"stages": history}})
    return out


def _truncate_log(run_dir: Path, step: int) -> None:
    """Drop log records of steps after ``step`` (written before an interruption; they are redone)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)


def _last_log_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def read_log(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The records of ``RUN/log.jsonl``."""
    path = Path(run_dir) / "log.jsonl"
    if path.is_file():
        for ln in path.read_text().splitlines():
            if ln.strip():
                yield json.loads(ln)
