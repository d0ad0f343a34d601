"""Architecture configs of the RDEIC codec.

A config is pure data: it fully determines the shapes of every module, so a
model directory is `config.json` + `model.safetensors` and nothing else.
Two named configs ship with the library:

* ``sd21``: the paper's sizes (SD 2.1-base VAE and UNet, 0.2x control module,
  the ELIC-style compression module of spec section 2).
* ``tiny``: the same structure at small widths so that a round trip runs in
  seconds on a CPU; used by the tests.
* ``mini``: the starting architecture of the shipped, trained-from-scratch
  embedded models (rdeic_core/zoo/mini-lo, mini, mini-hi; docs/mini.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def find_denominator(number: int, start: int) -> int:
    """Largest divisor of ``number`` that is <= ``start`` (reference helper).

    The reference control module sizes its GroupNorms and attention heads with
    this so that 0.2x-width channels stay divisible.
    """
    if start >= number:
        return number
    while start > 0:
        if number % start == 0:
            return start
        start -= 1
    raise ValueError(f"no denominator of {number}")


@dataclass
class CompressionConfig:
    """Compression module (spec section 2)."""

    in_nc: int = 512  # channels of the VAE encoder's pre-conv_out feature
    out_nc: int = 4  # channels of c_latent (= SD latent channels)
    N: int = 256  # hyper-latent channels (= VQ code dimension)
    M: int = 256  # y channels (= guide_hint channels)
    slice_ch: tuple[int, ...] = (8, 8, 8, 8, 16, 16, 32, 32, 64, 64)
    codebook_size: int = 16384
    cc_hidden: tuple[int, int] = (224, 128)  # ChannelContextEX hidden widths

    @property
    def slice_num(self) -> int:
        return len(self.slice_ch)

    def validate(self) -> None:
        if sum(self.slice_ch) != self.M:
            raise ValueError(f"slice_ch {self.slice_ch} sums to {sum(self.slice_ch)}, expected M={self.M}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")


@dataclass
class ControlConfig:
    """Control module (spec section 3): a narrow copy of the UNet encoder + mid block."""

    ratio: float = 0.2  # width of the control module relative to the UNet
    num_head_channels: int = 16  # head width, adjusted with find_denominator
    norm_groups: int = 32  # GroupNorm groups, adjusted with find_denominator


@dataclass
class ScheduleConfig:
    """Diffusion schedule and relay sampler defaults (spec section 4)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    used_timesteps: int = 300  # relay start N = used_timesteps - 1
    default_steps: int = 2
    default_detail_scale: float = 1.0


@dataclass
class CodecConfig:
    """Everything needed to build an RDEIC codec with random weights."""

    name: str
    vae: dict[str, Any]  # diffusers AutoencoderKL kwargs
    unet: dict[str, Any]  # diffusers UNet2DConditionModel kwargs
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling_factor: float = 0.18215
    context_len: int = 77  # tokens of the stored empty-prompt embedding
    pad_multiple: int = 64

    @property
    def context_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    def validate(self) -> None:
        self.compression.validate()
        feat = self.vae["block_out_channels"][-1]
        if feat != self.compression.in_nc:
            raise ValueError(
                f"compression.in_nc={self.compression.in_nc} must equal the VAE feature width {feat}"
            )
        if self.compression.out_nc != self.latent_channels:
            raise ValueError(
                f"compression.out_nc={self.compression.out_nc} must equal latent_channels={self.latent_channels}"
            )
        if self.unet.get("in_channels", 4) != self.latent_channels:
            raise ValueError("unet.in_channels must equal the VAE latent channels")
        if len(self.vae["block_out_channels"]) != 4:
            raise ValueError("the VAE must downsample by 8 (4 levels), as SD's")
        if self.pad_multiple % 64:
            raise ValueError(
                "pad_multiple must be a multiple of 64 (y at H/16 must split into a checkerboard, z is H/64)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # tuples -> lists, a plain JSON tree

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecConfig:
        d = copy.deepcopy(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown codec config keys: {sorted(unknown)}")
        comp = d.pop("compression", {})
        comp_fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in comp.items()}
        comp = CompressionConfig(**comp_fields)
        ctrl = ControlConfig(**d.pop("control", {}))
        sched = ScheduleConfig(**d.pop("schedule", {}))
        cfg = cls(compression=comp, control=ctrl, schedule=sched, **d)
        cfg.validate()
        return cfg


_SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

_SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=[5, 10, 20, 20],  # diffusers' name for the number of heads (64-ch heads)
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    upcast_attention=False,
)


def sd21() -> CodecConfig:
    return CodecConfig(name="sd21", vae=copy.deepcopy(_SD21_VAE), unet=copy.deepcopy(_SD21_UNET))


def tiny() -> CodecConfig:
    vae = copy.deepcopy(_SD21_VAE)
    vae.update(block_out_channels=[16, 32, 64, 64], layers_per_block=1, norm_num_groups=8, sample_size=64)
    unet = copy.deepcopy(_SD21_UNET)
    unet.update(
        block_out_channels=[40, 80, 160, 160],
        layers_per_block=2,
        attention_head_dim=[5, 10, 20, 20],  # 8-ch heads, same head counts as SD
        cross_attention_dim=64,
        norm_num_groups=8,
        sample_size=8,
    )
    comp = CompressionConfig(
        in_nc=64, out_nc=4, N=32, M=64,
        slice_ch=(2, 2, 2, 2, 4, 4, 8, 8, 16, 16),
        codebook_size=1024,
        cc_hidden=(28, 16),
    )
    # norm_groups=8: the 1x1 bottleneck of a 64-px image needs >1 value per group
    ctrl = ControlConfig(ratio=0.2, num_head_channels=4, norm_groups=8)
    return CodecConfig(name="tiny", vae=vae, unet=unet, compression=comp, control=ctrl)


def mini() -> CodecConfig:
    """The embedded model shipped as ``mini`` (trained from scratch on data/photos by ``make mini``).

    Sized for a <= 20 MB fp32 safetensors file and for CPU training in about an hour: the
    capacity sits in the VAE (which bounds the reconstruction quality) and in the compression
    transforms; the UNet prior stays small because the relay sampler only refines a latent that
    the compression module already predicts. The 0.2x control here is what the VAE and prior
    stages are built with (its random draw is part of the recipe's seeded start); ``make mini``
    replaces it at stage 1 with a fresh 1.0x control (``--control-ratio``), since 0.2x of a
    16-channel UNet is too narrow to carry c_latent. The shipped config.json records the 1.0x.
    """
    vae = copy.deepcopy(_SD21_VAE)
    vae.update(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=16, sample_size=256)
    unet = copy.deepcopy(_SD21_UNET)
    unet.update(
        block_out_channels=[16, 32, 32, 32],
        layers_per_block=1,
        attention_head_dim=[2, 4, 4, 4],  # 8-ch heads
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=32,
    )
    comp = CompressionConfig(
        in_nc=64, out_nc=4, N=32, M=64,
        slice_ch=(2, 2, 2, 2, 4, 4, 8, 8, 16, 16),
        codebook_size=1024,
        cc_hidden=(28, 16),
    )
    ctrl = ControlConfig(ratio=0.2, num_head_channels=4, norm_groups=8)
    return CodecConfig(name="mini", vae=vae, unet=unet, compression=comp, control=ctrl)


NAMED_CONFIGS = {"sd21": sd21, "tiny": tiny, "mini": mini}


def get_config(name: str) -> CodecConfig:
    try:
        cfg = NAMED_CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown codec config {name!r}; expected one of {sorted(NAMED_CONFIGS)}") from None
    cfg.validate()
    return cfg
