"""The RDEIC noise estimator: frozen SD UNet (diffusers) + a narrow control module.

Spec section 3. The control module is a 0.2x-width copy of the UNet encoder and
middle block that sees ``cat(x_t, guide_hint)``. It never reads the base UNet;
the base reads it through 25 zero-initialised 1x1 convs:

* ``enc_zero_convs_out[i]`` (12): added to the base after LDM input block i,
  i.e. after ``conv_in``, after every down resnet(+attention) and after every
  downsampler. The sum is what later base blocks *and* the skip see, so this is
  not diffusers' ``down_block_additional_residuals`` (skips only).
* ``middle_block_out``: added to the mid-block output.
* ``dec_zero_convs_out[j]`` (12): fed control input block ``11 - j`` and added
  to the base right before up-block resnet j concatenates its skip. An
  upsampler belongs to the LDM output block of the resnet before it, so the
  injection after it happens at the upsampled resolution.

All 25 are multiplied by ``scale_list`` (a buffer of ones in the reference).

Because the control branch is independent of the base, it runs first (one
``ControlModule.forward``) and the base walk then adds the zero-conv outputs;
this is the reference's arithmetic in a different (equivalent) order.

Module names follow the LDM layout (``input_blocks.<i>.<k>``, ``middle_block.<k>``,
``time_embed.{0,2}``, ``*_zero_convs_out.<i>.0``) so that converting a reference
checkpoint is a rename of the leaf names inside the diffusers blocks only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CodecConfig, ControlConfig, find_denominator

# GroupNorm eps of LDM's ResBlock (nn.GroupNorm default) and SpatialTransformer (Normalize).
RESBLOCK_NORM_EPS = 1e-5


class FP32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as the reference's ``GroupNorm_leq32``.

    Keeps the statistics of the control's ResBlocks accurate when the module runs
    in bf16/fp16 (cast model or autocast); in float32 it is a plain GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class TimestepBlockSequence(nn.ModuleList):
    """LDM's ``TimestepEmbedSequential`` for diffusers blocks.

    Resnets get the time embedding, transformers the context, anything else only
    the feature map. A ModuleList (not Sequential) so the children are named
    ``0``, ``1``, ... exactly like the LDM checkpoint keys.
    """

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for module in self:
            if isinstance(module, ResnetBlock2D):
                h = module(h, emb)
            elif isinstance(module, Transformer2DModel):
                h = module(h, encoder_hidden_states=context, return_dict=False)[0]
            else:
                h = module(h)
        return h


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _as_per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name}={value} must have one entry per level ({levels})")
    return value


class ControlModule(nn.Module):
    """A narrow copy of the UNet encoder + middle block (reference ``ControlModule``).

    Widths are ``int(block_out_channels[0] * ratio) * mult`` with the UNet's
    channel multipliers (sd21: 64/128/256/256); attention sits on the levels
    whose UNet down block has cross attention. Head width is
    ``find_denominator(ch, num_head_channels)``; the middle transformer re-uses the
    head width of the last attention level, as the reference does. Layers follow
    LDM (ResnetBlock2D with eps 1e-5, no output scaling, fp32 GroupNorm of
    ``find_denominator(C, norm_groups)`` groups; transformers with a 1e-6 GroupNorm,
    linear projections, GEGLU; strided 3x3 conv downsamplers). Residual-branch
    output layers start at zero, like LDM's ``zero_module`` (training starts from
    scratch, ``synch_control: False``).

    Args:
        base_config: the base UNet's config (``UNet2DConditionModel.config`` or the
            kwargs it was built from; missing keys take diffusers' defaults).
        control: ratio, head width and norm-group settings.
        hint_channels: channels of ``guide_hint`` (the compression module's M).
    """

    def __init__(self, base_config: Mapping[str, Any], control: ControlConfig, hint_channels: int):
        super().__init__()
        base_widths = [int(c) for c in base_config["block_out_channels"]]
        block_types = list(base_config["down_block_types"])
        levels = len(base_widths)
        if len(block_types) != levels:
            raise ValueError(f"down_block_types {block_types} and block_out_channels {base_widths} differ in length")
        layers = _as_per_level(base_config.get("layers_per_block", 2), levels, "layers_per_block")
        depth = base_config.get("transformer_layers_per_block", 1)
        if not isinstance(depth, int):
            raise NotImplementedError(f"per-block transformer_layers_per_block={depth} is not supported")
        context_dim = int(base_config["cross_attention_dim"])
        linear = bool(base_config.get("use_linear_projection", False))
        upcast = bool(base_config.get("upcast_attention", False))
        in_channels = int(base_config.get("in_channels", 4))

        base_ch0 = base_widths[0]
        ch0 = int(base_ch0 * control.ratio)
        if ch0 < 1:
            raise ValueError(f"control ratio {control.ratio} leaves no channels of {base_ch0}")
        widths = []
        for c in base_widths:
            if c % base_ch0:
                raise ValueError(f"block_out_channels {base_widths} are not integer multiples of {base_ch0}")
            widths.append(ch0 * (c // base_ch0))
        attention = [t.startswith("CrossAttn") for t in block_types]

        temb_in = base_ch0  # the UNet's sinusoidal embedding width (time_proj)
        temb_dim = int(base_config.get("time_embedding_dim") or 4 * base_ch0)
        self.time_embed = nn.Sequential(nn.Linear(temb_in, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))

        self._control = control
        self._temb_dim = temb_dim
        self._transformer_kw = dict(
            num_layers=depth, cross_attention_dim=context_dim, use_linear_projection=linear,
            upcast_attention=upcast,
        )

        blocks = [TimestepBlockSequence([nn.Conv2d(in_channels + hint_channels, ch0, 3, padding=1)])]
        out_channels = [ch0]
        ch = ch0
        head_ch = control.num_head_channels  # the reference's running value, re-used by the middle block
        for level, width in enumerate(widths):
            for _ in range(layers[level]):
                mods: list[nn.Module] = [self._resnet(ch, width)]
                ch = width
                if attention[level]:
                    head_ch = find_denominator(ch, control.num_head_channels)
                    mods.append(self._transformer(ch, ch // head_ch, head_ch))
                blocks.append(TimestepBlockSequence(mods))
                out_channels.append(ch)
            if level != levels - 1:
                blocks.append(TimestepBlockSequence(
                    [Downsample2D(ch, use_conv=True, out_channels=ch, padding=1, name="op")]))
                out_channels.append(ch)
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = TimestepBlockSequence([
            self._resnet(ch, ch),
            self._transformer(ch, ch // head_ch, head_ch),
            self._resnet(ch, ch),
        ])
        self.out_channels: list[int] = out_channels  # per input block
        self.middle_channels: int = ch

    def _resnet(self, cin: int, cout: int) -> ResnetBlock2D:
        groups = self._control.norm_groups
        block = ResnetBlock2D(
            in_channels=cin, out_channels=cout, temb_channels=self._temb_dim, eps=RESBLOCK_NORM_EPS,
            groups=find_denominator(cin, groups), groups_out=find_denominator(cout, groups),
            dropout=0.0, non_linearity="swish", output_scale_factor=1.0,
        )
        block.norm1 = FP32GroupNorm(find_denominator(cin, groups), cin, eps=RESBLOCK_NORM_EPS)
        block.norm2 = FP32GroupNorm(find_denominator(cout, groups), cout, eps=RESBLOCK_NORM_EPS)
        _zero_(block.conv2)
        return block

    def _transformer(self, ch: int, heads: int, head_dim: int) -> Transformer2DModel:
        block = Transformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=ch,
            norm_num_groups=find_denominator(ch, self._control.norm_groups), **self._transformer_kw,
        )
        _zero_(block.proj_out)
        return block

    def forward(self, x: torch.Tensor, guide_hint: torch.Tensor, t_emb: torch.Tensor,
                context: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Control features: one per input block, and the middle-block output.

        ``t_emb`` is the UNet's sinusoidal embedding of t (``unet.time_proj``),
        which the reference feeds to both time MLPs.
        """
        context = _broadcast_context(context, x.shape[0])
        emb = self.time_embed(t_emb)
        h = torch.cat([x, guide_hint], dim=1)
        feats = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            feats.append(h)
        return feats, self.middle_block(h, emb, context)


def _zero_conv(cin: int, cout: int) -> nn.Sequential:
    # Sequential so the keys read "<list>.<i>.0.weight", as in the reference checkpoint.
    return nn.Sequential(_zero_(nn.Conv2d(cin, cout, 1)))


def _call_attention(attn: nn.Module, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return attn(h, encoder_hidden_states=context, return_dict=False)[0]


def _call_mid(mid: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return mid(h, emb, encoder_hidden_states=context)


def _call_direct(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    return fn(*args)


def _call_checkpointed(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    return checkpoint(fn, *args, use_reentrant=False)


_UNSUPPORTED_UNET_OPTIONS = (
    "class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim",
    "time_cond_proj_dim", "time_embedding_act_fn",
)


def _check_supported_unet(unet: UNet2DConditionModel) -> None:
    """The block walk re-implements only the plain SD forward; refuse anything else loudly."""
    cfg = unet.config
    for key in _UNSUPPORTED_UNET_OPTIONS:
        if cfg.get(key) is not None:
            raise NotImplementedError(f"UNet option {key}={cfg.get(key)!r} is not supported by the RDEIC block walk")
    if cfg.get("center_input_sample"):
        raise NotImplementedError("UNet option center_input_sample=True is not supported")
    if unet.mid_block is None:
        raise NotImplementedError("a UNet without a mid block is not supported")


class NoiseEstimator(nn.Module):
    """epsilon(x_t, t, context, guide_hint): SD UNet with RDEIC cross-control.

    Args:
        config: the codec config (``config.unet`` builds the UNet unless one is
            given, ``config.control`` the control module, ``config.compression.M``
            is the hint width).
        unet: an already built (e.g. pretrained) base UNet to use instead.

    The UNet is frozen (``requires_grad=False``) but everything stays
    differentiable w.r.t. the inputs, which stage-2 fine-tuning needs. Set
    ``gradient_checkpointing = True`` to recompute blocks in the backward pass
    (the reference trains with ``use_checkpoint: True``).
    """

    scale_list: torch.Tensor  # buffer: one scale per control injection (encoder, middle, decoder)

    def __init__(self, config: CodecConfig, unet: UNet2DConditionModel | None = None):
        super().__init__()
        self.unet = unet if unet is not None else UNet2DConditionModel(**config.unet)
        _check_supported_unet(self.unet)
        self.unet.requires_grad_(False)
        self.control = ControlModule(self.unet.config, config.control, config.compression.M)
        self.gradient_checkpointing = False

        enc_base, dec_base = self._base_channels()
        ctrl = self.control.out_channels
        if len(enc_base) != len(ctrl):
            raise ValueError(f"control has {len(ctrl)} input blocks, the UNet {len(enc_base)}")
        if len(dec_base) != len(ctrl):
            raise ValueError(f"UNet has {len(dec_base)} up-block resnets, expected {len(ctrl)} (one per skip)")
        self.enc_zero_convs_out = nn.ModuleList(_zero_conv(c, b) for c, b in zip(ctrl, enc_base))
        self.middle_block_out = _zero_conv(self.control.middle_channels, self.unet.mid_block.resnets[-1].out_channels)
        self.dec_zero_convs_out = nn.ModuleList(_zero_conv(ctrl[-1 - j], b) for j, b in enumerate(dec_base))
        # one scale per injection, in the reference's order: encoder, middle, decoder
        n_scales = len(self.enc_zero_convs_out) + 1 + len(self.dec_zero_convs_out)
        self.register_buffer("scale_list", torch.ones(n_scales))

    def _base_channels(self) -> tuple[list[int], list[int]]:
        """Channels of h_base after each LDM input block, and before each up-block resnet."""
        unet = self.unet
        enc = [unet.conv_in.out_channels]
        for block in unet.down_blocks:
            enc.extend(r.out_channels for r in block.resnets)
            if block.downsamplers is not None:
                enc.extend(d.out_channels for d in block.downsamplers)
        dec = [unet.mid_block.resnets[-1].out_channels]
        for block in unet.up_blocks:
            dec.extend(r.out_channels for r in block.resnets)
        return enc, dec[:-1]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Control module + zero convs; the UNet stays frozen (``sd_locked: True``)."""
        for module in (self.control, self.enc_zero_convs_out, self.middle_block_out, self.dec_zero_convs_out):
            yield from module.parameters()

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor,
                guide_hint: torch.Tensor) -> torch.Tensor:
        """Predicted noise for latents ``x`` [B,4,h,w] under control of ``guide_hint`` [B,M,h,w]."""
        if guide_hint.dim() != 4 or guide_hint.shape[0] != x.shape[0] or guide_hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"guide_hint shape {tuple(guide_hint.shape)} does not match latents {tuple(x.shape)}")
        return self._run(x, t, context, guide_hint)

    def forward_unconditional(self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Plain SD epsilon (no control), the epsilon_sd of the detail-scale guidance (spec 4.5)."""
        return self._run(x, t, context, None)

    def _run(self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor,
             guide_hint: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"latents must be [B,C,h,w], got shape {tuple(x.shape)}")
        batch = x.shape[0]
        context = _broadcast_context(context, batch)
        t_emb = self.unet.time_proj(_timesteps(t, batch, x.device)).to(x.dtype)
        emb = self.unet.time_embedding(t_emb)
        call = _call_checkpointed if (self.gradient_checkpointing and torch.is_grad_enabled()) else _call_direct

        enc_res: list[torch.Tensor] | None = None
        mid_res: torch.Tensor | None = None
        dec_res: list[torch.Tensor] | None = None
        if guide_hint is not None:
            enc_res, mid_res, dec_res = self._control_residuals(x, guide_hint, t_emb, context, call)
        return self._walk_base(x, emb, context, enc_res, mid_res, dec_res, call)

    def _control_residuals(self, x: torch.Tensor, guide_hint: torch.Tensor, t_emb: torch.Tensor,
                           context: torch.Tensor, call: Callable[..., torch.Tensor],
                           ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """The 12 + 1 + 12 scaled zero-conv outputs the base walk adds."""
        feats, mid = call(self.control, x, guide_hint, t_emb, context)
        scales = self.scale_list.unbind(0)
        n = len(feats)
        enc = [z(f) * s for z, f, s in zip(self.enc_zero_convs_out, feats, scales[:n])]
        mid_res = self.middle_block_out(mid) * scales[n]
        dec = [z(feats[n - 1 - j]) * scales[n + 1 + j] for j, z in enumerate(self.dec_zero_convs_out)]
        return enc, mid_res, dec

    def _walk_base(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                   enc_res: list[torch.Tensor] | None, mid_res: torch.Tensor | None,
                   dec_res: list[torch.Tensor] | None, call: Callable[..., torch.Tensor]) -> torch.Tensor:
        """UNet2DConditionModel.forward, one LDM block at a time, with the injections."""
        unet = self.unet
        up_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(s % up_factor for s in x.shape[-2:])

        h = unet.conv_in(x)
        i = 0
        if enc_res is not None:
            h = h + enc_res[i]
        skips = [h]
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None)
            for r, resnet in enumerate(block.resnets):
                h = call(resnet, h, emb)
                if attentions is not None:
                    h = call(_call_attention, attentions[r], h, context)
                i += 1
                if enc_res is not None:
                    h = h + enc_res[i]
                skips.append(h)
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    h = down(h)
                i += 1
                if enc_res is not None:
                    h = h + enc_res[i]
                skips.append(h)

        mid = unet.mid_block
        if getattr(mid, "has_cross_attention", False):
            h = call(_call_mid, mid, h, emb, context)
        else:
            h = call(mid, h, emb)
        if mid_res is not None:
            h = h + mid_res

        j = 0
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None)
            for r, resnet in enumerate(block.resnets):
                if dec_res is not None:
                    h = h + dec_res[j]
                h = torch.cat([h, skips.pop()], dim=1)
                h = call(resnet, h, emb)
                if attentions is not None:
                    h = call(_call_attention, attentions[r], h, context)
                j += 1
            if block.upsamplers is not None:
                size = skips[-1].shape[2:] if forward_upsample_size and skips else None
                for up in block.upsamplers:
                    h = up(h, size)

        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


def _timesteps(t: int | float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """t as a [B] tensor: an int/float, a 0-d tensor, or a [1] / [B] tensor (diffusers' rules)."""
    if not torch.is_tensor(t):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"timestep must be an int, float or tensor, got {type(t).__name__}")
        dtype = torch.float32 if isinstance(t, float) else torch.int64
        return torch.full((batch,), t, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t[None]
    if t.dim() != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"timesteps must be a scalar or of shape [{batch}], got {tuple(t.shape)}")
    return t.to(device).expand(batch)


def _broadcast_context(context: torch.Tensor, batch: int) -> torch.Tensor:
    """[1,L,D] (the stored empty-prompt embedding) or [B,L,D] -> [B,L,D]."""
    if context.dim() != 3:
        raise ValueError(f"context must be [B,L,D], got shape {tuple(context.shape)}")
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, -1, -1)
    raise ValueError(f"context batch {context.shape[0]} does not match latents batch {batch} (nor is it 1)")
