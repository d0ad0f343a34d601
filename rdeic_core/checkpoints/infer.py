"""Architecture config from a checkpoint's tensor shapes.

Widths, depths, the attention layout, the context width, the hint width, the
compression module's N/M/slices/codebook are all visible in the shapes, so a
scaled-down checkpoint in the official layout loads without a hand-written
config. A few numbers are *not* in any shape; they come from
:class:`ArchHints`, whose defaults are the official ones:

* GroupNorm group counts (LDM hard-codes 32 for the VAE and UNet; RDEIC's
  control module uses ``find_denominator(C, 32)``),
* attention head widths (SD 2.1: 64-channel heads; RDEIC's control module:
  ``num_head_channels: 16``),
* the OpenCLIP text tower's head count (width / 64 for every released tower).

Every inferred value is checked again when the weights are loaded (strict
shape check), so a wrong hint fails loudly instead of producing a wrong model.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..config import _SD21_UNET, _SD21_VAE, CodecConfig, CompressionConfig, ControlConfig, ScheduleConfig
from .errors import CheckpointError
from .keymap import COMPRESSION_PREFIX, CONTROL_NET_PREFIX, UNET_PREFIX, VAE_PREFIX


@dataclass
class ArchHints:
    """The architecture numbers a state dict cannot show (defaults: the official RDEIC / SD 2.1 values)."""

    unet_head_channels: int = 64
    unet_norm_groups: int = 32
    vae_norm_groups: int = 32
    control_head_channels: int = 16
    control_norm_groups: int = 32
    text_heads: int = 0  # 0: width // 64
    text_layer: str = "penultimate"
    text_activation: str = "gelu"
    image_size: int = 512  # diffusers' sample_size (metadata only; any size multiple of 64 is coded)
    scaling_factor: float = 0.18215

    @classmethod
    def from_pairs(cls, pairs: list[str] | None) -> ArchHints:
        """``["unet_head_channels=8", ...]`` (the CLI's ``--hint``) -> hints, typed by the field defaults."""
        hints = cls()
        types = {f.name: type(getattr(hints, f.name)) for f in fields(cls)}
        for pair in pairs or []:
            if "=" not in pair:
                raise ValueError(f"hint {pair!r} must look like NAME=VALUE")
            name, value = (s.strip() for s in pair.split("=", 1))
            if name not in types:
                raise ValueError(f"unknown hint {name!r}; known: {sorted(types)}")
            try:
                setattr(hints, name, types[name](value))
            except ValueError:
                raise ValueError(f"hint {name}={value!r} is not a {types[name].__name__}") from None
        return hints

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _shape(src: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in src:
        raise CheckpointError(f"cannot infer the architecture: the checkpoint has no {key}")
    return tuple(src[key].shape)


def _indices(src: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in src if (m := rx.match(k))})


def infer_vae(src: Mapping[str, torch.Tensor], hints: ArchHints) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` kwargs from ``first_stage_model.*`` (LDM layout)."""
    p = VAE_PREFIX
    levels = _indices(src, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"cannot infer the VAE: no {p}encoder.down.* keys")
    widths = [_shape(src, f"{p}encoder.down.{i}.block.0.conv1.weight")[0] for i in levels]
    layers = len(_indices(src, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    z2 = _shape(src, f"{p}quant_conv.weight")[0]
    vae = copy.deepcopy(_SD21_VAE)
    vae.update(
        in_channels=_shape(src, f"{p}encoder.conv_in.weight")[1],
        out_channels=_shape(src, f"{p}decoder.conv_out.weight")[0],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=z2 // 2,
        norm_num_groups=hints.vae_norm_groups,
        sample_size=hints.image_size,
        scaling_factor=hints.scaling_factor,
    )
    return vae


def infer_unet(src: Mapping[str, torch.Tensor], hints: ArchHints) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` kwargs from ``model.diffusion_model.*`` (LDM layout)."""
    p = UNET_PREFIX
    temb, mc = _shape(src, f"{p}time_embed.0.weight")
    blocks = _indices(src, re.escape(p) + r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]  # input-block indices of the resnets of each level
    for i in blocks[1:]:
        if f"{p}input_blocks.{i}.0.op.weight" in src:
            levels.append([])
        else:
            levels[-1].append(i)
    counts = {len(lv) for lv in levels}
    if len(counts) != 1 or 0 in counts:
        raise CheckpointError(f"UNet input blocks per level {[len(lv) for lv in levels]} are not uniform")
    widths = [_shape(src, f"{p}input_blocks.{lv[0]}.0.out_layers.3.weight")[0] for lv in levels]
    attention = [f"{p}input_blocks.{lv[0]}.1.proj_in.weight" in src for lv in levels]
    first_attn = next((lv[0] for lv, a in zip(levels, attention) if a), None)
    if first_attn is None:
        raise CheckpointError("UNet has no cross-attention blocks; not an SD UNet")
    a = f"{p}input_blocks.{first_attn}.1."
    depth = len(_indices(src, re.escape(a) + r"transformer_blocks\.(\d+)\."))
    heads = []
    for w in widths:
        if w % hints.unet_head_channels:
            raise CheckpointError(f"UNet width {w} is not a multiple of the head width {hints.unet_head_channels} "
                                  "(set the unet_head_channels hint)")
        heads.append(w // hints.unet_head_channels)
    unet = copy.deepcopy(_SD21_UNET)
    unet.update(
        in_channels=_shape(src, f"{p}input_blocks.0.0.weight")[1],
        out_channels=_shape(src, f"{p}out.2.weight")[0],
        down_block_types=["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in attention],
        up_block_types=["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(attention)],
        block_out_channels=widths,
        layers_per_block=len(levels[0]),
        attention_head_dim=heads,  # diffusers' (legacy) name for the head count
        cross_attention_dim=_shape(src, a + "transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_projection=len(_shape(src, a + "proj_in.weight")) == 2,
        norm_num_groups=hints.unet_norm_groups,
        sample_size=hints.image_size // 8,
    )
    if temb != 4 * mc:
        unet["time_embedding_dim"] = temb
    if widths[0] != mc:
        raise CheckpointError(f"UNet time embedding input {mc} differs from its first width {widths[0]}")
    if depth != 1:
        unet["transformer_layers_per_block"] = depth
    return unet


def infer_control(src: Mapping[str, torch.Tensor], unet: dict[str, Any], hints: ArchHints) -> tuple[ControlConfig, int]:
    """Control ratio and hint width from ``control_model.control_model.input_blocks.0.0.weight``."""
    ch0, cin = _shape(src, f"{CONTROL_NET_PREFIX}input_blocks.0.0.weight")[:2]
    base = int(unet["block_out_channels"][0])
    hint_channels = cin - int(unet["in_channels"])
    if hint_channels < 1:
        raise CheckpointError(f"control input conv takes {cin} channels; expected latents + guide hint")
    ratio = ch0 / base
    if int(base * ratio) != ch0:  # float rounding; the reference computes int(base * ratio)
        ratio = (ch0 + 0.5) / base
    return ControlConfig(ratio=ratio, num_head_channels=hints.control_head_channels,
                         norm_groups=hints.control_norm_groups), hint_channels


def infer_compression(src: Mapping[str, torch.Tensor]) -> CompressionConfig:
    """N, M, slices, codebook and context widths from ``preprocess_model.*``."""
    p = COMPRESSION_PREFIX
    M, in_nc = _shape(src, f"{p}encoder.g_a.0.conv1.weight")[:2]
    N = _shape(src, f"{p}hyper_enc.hyper_enc.0.conv1.weight")[0]
    slices = _indices(src, re.escape(p) + r"local_context\.(\d+)\.weight")
    slice_ch = tuple(_shape(src, f"{p}local_context.{i}.weight")[1] for i in slices)
    K, dim = _shape(src, f"{p}quantize.embedding.weight")
    if dim != N:
        raise CheckpointError(f"VQ codebook width {dim} differs from the hyper-latent width N={N}")
    cc_hidden = (224, 128)
    if len(slice_ch) > 1:
        cc = f"{p}channel_context.1.fushion."
        cc_hidden = (_shape(src, cc + "0.weight")[0], _shape(src, cc + "2.weight")[0])
    return CompressionConfig(in_nc=in_nc, out_nc=_shape(src, f"{p}out.weight")[0], N=N, M=M, slice_ch=slice_ch,
                             codebook_size=K, cc_hidden=cc_hidden)


_RATE_POINT_RE = re.compile(r"rdeic_(?P<lam>\d+(?:[._]\d+)?)_step(?P<steps>\d+)", re.IGNORECASE)


def rate_point_from_name(name: str) -> tuple[str, int] | None:
    """``rdeic_0.5_step2.ckpt`` -> ("0.5", 2): the official file naming (lambda_g, fine-tuned steps)."""
    m = _RATE_POINT_RE.search(name)
    if not m:
        return None
    return m.group("lam").replace("_", "."), int(m.group("steps"))


def build_config(name: str, vae: dict[str, Any], unet: dict[str, Any], control: ControlConfig,
                 compression: CompressionConfig, hint_channels: int, context_len: int, default_steps: int,
                 scaling_factor: float) -> CodecConfig:
    """Assemble and validate a :class:`CodecConfig`."""
    if hint_channels != compression.M:
        raise CheckpointError(f"control hint width {hint_channels} differs from the compression module's M="
                              f"{compression.M}")
    cfg = CodecConfig(name=name, vae=vae, unet=unet, compression=compression, control=control,
                      schedule=ScheduleConfig(default_steps=default_steps), scaling_factor=scaling_factor,
                      context_len=context_len)
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"the inferred architecture is inconsistent: {e}") from None
    return cfg
