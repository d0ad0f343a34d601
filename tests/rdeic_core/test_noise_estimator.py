"""Tests of the noise estimator: diffusers SD UNet + RDEIC control module with cross-control wiring."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from rdeic_core.config import ControlConfig, find_denominator, sd21, tiny
from rdeic_core.noise_estimator import ControlModule, FP32GroupNorm, NoiseEstimator

H = W = 8  # latent size: 8 -> 4 -> 2 -> 1 through the three downsamplers
N_ENC = 12


@pytest.fixture(scope="module")
def model() -> NoiseEstimator:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return NoiseEstimator(tiny()).eval()


@pytest.fixture()
def inputs(model: NoiseEstimator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = tiny()
    x = torch.randn(2, 4, H, W, generator=g)
    t = torch.tensor([17, 260])
    ctx = torch.randn(1, 5, cfg.context_dim, generator=g)
    hint = torch.randn(2, cfg.compression.M, H, W, generator=g)
    return x, t, ctx, hint


def zero_convs(model: NoiseEstimator) -> list[nn.Conv2d]:
    """The 25 injections in scale_list order: 12 enc, mid, 12 dec."""
    return ([z[0] for z in model.enc_zero_convs_out] + [model.middle_block_out[0]]
            + [z[0] for z in model.dec_zero_convs_out])


def randomized(model: NoiseEstimator, everything: bool = False, seed: int = 0) -> NoiseEstimator:
    """A copy with random zero convs (and, with `everything`, random control weights too)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    params: Iterator[nn.Parameter] = m.trainable_parameters() if everything else (
        p for z in zero_convs(m) for p in z.parameters())
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


