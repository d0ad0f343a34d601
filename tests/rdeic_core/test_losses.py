"""The training-side loss compositions (spec 4.3, section 5)."""

import math

import pytest
import torch

from rdeic_core.losses import rate_bpp, stage1_loss, stage2_loss


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_rate_bpp_counts_bits_per_image_pixel():
    lik = [torch.full((2, 8, 4, 4), 0.5), torch.full((2, 4, 2, 2), 0.25)]
    # 2*8*16 symbols of 1 bit + 2*4*4 symbols of 2 bits, over 2 images of 64x64 pixels
    expected = (2 * 8 * 16 * 1 + 2 * 4 * 4 * 2) / (2 * 64 * 64)
    assert rate_bpp(lik, 2 * 64 * 64).item() == pytest.approx(expected)


def test_stage1_composition():
    x0h, z0, zc = _t(2, 4, 8, 8, seed=1), _t(2, 4, 8, 8, seed=2), _t(2, 4, 8, 8, seed=3)
    bpp, vq = torch.tensor(0.05), torch.tensor(0.3)
    out = stage1_loss(x0h, z0, zc, bpp, vq, lambda_g=2.0)
    mse1 = ((x0h - z0) ** 2).mean()
    mse2 = ((zc - z0) ** 2).mean()
    assert out.total.item() == pytest.approx((2 * (mse1 + mse2) + bpp + vq).item(), rel=1e-6)
    assert set(out.terms) >= {"l_simple", "l_guide", "l_bpp", "l_vq", "loss"}


def test_stage2_composition_and_gradients():
    x = _t(1, 3, 16, 16, seed=4)
    xh = _t(1, 3, 16, 16, seed=5).requires_grad_()
    zc = _t(1, 4, 2, 2, seed=6).requires_grad_()
    z0 = _t(1, 4, 2, 2, seed=7)

    def fake_lpips(a, b):
        return (a - b).abs().mean(dim=(1, 2, 3))

    out = stage2_loss(xh, x, zc, z0, torch.tensor(0.1), torch.tensor(0.2), lambda_g=0.5, lpips_fn=fake_lpips)
    expect = 0.5 * (((xh - x) ** 2).mean() + 0.5 * (xh - x).abs().mean() + ((zc - z0) ** 2).mean()) + 0.3
    assert out.total.item() == pytest.approx(expect.item(), rel=1e-6)
    out.total.backward()
    assert xh.grad is not None and zc.grad is not None and math.isfinite(xh.grad.abs().sum().item())
