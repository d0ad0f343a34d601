"""The relay residual diffusion sampler (spec 4.2, 4.4, 4.5).

Decoding starts from the *noisy compressed latent*
``x_N = sqrt(ᾱ_N) z_c + sqrt(1-ᾱ_N) ε`` at N = 299 rather than from pure
noise, then runs S spaced DDPM steps with fixed-small variance and no
clipping. The sampler is model-agnostic: it calls ``eps_fn(x, t)`` (the
controlled noise estimator) and, when the detail scale λ_s != 1,
``uncond_fn(x, t)`` (plain SD), combining them as
``ε = ε_sd + λ_s (ε_θ − ε_sd)``.

Noise is passed in explicitly (``step_noise``): the codec draws it from a
CPU ``torch.Generator`` seeded from the bitstream header, so a bitstream
decodes to the same image on every machine, and parity tests can inject the
reference's noise. The same code runs with gradients for fixed-step
fine-tuning (stage 2 trains exactly this chain).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import ScheduleConfig
from .schedule import RelaySchedule, alphas_cumprod, relay_schedule, relay_start_t

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def relay_start(c_latent: torch.Tensor, noise: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """x_N = q_sample(z_c, N): the noisy compressed latent (spec 4.2)."""
    ab = float(alphas_cumprod(cfg)[relay_start_t(cfg)])
    a = torch.tensor(ab**0.5, dtype=torch.float32).item()
    b = torch.tensor((1.0 - ab) ** 0.5, dtype=torch.float32).item()
    return a * c_latent + b * noise.to(c_latent)


def guided_eps(eps_fn: EpsFn, uncond_fn: EpsFn | None, x: torch.Tensor, t: int,
               detail_scale: float) -> torch.Tensor:
    """Controllable detail generation (spec 4.5); λ_s = 1 costs one UNet pass."""
    if detail_scale == 1.0:
        return eps_fn(x, t)
    if uncond_fn is None:
        raise ValueError("detail_scale != 1 needs the unconditional (plain SD) noise estimate")
    e_sd = uncond_fn(x, t)
    e_ctrl = eps_fn(x, t)
    return e_sd + detail_scale * (e_ctrl - e_sd)


def sample(
    eps_fn: EpsFn,
    x_start: torch.Tensor,
    steps: int,
    cfg: ScheduleConfig,
    step_noise: Sequence[torch.Tensor] | None = None,
    uncond_fn: EpsFn | None = None,
    detail_scale: float = 1.0,
) -> torch.Tensor:
    """Run the S-step relay chain from x_N and return x̂_0 (latent).

    ``step_noise[i]`` is the ξ of the i-th step in execution order (t descending);
    the last step's noise is drawn but masked out, as in the reference. With
    ``steps == 0`` the caller should skip sampling (z_c is decoded directly).
    """
    sched = relay_schedule(cfg, steps)
    n = len(sched.timesteps)
    if n == 0:
        raise ValueError("steps=0 has no diffusion chain; decode c_latent directly")
    if step_noise is not None and len(step_noise) < n:
        raise ValueError(f"need {n} step noises, got {len(step_noise)}")
    x = x_start
    for i, k in enumerate(reversed(range(n))):
        eps = guided_eps(eps_fn, uncond_fn, x, sched.timesteps[k], detail_scale)
        x = relay_step(x, eps, k, sched, None if step_noise is None else step_noise[i])
    return x


def relay_step(x: torch.Tensor, eps: torch.Tensor, k: int, sched: RelaySchedule,
               xi: torch.Tensor | None = None) -> torch.Tensor:
    """One posterior step of the chain at spaced index ``k`` given the noise prediction ``eps``.

    Split from :func:`sample` so a tiled decoder can compute ``eps`` tile by tile over several
    canvases and still take exactly this step on each (the step is elementwise).
    """
    # float32 coefficients, as the reference extracts them from float64 arrays
    x0 = float(torch.tensor(sched.sqrt_recip_alphas_cumprod[k], dtype=torch.float32)) * x \
        - float(torch.tensor(sched.sqrt_recipm1_alphas_cumprod[k], dtype=torch.float32)) * eps
    if k == 0:
        return x0  # coef1 = 1, coef2 = 0, variance masked
    c1 = float(torch.tensor(sched.coef1[k], dtype=torch.float32))
    c2 = float(torch.tensor(sched.coef2[k], dtype=torch.float32))
    mean = c1 * x0 + c2 * x
    std = float(torch.tensor(sched.log_variance_clipped[k], dtype=torch.float32).mul(0.5).exp())
    xi = torch.randn_like(x) if xi is None else xi.to(x)
    return mean + std * xi
