"""Training-side math of RDEIC (spec 4.3 and section 5), as pure functions.

Stage 1 trains the compression and control modules with the *residual*
forward process: the noise is shifted by the compression residual so that at
n = N the noisy latent is exactly the decoder's start
``sqrt(ᾱ_N) z_c + sqrt(1-ᾱ_N) ε``. The loss is on x̂_0, not on ε.
Stage 2 (fixed-step fine-tuning) runs the whole S-step chain with gradients
and compares images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ScheduleConfig
from .schedule import alphas_cumprod, relay_lambda


def _coef(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    arr = torch.as_tensor(values, dtype=torch.float64)[t.cpu().long()]
    return arr.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.dim() - 1)))


def residual_noise(eps: torch.Tensor, z0: torch.Tensor, zc: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """ε̃ = ε + (z_c − z_0)/λ with λ = sqrt(1/ᾱ_N − 1). z_c is NOT detached (gradient reaches the codec)."""
    return eps + (zc - z0) / relay_lambda(cfg)


def residual_forward(z0: torch.Tensor, zc: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                     cfg: ScheduleConfig) -> torch.Tensor:
    """z_t = sqrt(ᾱ_t) z_0 + sqrt(1−ᾱ_t) ε̃ (spec 4.3)."""
    ab = alphas_cumprod(cfg)
    a = _coef(ab**0.5, t, z0)
    b = _coef((1.0 - ab) ** 0.5, t, z0)
    return a * z0 + b * residual_noise(eps, z0, zc, cfg)


def predict_x0(z_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """x̂_0 = (z_t − sqrt(1−ᾱ_t) ε̂)/sqrt(ᾱ_t), as sqrt(1/ᾱ) z − sqrt(1/ᾱ − 1) ε̂."""
    ab = alphas_cumprod(cfg)
    return _coef((1.0 / ab) ** 0.5, t, z_t) * z_t - _coef((1.0 / ab - 1.0) ** 0.5, t, z_t) * eps_hat


def rate_bpp(likelihoods: Sequence[torch.Tensor], num_pixels: int) -> torch.Tensor:
    """−Σ log2 p / (B·H·W) in image pixels (noise-proxy rate, spec 4.3)."""
    total = torch.log(likelihoods[0]).sum()
    for lik in likelihoods[1:]:
        total = total + torch.log(lik).sum()
    return total / (-math.log(2.0) * num_pixels)


def sample_train_timesteps(batch: int, cfg: ScheduleConfig, generator: torch.Generator | None = None,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """t ~ U{0..N} (used_timesteps = 300)."""
    return torch.randint(0, cfg.used_timesteps, (batch,), generator=generator).to(device)


LOWFREQ_BLOCK = 16


def lowfreq_mse(x_hat: torch.Tensor, x: torch.Tensor, block: int = LOWFREQ_BLOCK) -> torch.Tensor:
    """MSE of the ``block`` x ``block`` means: the error of the colour and of the low frequencies only
    (crops smaller than a block use their whole mean)."""
    k = min(block, x.shape[-2], x.shape[-1])
    return F.mse_loss(F.avg_pool2d(x_hat, k), F.avg_pool2d(x, k))


@dataclass
class LossTerms:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def stage1_loss(x0_hat: torch.Tensor, z0: torch.Tensor, zc: torch.Tensor, bpp: torch.Tensor,
                vq_loss: torch.Tensor, lambda_g: float, bpp_weight: float = 1.0,
                q_bpp: torch.Tensor | None = None) -> LossTerms:
    """L1 = λ_g(‖x̂0 − z0‖² + ‖z_c − z0‖²) + R_y + L_vq; MSEs are means over C, H, W (and batch)."""
    l_simple = F.mse_loss(x0_hat, z0)
    l_guide = F.mse_loss(zc, z0)
    total = lambda_g * l_simple + bpp_weight * bpp + bpp_weight * vq_loss + lambda_g * l_guide
    terms = {"l_simple": l_simple, "l_guide": l_guide, "l_bpp": bpp, "l_vq": vq_loss, "loss": total}
    if q_bpp is not None:
        terms["q_bpp"] = q_bpp
    return LossTerms(total, {k: v.detach() for k, v in terms.items()})


def stage2_loss(x_hat: torch.Tensor, x: torch.Tensor, zc: torch.Tensor, z0: torch.Tensor, bpp: torch.Tensor,
                vq_loss: torch.Tensor, lambda_g: float,
                lpips_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                lpips_weight: float = 0.5, bpp_weight: float = 1.0,
                q_bpp: torch.Tensor | None = None, lowfreq_weight: float = 0.0) -> LossTerms:
    """L2 = λ_g(MSE(x̂, x) + 0.5·LPIPS(x̂, x) + ‖z_c − z0‖²) + R_y + L_vq, images in [−1, 1].

    The reference also computes a latent MSE of the sampled x̂_0 and then
    overwrites it (unused), so it is not part of the loss here either. ``lowfreq_weight`` (not the
    reference's, 0 by default) adds ``λ_g · w · lowfreq_mse(x̂, x)`` inside the bracket.
    """
    l_mse = F.mse_loss(x_hat, x)
    l_lpips = lpips_fn(x_hat, x).mean() if lpips_fn is not None else torch.zeros((), device=x.device)
    l_guide = F.mse_loss(zc, z0)
    image_terms = l_mse + lpips_weight * l_lpips + l_guide
    terms = {"l_mse": l_mse, "l_lpips": l_lpips, "l_guide": l_guide, "l_bpp": bpp, "l_vq": vq_loss}
    if lowfreq_weight > 0:
        l_lowfreq = lowfreq_mse(x_hat, x)
        image_terms = image_terms + lowfreq_weight * l_lowfreq
        terms["l_lowfreq"] = l_lowfreq
    total = lambda_g * image_terms + bpp_weight * (bpp + vq_loss)
    terms["loss"] = total
    if q_bpp is not None:
        terms["q_bpp"] = q_bpp
    return LossTerms(total, {k: v.detach() for k, v in terms.items()})
