"""The four training stages: what each trains, and the forward half of its step (the loss).

=========  ====================================================  ==========================================
stage      trains                                                loss (``LossTerms.terms`` keys)
=========  ====================================================  ==========================================
``vae``    the VAE (encoder, decoder, quant convs)               l_rec (L1 or MSE) + kl_weight·l_kl
                                                                 + ssim_weight·l_ssim
``prior``  the base UNet (plain ε-prediction DDPM,                l_eps = ‖ε̂ − ε‖², t ~ U{0..T−1}
           t ~ U{0..999}, on scaling·VAE latent, stored context)
``stage1`` compression module + control module + zero convs      spec 4.3: λ_g(l_simple + l_guide)
           (VAE, UNet and context frozen)                        + l_bpp + l_vq  (q_bpp logged)
``stage2`` as stage1                                             spec §5: λ_g(l_mse + 0.5·l_lpips + l_guide)
                                                                 + l_bpp + l_vq  (q_bpp logged)
=========  ====================================================  ==========================================

The step functions only compute the loss; backward, clipping and the optimizer are the
trainer's (so the same functions run under DDP, autocast or in a test). All randomness of a
step (posterior samples, ε, t, sampler noise) comes from the ``torch.Generator`` passed in, so
a trainer that saves its state resumes bit-exactly. The one exception is compressai's
additive-uniform rate proxy, which draws from torch's global RNG (the trainer saves that too).

The entropy-model part (compression forward, rate and every loss) always runs in float32,
also when the caller enables bf16 autocast for the VAE and UNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..codec import RDEICCodec
from ..compression import CompressionOutput
from ..losses import (
    LossTerms,
    lowfreq_mse,
    predict_x0,
    rate_bpp,
    residual_forward,
    sample_train_timesteps,
    stage1_loss,
    stage2_loss,
)
from ..sampler import relay_start, sample
from ..schedule import alphas_cumprod, relay_schedule
from ..vae import SDVAE

STAGES = ("vae", "prior", "stage1", "stage2")

PerceptualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossSettings:
    """Weights and knobs of the stage losses (defaults: the reference's where it has one)."""

    lambda_g: float = 2.0  # l_guide_weight: sets the rate point (spec 4.3); {2, 1, 0.5, 0.25, 0.1}
    bpp_weight: float = 1.0  # l_bpp_weight, fixed at 1 in the reference
    fixed_step: int = 2  # S of stage-2 fine-tuning (RDEIC-2 / RDEIC-5)
    lpips_weight: float = 0.5  # weight of the perceptual term inside λ_g(...) in stage 2
    rec_loss: str = "l1"  # vae: "l1" or "mse"
    kl_weight: float = 1e-4  # vae: weight of the per-element KL(q(z|x) ‖ N(0, I))
    ssim_weight: float = 0.2  # vae: weight of the multi-scale DSSIM term (0 = off)
    # vae and stage 2: weight of an extra MSE between 16x16 block means of the output and the input
    # (0 = off, the reference). Plain MSE weighs a colour cast no more than any other error of the
    # same energy; this term makes the low frequencies — mean colour above all — cost more.
    lowfreq_weight: float = 0.0

    def validate(self) -> None:
        if self.lambda_g <= 0:
            raise ValueError(f"lambda_g must be > 0, got {self.lambda_g}")
        if self.fixed_step < 1:
            raise ValueError(f"fixed_step must be >= 1 for stage-2 fine-tuning, got {self.fixed_step}")
        if self.rec_loss not in ("l1", "mse"):
            raise ValueError(f"rec_loss must be 'l1' or 'mse', got {self.rec_loss!r}")
        for name in ("bpp_weight", "lpips_weight", "kl_weight", "ssim_weight", "lowfreq_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------
# parameter groups


def trainable_modules(codec: RDEICCodec, stage: str, vae_decoder: bool = False) -> dict[str, nn.Module]:
    """State-dict prefix -> module trained in ``stage`` (everything else is frozen).

    stage1/stage2 follow the reference's ``configure_optimizers`` with ``sd_locked``: the
    control model (control module + 25 zero convs) and the compression module. ``vae_decoder``
    (stage 2 only) also trains the VAE decoder on the latents the chain actually produces — not the
    reference's recipe (its SD VAE is frozen), but what a small from-scratch model gains from: a
    decoder that has only seen clean latents renders the codec's blurrier ones worse than it could.
    """
    ne = codec.noise_estimator
    if vae_decoder and stage != "stage2":
        raise ValueError(f"training the VAE decoder is a stage2 option, not {stage}")
    if stage == "vae":
        return {"vae": codec.vae}
    if stage == "prior":
        return {"noise_estimator.unet": ne.unet}
    if stage in ("stage1", "stage2"):
        modules: dict[str, nn.Module] = {
            "compression": codec.compression,
            "noise_estimator.control": ne.control,
            "noise_estimator.enc_zero_convs_out": ne.enc_zero_convs_out,
            "noise_estimator.middle_block_out": ne.middle_block_out,
            "noise_estimator.dec_zero_convs_out": ne.dec_zero_convs_out,
        }
        if vae_decoder:
            vae = codec.vae.vae
            modules["vae.vae.decoder"] = vae.decoder
            if vae.post_quant_conv is not None:
                modules["vae.vae.post_quant_conv"] = vae.post_quant_conv
        return modules
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def prepare_for_stage(codec: RDEICCodec, stage: str, vae_decoder: bool = False) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze (and put in train mode) the stage's modules; returns their
    parameters in a fixed order (the optimizer's)."""
    modules = trainable_modules(codec, stage, vae_decoder)
    codec.requires_grad_(False)
    codec.eval()
    params: list[nn.Parameter] = []
    for module in modules.values():
        module.requires_grad_(True)
        module.train()
        params.extend(module.parameters())
    if not params:
        raise RuntimeError(f"stage {stage!r} has no trainable parameters")
    return params


def trainable_state_dict(codec: RDEICCodec, stage: str, vae_decoder: bool = False) -> dict[str, torch.Tensor]:
    """The codec state-dict entries (parameters and buffers) owned by the stage's modules."""
    prefixes = tuple(p + "." for p in trainable_modules(codec, stage, vae_decoder))
    return {k: v for k, v in codec.state_dict().items() if k.startswith(prefixes)}


def load_trainable_state(codec: RDEICCodec, stage: str, state: dict[str, torch.Tensor],
                         vae_decoder: bool = False) -> None:
    """Inverse of :func:`trainable_state_dict`: every key of the stage's modules must be present."""
    expected = set(trainable_state_dict(codec, stage, vae_decoder))
    got = set(state)
    if expected != got:
        raise KeyError(f"checkpoint does not match stage {stage!r}: missing {sorted(expected - got)[:5]}, "
                       f"unexpected {sorted(got - expected)[:5]}")
    own = dict(codec.named_buffers())
    for k, v in state.items():  # compressai CDF tables are sized by the stored tables
        if k.startswith("compression.gaussian_conditional.") and k in own and own[k].shape != v.shape:
            own[k].resize_(v.shape)
    codec.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------
# shared pieces


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) drawn on the generator's device (CPU), moved to ``like``'s device, float32."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device)


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast inside (entropy model and losses stay float32)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _direct(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module(h)


def _checkpointed(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return checkpoint(module, h, use_reentrant=False)


@dataclass
class EncoderOutputs:
    feat: torch.Tensor  # scaling · pre-conv_out feature: the compression module's input
    mean: torch.Tensor  # posterior mean (unscaled)
    logvar: torch.Tensor  # posterior log-variance, clamped to [-30, 20] as diffusers does


def encode_for_training(vae: SDVAE, x: torch.Tensor) -> EncoderOutputs:
    """One VAE encoder pass giving both the compressed feature and the posterior.

    Equal to ``vae.encode_features(x)`` and ``vae.vae.encode(x).latent_dist`` (tested), without
    running the encoder twice.
    """
    enc = vae.vae.encoder
    run = _checkpointed if (getattr(enc, "gradient_checkpointing", False) and torch.is_grad_enabled()) else _direct
    h = enc.conv_in(x)
    for block in enc.down_blocks:
        h = run(block, h)
    h = run(enc.mid_block, h)
    h = enc.conv_act(enc.conv_norm_out(h))
    moments = enc.conv_out(h)
    if vae.vae.quant_conv is not None:
        moments = vae.vae.quant_conv(moments)
    mean, logvar = moments.chunk(2, dim=1)
    return EncoderOutputs(feat=h * vae.scaling_factor, mean=mean, logvar=logvar.clamp(-30.0, 20.0))


def posterior_sample(enc: EncoderOutputs, generator: torch.Generator) -> torch.Tensor:
    """Unscaled latent sample mean + std·ε (diffusers' ``DiagonalGaussianDistribution.sample``)."""
    eps = randn(enc.mean.shape, generator, enc.mean).to(enc.mean.dtype)
    return enc.mean + torch.exp(0.5 * enc.logvar) * eps


def _conditioning(codec: RDEICCodec, x: torch.Tensor, generator: torch.Generator,
                  ) -> tuple[torch.Tensor, CompressionOutput, torch.Tensor, torch.Tensor]:
    """Reference ``get_input``: z_0 (scaled posterior *sample*, no grad), the compression forward
    on the (frozen, detached) feature, and the rates in bits per image pixel."""
    with torch.no_grad():
        enc = encode_for_training(codec.vae, x)
        z0 = (posterior_sample(enc, generator) * codec.vae.scaling_factor).float()
        feat = enc.feat.float()
    with full_precision(x.device):
        comp = codec.compression(feat)
        num_pixels = x.shape[0] * x.shape[2] * x.shape[3]
        bpp = rate_bpp([comp.y_likelihoods], num_pixels)
        q_bpp = rate_bpp([comp.q_likelihoods], num_pixels).detach()
    return z0, comp, bpp, q_bpp


def _context(codec: RDEICCodec, batch: int, like: torch.Tensor) -> torch.Tensor:
    return codec.context.to(like.device).expand(batch, -1, -1)


def _check_images(x: torch.Tensor, multiple: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"image size {tuple(x.shape[2:])} must be a multiple of {multiple}")


# ---------------------------------------------------------------------------------------------------
# the stages


def vae_step(codec: RDEICCodec, x: torch.Tensor, generator: torch.Generator, settings: LossSettings,
             ssim_fn: PerceptualFn | None = None) -> LossTerms:
    """Autoencoder loss on images in [-1, 1]: reconstruction of a posterior sample + small KL
    (+ optional multi-scale DSSIM). The KL is per latent element, so ``kl_weight`` does not
    depend on the crop size."""
    _check_images(x, 8)
    enc = encode_for_training(codec.vae, x)
    z = posterior_sample(enc, generator)
    x_hat = codec.vae.vae.decode(z).sample
    with full_precision(x.device):
        x_hat = x_hat.float()
        mean, logvar = enc.mean.float(), enc.logvar.float()
        l_rec = F.l1_loss(x_hat, x) if settings.rec_loss == "l1" else F.mse_loss(x_hat, x)
        l_kl = 0.5 * torch.mean(mean**2 + torch.exp(logvar) - 1.0 - logvar)
        total = l_rec + settings.kl_weight * l_kl
        terms = {"l_rec": l_rec, "l_kl": l_kl}
        if settings.lowfreq_weight > 0:
            l_lowfreq = lowfreq_mse(x_hat, x)
            total = total + settings.lowfreq_weight * l_lowfreq
            terms["l_lowfreq"] = l_lowfreq
        if settings.ssim_weight > 0 and ssim_fn is not None:
            l_ssim = ssim_fn(x_hat, x).mean()
            total = total + settings.ssim_weight * l_ssim
            terms["l_ssim"] = l_ssim
        terms["l_mse"] = F.mse_loss(x_hat.detach(), x)  # logged for PSNR
        terms["loss"] = total
    return LossTerms(total, {k: v.detach() for k, v in terms.items()})


def prior_step(codec: RDEICCodec, x: torch.Tensor, generator: torch.Generator,
               settings: LossSettings) -> LossTerms:
    """Standard ε-prediction DDPM loss of the base UNet (no control) on scaling·VAE latents,
    t ~ U{0..T−1}, conditioned on the stored context. This is how the embedded model gets
    the "SD" prior that stage 1/2 then control."""
    _check_images(x, 8)
    sched = codec.config.schedule
    with torch.no_grad():
        enc = encode_for_training(codec.vae, x)
        z0 = (posterior_sample(enc, generator) * codec.vae.scaling_factor).float()
    b = x.shape[0]
    t = torch.randint(0, sched.num_train_timesteps, (b,), generator=generator).to(x.device)
    eps = randn(z0.shape, generator, z0)
    ab = torch.tensor(alphas_cumprod(sched), dtype=torch.float64)[t.cpu()]
    a = ab.sqrt().float().to(x.device).view(-1, 1, 1, 1)
    s = (1.0 - ab).sqrt().float().to(x.device).view(-1, 1, 1, 1)
    z_t = a * z0 + s * eps
    eps_hat = codec.noise_estimator.forward_unconditional(z_t, t, _context(codec, b, z_t))
    with full_precision(x.device):
        l_eps = F.mse_loss(eps_hat.float(), eps)
    return LossTerms(l_eps, {"l_eps": l_eps.detach(), "loss": l_eps.detach()})


def stage1_step(codec: RDEICCodec, x: torch.Tensor, generator: torch.Generator,
                settings: LossSettings) -> LossTerms:
    """Spec 4.3: residual forward process, t ~ U{0..N}, loss on x̂_0 (reference ``p_losses``,
    ``is_refine: False``). z_c is not detached: the compression module also learns through ε̃."""
    _check_images(x, codec.config.pad_multiple)
    sched = codec.config.schedule
    z0, comp, bpp, q_bpp = _conditioning(codec, x, generator)
    b = x.shape[0]
    t = sample_train_timesteps(b, sched, generator=generator, device=x.device)
    eps = randn(z0.shape, generator, z0)
    z_t = residual_forward(z0, comp.c_latent, t, eps, sched)
    eps_hat = codec.noise_estimator(z_t, t, _context(codec, b, z_t), comp.guide_hint)
    with full_precision(x.device):
        x0_hat = predict_x0(z_t, t, eps_hat.float(), sched)
        return stage1_loss(x0_hat, z0, comp.c_latent, bpp, comp.vq_loss, settings.lambda_g,
                           bpp_weight=settings.bpp_weight, q_bpp=q_bpp)


def stage2_step(codec: RDEICCodec, x: torch.Tensor, generator: torch.Generator,
                settings: LossSettings, perceptual_fn: PerceptualFn | None = None) -> LossTerms:
    """Spec §5, fixed-step fine-tuning: x_N = q_sample(z_c, N), the full S-step relay sampler
    *with gradients* (stochastic, noise from ``generator``), VAE decode with gradients, then
    image MSE + perceptual + latent alignment + rate + VQ (reference ``p_losses``, ``is_refine``)."""
    _check_images(x, codec.config.pad_multiple)
    sched = codec.config.schedule
    steps = settings.fixed_step
    z0, comp, bpp, q_bpp = _conditioning(codec, x, generator)
    zc = comp.c_latent
    b = x.shape[0]
    start_noise = randn(zc.shape, generator, zc)
    n_steps = len(relay_schedule(sched, steps).timesteps)
    step_noise = [randn(zc.shape, generator, zc) for _ in range(n_steps)]
    ctx = _context(codec, b, zc)
    ne = codec.noise_estimator
    hint = comp.guide_hint

    def eps_fn(z: torch.Tensor, t: int) -> torch.Tensor:
        return ne(z, t, ctx, hint).float()

    x_n = relay_start(zc, start_noise, sched)
    z_hat = sample(eps_fn, x_n, steps, sched, step_noise)
    x_hat = codec.vae.decode(z_hat)
    with full_precision(x.device):
        return stage2_loss(x_hat.float(), x, zc, z0, bpp, comp.vq_loss, settings.lambda_g, perceptual_fn,
                           lpips_weight=settings.lpips_weight, bpp_weight=settings.bpp_weight, q_bpp=q_bpp,
                           lowfreq_weight=settings.lowfreq_weight)


def run_step(stage: str, codec: RDEICCodec, x: torch.Tensor, generator: torch.Generator,
             settings: LossSettings, perceptual_fn: PerceptualFn | None = None) -> LossTerms:
    """Dispatch to the stage's step function (``perceptual_fn``: the DSSIM term of ``vae``, the
    LPIPS/substitute term of ``stage2``; ignored elsewhere)."""
    if stage == "vae":
        return vae_step(codec, x, generator, settings, perceptual_fn)
    if stage == "prior":
        return prior_step(codec, x, generator, settings)
    if stage == "stage1":
        return stage1_step(codec, x, generator, settings)
    if stage == "stage2":
        return stage2_step(codec, x, generator, settings, perceptual_fn)
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


class StageModule(nn.Module):
    """``forward(x) -> (loss, terms)`` of one stage around a codec: the unit DDP wraps.

    DDP needs one module whose ``forward`` produces the loss; the generator is set per step by
    the trainer (``self.generator``) because DDP's forward only moves tensors.
    """

    def __init__(self, codec: RDEICCodec, stage: str, settings: LossSettings,
                 perceptual_fn: nn.Module | None = None):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.codec = codec
        self.stage = stage
        self.settings = settings
        self.perceptual_fn = perceptual_fn
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.generator is None:
            raise RuntimeError("StageModule.generator must be set before forward")
        out = run_step(self.stage, self.codec, x, self.generator, self.settings, self.perceptual_fn)
        return out.total, out.terms