# 1 -------------------------------------------------------------------------------------------------
def test_zero_init_is_plain_sd(model, inputs):
    x, t, ctx, hint = inputs
    with torch.no_grad():
        ref = model.unet(x, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample
        out = model(x, t, ctx, hint)
        unc = model.forward_unconditional(x, t, ctx)
    assert ref.abs().max() > 0.1  # a non-degenerate reference
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(unc, ref, atol=1e-5, rtol=0)


def test_odd_latent_size_follows_diffusers(model):
    """Sizes that do not halve evenly take diffusers' explicit upsample_size path."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 9, 11, generator=g)
    ctx = torch.randn(1, 5, tiny().context_dim, generator=g)
    hint = torch.randn(1, tiny().compression.M, 9, 11, generator=g)
    with torch.no_grad():
        ref = model.unet(x, 3, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(model(x, 3, ctx, hint), ref, atol=1e-5, rtol=0)
        assert randomized(model)(x, 3, ctx, hint).shape == (1, 4, 9, 11)


@pytest.mark.parametrize("t", [37, torch.tensor(37), torch.tensor([37]), torch.tensor([37, 37])])
def test_timestep_forms_agree(model, inputs, t):
    x, _, ctx, _ = inputs
    with torch.no_grad():
        ref = model.unet(x, torch.tensor([37, 37]), encoder_hidden_states=ctx.expand(2, -1, -1)).sample
        torch.testing.assert_close(model.forward_unconditional(x, t, ctx), ref, atol=1e-5, rtol=0)
        other = model.forward_unconditional(x, 38, ctx)
    assert not torch.allclose(other, ref, atol=1e-5)  # t really reaches the network


def test_bad_shapes_are_refused(model, inputs):
    x, t, ctx, hint = inputs
    with pytest.raises(ValueError, match="guide_hint"):
        model(x, t, ctx, hint[:, :, :4])
    with pytest.raises(ValueError, match="context batch"):
        model(x, t, ctx.expand(3, -1, -1), hint)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]), ctx, hint)


# 2 -------------------------------------------------------------------------------------------------
def test_control_changes_output_and_gets_gradients(model, inputs):
    # 16x16 latents: at 8x8 the middle block sees a single token, whose self-attention
    # softmax is constant, so its query/key weights would legitimately get no gradient.
    _, t, ctx, _ = inputs
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=g)
    hint = torch.randn(2, tiny().compression.M, 16, 16, generator=g)
    with torch.no_grad():
        base = model(x, t, ctx, hint)
    m = randomized(model, everything=True)
    x = x.clone().requires_grad_(True)
    hint = hint.clone().requires_grad_(True)
    out = m(x, t, ctx, hint)
    assert (out - base).abs().max() > 1e-3
    out.square().mean().backward()
    names = {id(p): n for n, p in m.named_parameters()}
    dead = [names[id(p)] for p in m.trainable_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient reached {dead[:5]} (+{max(0, len(dead) - 5)})"
    assert all(p.grad is None for p in m.unet.parameters())  # frozen ...
    assert not any(p.requires_grad for p in m.unet.parameters())
    assert hint.grad is not None and hint.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0  # ... but differentiable through


def test_trainable_parameters_are_control_and_zero_convs(model):
    trainable = {id(p) for p in model.trainable_parameters()}
    expected = {id(p) for n, p in model.named_parameters() if not n.startswith("unet.")}
    assert trainable == expected
    assert not trainable & {id(p) for p in model.unet.parameters()}


def test_gradient_checkpointing_gives_same_gradients(model, inputs):
    x, t, ctx, hint = inputs
    m = randomized(model, everything=True, seed=3)
    grads = []
    for flag in (False, True):
        m.gradient_checkpointing = flag
        m.zero_grad(set_to_none=True)
        m(x, t, ctx, hint).square().mean().backward()
        grads.append([p.grad.clone() for p in m.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# 3 -------------------------------------------------------------------------------------------------
def test_every_injection_is_used_with_its_own_scale(model, inputs):
    """Perturbing any single zero conv changes the output; zeroing its scale undoes that."""
    x, t, ctx, hint = inputs
    m = copy.deepcopy(model)
    convs = zero_convs(m)
    assert len(convs) == 25 == m.scale_list.numel()
    g = torch.Generator().manual_seed(5)
    unused, misindexed = [], []
    with torch.no_grad():
        base = m(x, t, ctx, hint)
        for k, conv in enumerate(convs):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
            if torch.allclose(m(x, t, ctx, hint), base, atol=1e-5):
                unused.append(k)
            m.scale_list[k] = 0.0
            if not torch.allclose(m(x, t, ctx, hint), base, atol=1e-6):
                misindexed.append(k)
            m.scale_list[k] = 1.0
            conv.weight.zero_()
    assert not unused, f"injections {unused} do not affect the output"
    assert not misindexed, f"scale_list entries {misindexed} do not scale their own injection"


# 4 -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd21_model() -> NoiseEstimator:
    with torch.device("meta"):
        return NoiseEstimator(sd21())


def test_sd21_zero_conv_shapes(sd21_model):
    m = sd21_model
    enc = [(z[0].in_channels, z[0].out_channels) for z in m.enc_zero_convs_out]
    dec = [(z[0].in_channels, z[0].out_channels) for z in m.dec_zero_convs_out]
    assert enc == [(64, 320)] * 4 + [(128, 640)] * 3 + [(256, 1280)] * 5
    assert (m.middle_block_out[0].in_channels, m.middle_block_out[0].out_channels) == (256, 1280)
    assert dec == [(256, 1280)] * 5 + [(128, 1280)] * 2 + [(128, 640)] + [(64, 640)] * 2 + [(64, 320)] * 2
    assert all(z[0].kernel_size == (1, 1) for z in [*m.enc_zero_convs_out, *m.dec_zero_convs_out])
    assert m.scale_list.shape == (25,)


def test_sd21_control_layout(sd21_model):
    c = sd21_model.control
    first = c.input_blocks[0][0]
    assert (first.in_channels, first.out_channels, first.kernel_size) == (260, 64, (3, 3))
    assert [type(m) for m in c.time_embed] == [nn.Linear, nn.SiLU, nn.Linear]
    assert (c.time_embed[0].in_features, c.time_embed[0].out_features,
            c.time_embed[2].out_features) == (320, 1280, 1280)
    assert len(c.input_blocks) == N_ENC
    assert c.out_channels == [64, 64, 64, 64, 128, 128, 128, 256, 256, 256, 256, 256]
    # attention exactly where SD has cross-attention down blocks (levels 0-2), plus the middle block
    with_attn = [i for i, b in enumerate(c.input_blocks) if any(isinstance(m, Transformer2DModel) for m in b)]
    assert with_attn == [1, 2, 4, 5, 7, 8]
    assert [type(m) for m in c.middle_block] == [ResnetBlock2D, Transformer2DModel, ResnetBlock2D]
    for i in (3, 6, 9):
        down = c.input_blocks[i][0].conv
        assert (down.stride, down.padding, down.kernel_size) == ((2, 2), (1, 1), (3, 3))
    resnets = [m for m in c.modules() if isinstance(m, ResnetBlock2D)]
    assert len(resnets) == 10
    for r in resnets:
        assert isinstance(r.norm1, FP32GroupNorm) and isinstance(r.norm2, FP32GroupNorm)
        assert r.norm1.num_groups == r.norm2.num_groups == 32 and r.norm1.eps == r.norm2.eps == 1e-5
        assert r.output_scale_factor == 1.0 and r.time_emb_proj.in_features == 1280
    transformers = [m for m in c.modules() if isinstance(m, Transformer2DModel)]
    assert len(transformers) == 7
    for tr in transformers:
        assert tr.norm.num_groups == 32 and tr.norm.eps == 1e-6
        assert isinstance(tr.proj_in, nn.Linear) and len(tr.transformer_blocks) == 1
        for attn in (tr.transformer_blocks[0].attn1, tr.transformer_blocks[0].attn2):
            assert attn.inner_dim // attn.heads == 16 and attn.inner_dim == tr.in_channels
        assert tr.transformer_blocks[0].attn2.to_k.in_features == 1024


def test_sd21_parameter_count(sd21_model):
    n_control = sum(p.numel() for p in sd21_model.control.parameters())
    n_trainable = sum(p.numel() for p in sd21_model.trainable_parameters())
    assert n_control == 20_068_352
    assert n_trainable == 24_555_392  # spec compute.md: ~24.6 M including the zero convs


# 5 -------------------------------------------------------------------------------------------------
def _base_steps(unet) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module], list[nn.Module]]:
    """(producer, consumer) modules around each encoder injection and each decoder injection."""
    enc_prod, enc_cons = [unet.conv_in], []
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None)
        for r, res in enumerate(block.resnets):
            enc_cons.append(res)
            enc_prod.append(attns[r] if attns is not None else res)
        if block.downsamplers is not None:
            enc_cons.append(block.downsamplers[0])
            enc_prod.append(block.downsamplers[0])
    enc_cons.append(unet.mid_block)
    dec_prod, dec_cons = [unet.mid_block], []
    for block in unet.up_blocks:
        attns = getattr(block, "attentions", None)
        for r, res in enumerate(block.resnets):
            dec_cons.append(res)
            dec_prod.append(attns[r] if attns is not None else res)
        if block.upsamplers is not None:
            dec_prod[-1] = block.upsamplers[0]
    return enc_prod, enc_cons, dec_prod[:-1], dec_cons


def test_injections_add_at_the_right_places(model, inputs):
    """Hook-based: every injection is `h_base + scale * Z(control feature)` at the LDM block boundary."""
    x, t, ctx, hint = inputs
    m = randomized(model, everything=True, seed=7)
    with torch.no_grad():
        m.scale_list.copy_(torch.linspace(0.5, 1.7, 25))
    enc_prod, enc_cons, dec_prod, dec_cons = _base_steps(m.unet)
    assert len(enc_prod) == len(enc_cons) == len(dec_prod) == len(dec_cons) == N_ENC

    outs: dict[int, torch.Tensor] = {}
    ins: dict[int, torch.Tensor] = {}
    z_in: dict[int, torch.Tensor] = {}
    z_out: dict[int, torch.Tensor] = {}

    def keep_out(mod, args, out):
        outs[id(mod)] = out[0] if isinstance(out, tuple) else out

    def keep_in(mod, args):
        ins[id(mod)] = args[0]

    handles = [mod.register_forward_hook(keep_out) for mod in {*enc_prod, *dec_prod, *m.control.input_blocks}]
    handles += [mod.register_forward_pre_hook(keep_in) for mod in {*enc_cons, *dec_cons}]
    def keep_z(j: int):
        def hook(mod, args, out):
            z_in[j], z_out[j] = args[0], out
        return hook

    for j, z in enumerate(m.dec_zero_convs_out):
        handles.append(z.register_forward_hook(keep_z(j)))
    try:
        with torch.no_grad():
            m(x, t, ctx, hint)
            feats = [outs[id(b)] for b in m.control.input_blocks]
            s = m.scale_list
            for i in range(N_ENC):
                injected = ins[id(enc_cons[i])] - outs[id(enc_prod[i])]
                torch.testing.assert_close(injected, m.enc_zero_convs_out[i](feats[i]) * s[i], atol=1e-5, rtol=1e-4)
            mid_res = m.middle_block_out(m.control(x, hint, m.unet.time_proj(t), ctx)[1]) * s[N_ENC]
            for j in range(N_ENC):
                h_before = outs[id(dec_prod[j])]
                # the Z^dec_j output matches h_base before up-block step j in channels and resolution ...
                assert z_out[j].shape == h_before.shape, (
                    f"Z^dec_{j}: {tuple(z_out[j].shape)} vs {tuple(h_before.shape)}")
                # ... is fed control input block 11-j ...
                assert z_in[j] is feats[N_ENC - 1 - j], f"Z^dec_{j} is not fed control input block {N_ENC - 1 - j}"
                # ... and is added before the skip concat
                resnet_in = ins[id(dec_cons[j])]
                injected = resnet_in[:, : h_before.shape[1]] - h_before
                expected = z_out[j] * s[N_ENC + 1 + j] + (mid_res if j == 0 else 0)
                torch.testing.assert_close(injected, expected, atol=1e-5, rtol=1e-4)
    finally:
        for hd in handles:
            hd.remove()


def test_encoder_injection_reaches_later_base_blocks(model, inputs):
    """Unlike diffusers' down_block_additional_residuals, Z^enc_0 changes what the next base block sees."""
    x, t, ctx, hint = inputs
    m = copy.deepcopy(model)
    seen = []
    hd = m.unet.down_blocks[0].resnets[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            m(x, t, ctx, hint)
            m.enc_zero_convs_out[0][0].bias.fill_(0.5)
            m(x, t, ctx, hint)
    finally:
        hd.remove()
    assert not torch.allclose(seen[0], seen[1])


# control-module details ----------------------------------------------------------------------------
def test_tiny_control_uses_find_denominator():
    cfg = tiny()
    c = ControlModule(cfg.unet, cfg.control, cfg.compression.M)
    assert c.out_channels == [8, 8, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32]
    for r in (m for m in c.modules() if isinstance(m, ResnetBlock2D)):
        assert r.norm1.num_groups == find_denominator(r.in_channels, cfg.control.norm_groups)
        assert r.norm2.num_groups == find_denominator(r.out_channels, cfg.control.norm_groups)
    for tr in (m for m in c.modules() if isinstance(m, Transformer2DModel)):
        assert tr.norm.num_groups == find_denominator(tr.in_channels, cfg.control.norm_groups)
        assert tr.transformer_blocks[0].attn1.heads == tr.in_channels // 4


def test_middle_block_reuses_last_head_width():
    """Reference quirk: the middle transformer keeps the head width of the last attention level."""
    base = dict(tiny().unet)
    base.update(block_out_channels=[70, 140, 280, 280],
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"])
    c = ControlModule(base, ControlConfig(ratio=0.2, num_head_channels=6, norm_groups=32), hint_channels=3)
    assert c.out_channels[-1] == 56
    level0 = c.input_blocks[1][1].transformer_blocks[0].attn1
    assert (level0.heads, level0.inner_dim) == (7, 14)  # find_denominator(14, 6) = 2
    mid = c.middle_block[1].transformer_blocks[0].attn1
    assert (mid.heads, mid.inner_dim) == (28, 56)  # 2-wide heads, not find_denominator(56, 6) = 4


def test_residual_outputs_start_at_zero_like_ldm(model):
    c = model.control
    for r in (m for m in c.modules() if isinstance(m, ResnetBlock2D)):
        assert r.conv2.weight.abs().sum() == 0 and r.conv2.bias.abs().sum() == 0
    for tr in (m for m in c.modules() if isinstance(m, Transformer2DModel)):
        assert tr.proj_out.weight.abs().sum() == 0
    assert all(z.weight.abs().sum() == 0 and z.bias.abs().sum() == 0 for z in zero_convs(model))
