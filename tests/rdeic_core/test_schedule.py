"""Schedule constants and sampler coefficients against the spec's tables (rdeic.md 4.1-4.4)."""

import numpy as np
import pytest
import torch

from rdeic_core.config import ScheduleConfig
from rdeic_core.losses import predict_x0, residual_forward
from rdeic_core.sampler import relay_start, sample
from rdeic_core.schedule import alphas_cumprod, relay_lambda, relay_schedule, space_timesteps

CFG = ScheduleConfig()


@pytest.mark.parametrize("t,value", [(0, 0.99915), (75, 0.924093), (150, 0.827812), (224, 0.715924),
                                     (299, 0.592183), (999, 0.004660)])
def test_alphas_cumprod(t, value):
    assert alphas_cumprod(CFG)[t] == pytest.approx(value, abs=1e-5)


def test_matches_diffusers_scaled_linear():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(alphas_cumprod(CFG), s.alphas_cumprod.numpy(), rtol=1e-5)


def test_relay_constants():
    ab = alphas_cumprod(CFG)[299]
    assert np.sqrt(ab) == pytest.approx(0.769534, abs=1e-5)
    assert np.sqrt(1 - ab) == pytest.approx(0.638605, abs=1e-5)
    assert relay_lambda(CFG) == pytest.approx(0.829860, abs=1e-5)
    assert 1 / relay_lambda(CFG) == pytest.approx(1.205023, abs=1e-5)


@pytest.mark.parametrize("steps,expected", [(2, (0, 299)), (3, (0, 150, 299)), (4, (0, 100, 199, 299)),
                                            (5, (0, 75, 150, 224, 299)), (1, (299,)), (0, ())])
def test_space_timesteps(steps, expected):
    assert space_timesteps(300, steps) == expected


def test_space_timesteps_rejects_bad_counts():
    with pytest.raises(ValueError):
        space_timesteps(300, -1)
    with pytest.raises(ValueError):
        space_timesteps(300, 301)


@pytest.mark.parametrize("steps,t,coef1,coef2,var", [
    (2, 299, 0.998340, 0.001605, 8.49e-4),
    (5, 299, 0.358602, 0.633526, 0.120397),
    (5, 224, 0.432895, 0.563685, 0.081926),
    (5, 150, 0.581672, 0.417243, 0.045931),
    (5, 75, 0.989223, 0.010769, 8.41e-4),
])
def test_sampler_coefficients(steps, t, coef1, coef2, var):
    s = relay_schedule(CFG, steps)
    k = s.timesteps.index(t)
    assert s.coef1[k] == pytest.approx(coef1, abs=1e-5)
    assert s.coef2[k] == pytest.approx(coef2, abs=1e-5)
    assert s.variance[k] == pytest.approx(var, abs=1e-5)


@pytest.mark.parametrize("steps", [2, 5])
def test_last_step_returns_x0(steps):
    s = relay_schedule(CFG, steps)
    assert s.coef1[0] == pytest.approx(1.0, abs=1e-12)
    assert s.coef2[0] == pytest.approx(0.0, abs=1e-12)


def test_matches_diffusers_ddpm_step():
    """Our step equals diffusers' DDPMScheduler with the spec's settings (noise injected)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="epsilon", variance_type="fixed_small", clip_sample=False)
    sched.set_timesteps(timesteps=[299, 150, 0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    w = torch.randn(4, 4, generator=g) * 0.1

    def eps_fn(x, t):
        return torch.einsum("oc,bchw->bohw", w, x) * (1 + t / 300)

    # diffusers draws its variance noise with randn(generator) for t > 0 only
    g_ref = torch.Generator().manual_seed(7)
    g_ours = torch.Generator().manual_seed(7)
    noises = [torch.randn(1, 4, 8, 8, generator=g_ours) for _ in range(2)] + [torch.zeros(1, 4, 8, 8)]
    ours = sample(eps_fn, x, 3, CFG, noises)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(eps_fn(ref, int(t)), t, ref, generator=g_ref).prev_sample
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_residual_forward_relays_to_decoder_start():
    """At n = N the residual forward process equals the decoder's start x_N (spec 4.3)."""
    g = torch.Generator().manual_seed(1)
    z0, zc, eps = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.full((2,), 299)
    torch.testing.assert_close(residual_forward(z0, zc, t, eps, CFG), relay_start(zc, eps, CFG),
                               atol=1e-5, rtol=1e-5)
    # and x̂0 from the true total noise recovers z0
    z_t = residual_forward(z0, zc, torch.tensor([10, 200]), eps, CFG)
    eps_tot = eps + (zc - z0) / relay_lambda(CFG)
    torch.testing.assert_close(predict_x0(z_t, torch.tensor([10, 200]), eps_tot, CFG), z0, atol=1e-4, rtol=1e-4)


def test_detail_scale_zero_is_plain_sd():
    calls = []

    def ctrl(x, t):
        calls.append("c")
        return x * 0 + 1.0

    def unc(x, t):
        calls.append("u")
        return x * 0 - 1.0

    x = torch.zeros(1, 4, 2, 2)
    noises = [torch.zeros_like(x)] * 2
    a = sample(ctrl, x, 2, CFG, noises, uncond_fn=unc, detail_scale=0.0)
    b = sample(unc, x, 2, CFG, noises)
    torch.testing.assert_close(a, b)
    assert calls.count("u") == 4 and calls.count("c") == 2  # λ_s != 1 costs two passes per step
    calls.clear()
    sample(ctrl, x, 2, CFG, noises, uncond_fn=unc, detail_scale=1.0)
    assert calls == ["c", "c"]
