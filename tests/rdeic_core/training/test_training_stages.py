"""One optimizer step of every stage on the tiny config: finite losses, the right parameters move,
the frozen ones stay bit-identical, and stage 2's gradient really runs through the sampler."""

from __future__ import annotations

import pytest
import torch

from rdeic_core.codec import RDEICCodec
from rdeic_core.training.data import CropSettings, PhotoCrops
from rdeic_core.training.perceptual import MultiScaleDSSIM
from rdeic_core.training.stages import (
    STAGES,
    LossSettings,
    encode_for_training,
    load_trainable_state,
    prepare_for_stage,
    run_step,
    trainable_modules,
    trainable_state_dict,
)

EXPECTED_TERMS = {
    "vae": {"l_rec", "l_kl", "l_ssim", "l_mse", "loss"},
    "prior": {"l_eps", "loss"},
    "stage1": {"l_simple", "l_guide", "l_bpp", "l_vq", "q_bpp", "loss"},
    "stage2": {"l_mse", "l_lpips", "l_guide", "l_bpp", "l_vq", "q_bpp", "loss"},
}


@pytest.fixture(scope="module")
def images(mini_photos_dir) -> torch.Tensor:
    ds = PhotoCrops.from_photos_dir(mini_photos_dir, CropSettings(64), seed=0, max_side=256)
    return ds.batch(0, 2)


def _trainable_names(codec: RDEICCodec, stage: str) -> set[str]:
    prefixes = tuple(p + "." for p in trainable_modules(codec, stage))
    return {n for n, _ in codec.named_parameters() if n.startswith(prefixes)}


def test_encoder_helper_equals_the_vae_methods(images):
    codec = RDEICCodec.from_config("tiny", seed=0)
    with torch.no_grad():
        enc = encode_for_training(codec.vae, images)
        dist = codec.vae.vae.encode(images).latent_dist
        assert torch.allclose(enc.feat, codec.vae.encode_features(images), atol=1e-6)
        assert torch.allclose(enc.mean, dist.mean, atol=1e-6)
        assert torch.allclose(enc.logvar, dist.logvar, atol=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_one_step_moves_exactly_the_stage_parameters(stage, images):
    torch.manual_seed(0)
    codec = RDEICCodec.from_config("tiny", seed=0)
    params = prepare_for_stage(codec, stage)
    trainable = _trainable_names(codec, stage)
    assert {id(p) for p in params} == {id(p) for n, p in codec.named_parameters() if n in trainable}
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    out = run_step(stage, codec, images, g, LossSettings(fixed_step=2), MultiScaleDSSIM())
    assert set(out.terms) == EXPECTED_TERMS[stage]
    assert all(torch.isfinite(v) for v in out.terms.values()), out.terms
    assert torch.isfinite(out.total) and out.total.requires_grad
    out.total.backward()
    for name, p in codec.named_parameters():
        if name in trainable:
            assert p.grad is not None, f"{stage}: {name} got no gradient"
        else:
            assert p.grad is None, f"{stage}: frozen {name} got a gradient"
    opt.step()
    after = codec.state_dict()
    moved = {k for k in trainable if not torch.equal(before[k], after[k])}
    owned = set(trainable_state_dict(codec, stage))  # parameters and buffers of the stage's modules
    frozen_changed = [k for k in after if k not in owned and not torch.equal(before[k], after[k])]
    assert not frozen_changed, f"{stage}: frozen entries changed: {frozen_changed[:5]}"
    # every trainable tensor with a non-zero gradient moved
    with_grad = {n for n, p in codec.named_parameters() if n in trainable and float(p.grad.abs().sum()) > 0}
    assert with_grad, f"{stage}: no trainable parameter got a non-zero gradient"
    assert with_grad <= moved


def test_frozen_modules_are_bit_identical_after_a_stage1_step(images):
    codec = RDEICCodec.from_config("tiny", seed=0)
    params = prepare_for_stage(codec, "stage1")
    vae_before = {k: v.clone() for k, v in codec.vae.state_dict().items()}
    unet_before = {k: v.clone() for k, v in codec.noise_estimator.unet.state_dict().items()}
    ctx_before = codec.context.clone()
    out_before = codec.compression.out.weight.detach().clone()
    opt = torch.optim.AdamW(params, lr=1e-3)
    out = run_step("stage1", codec, images, torch.Generator().manual_seed(0), LossSettings())
    out.total.backward()
    opt.step()
    vae_after = codec.vae.state_dict()
    unet_after = codec.noise_estimator.unet.state_dict()
    assert all(torch.equal(v, vae_after[k]) for k, v in vae_before.items())
    assert all(torch.equal(v, unet_after[k]) for k, v in unet_before.items())
    assert torch.equal(ctx_before, codec.context)
    # the compression module and the (zero-initialised) zero convs did move
    assert not torch.equal(codec.compression.out.weight.detach(), out_before)
    assert float(codec.noise_estimator.enc_zero_convs_out[0][0].weight.detach().abs().sum()) > 0


def test_stage2_gradient_flows_through_sampler_and_decoder(images):
    """The zero convs only influence the loss through the S-step chain and the VAE decode (the rate,
    VQ and latent-alignment terms do not use the UNet), so their gradient proves that path."""
    codec = RDEICCodec.from_config("tiny", seed=0)
    prepare_for_stage(codec, "stage2")
    settings = LossSettings(fixed_step=2)
    out = run_step("stage2", codec, images, torch.Generator().manual_seed(0), settings, None)
    out.total.backward()
    zc = codec.noise_estimator.enc_zero_convs_out[0][0].weight
    assert zc.grad is not None and float(zc.grad.abs().sum()) > 0
    # and a larger S runs more UNet passes with the same parameter set
    codec.zero_grad(set_to_none=True)
    out5 = run_step("stage2", codec, images, torch.Generator().manual_seed(0), LossSettings(fixed_step=5), None)
    assert torch.isfinite(out5.total)


def test_step_randomness_comes_from_the_generator(images):
    codec = RDEICCodec.from_config("tiny", seed=0)
    prepare_for_stage(codec, "prior")
    a = run_step("prior", codec, images, torch.Generator().manual_seed(3), LossSettings())
    b = run_step("prior", codec, images, torch.Generator().manual_seed(3), LossSettings())
    c = run_step("prior", codec, images, torch.Generator().manual_seed(4), LossSettings())
    assert torch.equal(a.total, b.total)
    assert not torch.equal(a.total, c.total)


def test_trainable_state_round_trip(images):
    a = RDEICCodec.from_config("tiny", seed=0)
    b = RDEICCodec.from_config("tiny", seed=1)
    state = trainable_state_dict(a, "stage1")
    assert state and all(k.startswith(("compression.", "noise_estimator.")) for k in state)
    assert not any(k.startswith("noise_estimator.unet.") for k in state)
    load_trainable_state(b, "stage1", state)
    loaded = b.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in state.items())
    with pytest.raises(KeyError, match="missing"):
        load_trainable_state(b, "stage1", {k: v for k, v in state.items() if "compression.out" not in k})


