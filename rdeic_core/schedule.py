"""The SD noise schedule and the relay sampler's respaced coefficients (spec section 4).

Everything here is computed in float64 with numpy, as the reference sampler does,
and only cast to float32 where it meets a tensor. The functions are pure and
cached: a schedule is data, not state (the diffusers way of keeping schedulers
apart from models).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .config import ScheduleConfig


@functools.lru_cache(maxsize=8)
def _alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    # LDM "linear" = diffusers "scaled_linear": linear in sqrt(beta).
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    out = np.cumprod(1.0 - betas)
    out.flags.writeable = False
    return out


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """ᾱ_t for t = 0..T-1 (float64, read-only)."""
    return _alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)


def relay_start_t(cfg: ScheduleConfig) -> int:
    """N: the timestep of the noisy compressed latent the decoder starts from (299 for RDEIC)."""
    return cfg.used_timesteps - 1


def relay_lambda(cfg: ScheduleConfig) -> float:
    """λ = sqrt(1/ᾱ_N - 1): scales the residual z_c - z_0 into the training noise (spec 4.3)."""
    ab = alphas_cumprod(cfg)[relay_start_t(cfg)]
    return float(np.sqrt(1.0 / ab - 1.0))


def space_timesteps(num_timesteps: int, steps: int) -> tuple[int, ...]:
    """Timesteps of an S-step relay chain, ascending (spec 4.4).

    For S >= 2 this reproduces the reference's ``space_timesteps(300, str(S))``
    including its float accumulation and Python's banker's rounding
    (S=5 -> 0, 75, 150, 224, 299). S = 1 is a single step from the relay start
    (the reference would return [0], which is inconsistent with starting at
    t=299). S = 0 means no diffusion at all.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps > num_timesteps:
        raise ValueError(f"cannot take {steps} steps out of {num_timesteps} timesteps")
    if steps == 0:
        return ()
    if steps == 1:
        return (num_timesteps - 1,)
    frac_stride = (num_timesteps - 1) / (steps - 1)
    cur = 0.0
    taken = []
    for _ in range(steps):
        taken.append(round(cur))
        cur += frac_stride
    return tuple(sorted(set(taken)))


@dataclass(frozen=True)
class RelaySchedule:
    """Respaced DDPM coefficients for one step count, index k = 0..S-1 ascending in t."""

    timesteps: tuple[int, ...]
    alphas_cumprod: np.ndarray  # ᾱ'_k = ᾱ_{t_k}
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    coef1: np.ndarray  # posterior mean coefficient of x̂0
    coef2: np.ndarray  # posterior mean coefficient of x_t
    variance: np.ndarray  # fixed-small posterior variance (0 at k=0)
    log_variance_clipped: np.ndarray


@functools.lru_cache(maxsize=64)
def _relay_schedule(num_train_timesteps: int, beta_start: float, beta_end: float,
                    used_timesteps: int, steps: int) -> RelaySchedule:
    ab_all = _alphas_cumprod(num_train_timesteps, beta_start, beta_end)
    ts = space_timesteps(used_timesteps, steps)
    ab = np.array([ab_all[t] for t in ts], dtype=np.float64)
    ab_prev = np.append(1.0, ab[:-1])
    betas = 1.0 - ab / ab_prev
    alphas = 1.0 - betas
    variance = betas * (1.0 - ab_prev) / (1.0 - ab)
    if len(ts) > 1:
        log_var = np.log(np.append(variance[1], variance[1:]))
    else:
        log_var = np.log(np.maximum(variance, 1e-20))
    return RelaySchedule(
        timesteps=ts,
        alphas_cumprod=ab,
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ab),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ab - 1.0),
        coef1=betas * np.sqrt(ab_prev) / (1.0 - ab),
        coef2=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
        variance=variance,
        log_variance_clipped=log_var,
    )


def relay_schedule(cfg: ScheduleConfig, steps: int) -> RelaySchedule:
    return _relay_schedule(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.used_timesteps, steps)