def test_images_of_a_wrong_size_are_refused(images):
    codec = RDEICCodec.from_config("tiny", seed=0)
    with pytest.raises(ValueError, match="multiple of 64"):
        run_step("stage1", codec, images[:, :, :48, :48], torch.Generator(), LossSettings())
    with pytest.raises(ValueError, match="unknown stage"):
        run_step("stage3", codec, images, torch.Generator(), LossSettings())


def test_fresh_control_keeps_every_other_weight_and_starts_silent():
    """--control-ratio: a wider control module replaces the old one; the rest is copied bit for bit,
    and with its zero convs at zero the new control leaves the sampler's output unchanged."""
    from rdeic_core.training.trainer import CONTROL_PREFIXES, TrainConfig, with_fresh_control

    codec = RDEICCodec.from_config("tiny", seed=3)
    wide = with_fresh_control(codec, 1.0, seed=5)
    assert wide.config.control.ratio == 1.0 and codec.config.control.ratio != 1.0
    old, new = codec.state_dict(), wide.state_dict()
    kept = [k for k in old if not k.startswith(CONTROL_PREFIXES)]
    assert kept and all(torch.equal(old[k], new[k]) for k in kept)
    assert wide.noise_estimator.control.out_channels[0] > codec.noise_estimator.control.out_channels[0]
    image = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    lat = codec.decode_latents(codec.encode([image]))
    shape = tuple(lat.c_latent.shape[1:])
    start, noise = codec.noise_for(7, shape, 2)
    x_old = codec.reconstruct_latent(lat.c_latent, lat.guide_hint, 2, 1.0, start, noise)
    x_new = wide.reconstruct_latent(lat.c_latent, lat.guide_hint, 2, 1.0, start, noise)
    assert torch.equal(x_old, x_new)
    with pytest.raises(ValueError, match="stage1"):
        TrainConfig(stage="stage2", run_dir="r", control_ratio=1.0).resolved()
    with pytest.raises(ValueError, match="> 0"):
        TrainConfig(stage="stage1", run_dir="r", control_ratio=0.0).resolved()


def test_stage2_can_also_train_the_vae_decoder_and_only_it(images):
    """``vae_decoder``: stage 2 also moves the VAE decoder (and post-quant conv); the VAE encoder, the
    UNet and the context stay bit-identical, and no other stage accepts the option."""
    codec = RDEICCodec.from_config("tiny", seed=0)
    params = prepare_for_stage(codec, "stage2", vae_decoder=True)
    owned = set(trainable_state_dict(codec, "stage2", vae_decoder=True))
    assert any(k.startswith("vae.vae.decoder.") for k in owned)
    assert any(k.startswith("vae.vae.post_quant_conv.") for k in owned)
    assert not any(k.startswith(("vae.vae.encoder.", "vae.vae.quant_conv.", "noise_estimator.unet.")) for k in owned)
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-3)
    out = run_step("stage2", codec, images, torch.Generator().manual_seed(0), LossSettings(fixed_step=2), None)
    out.total.backward()
    opt.step()
    after = codec.state_dict()
    assert not torch.equal(before["vae.vae.decoder.conv_out.weight"], after["vae.vae.decoder.conv_out.weight"])
    changed_outside = [k for k in after if k not in owned and not torch.equal(before[k], after[k])]
    assert not changed_outside, changed_outside[:5]
    # without the option the decoder is frozen, as the reference's
    assert not any(k.startswith("vae.") for k in trainable_state_dict(codec, "stage2"))
    for stage in ("vae", "prior", "stage1"):
        with pytest.raises(ValueError, match="stage2 option"):
            trainable_modules(codec, stage, vae_decoder=True)
