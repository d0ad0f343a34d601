"""The training-side loss compositions (spec 4.3, section 5)."""

import math

import pytest
import torch

from rdeic_core.losses import lowfreq_mse, rate_bpp, stage1_loss, stage2_loss


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


def test_lowfreq_mse_sees_block_means_only():
    x = torch.zeros(1, 3, 32, 32)
    checker = x.clone()
    checker[..., ::2, ::2] = 0.5
    checker[..., 1::2, 1::2] = -0.5  # zero mean in every 16x16 block: invisible to the term
    assert float(lowfreq_mse(checker, x)) == 0.0
    cast = x + 0.1  # a colour cast is all low frequency
    assert math.isclose(float(lowfreq_mse(cast, x)), 0.01, rel_tol=1e-4)
    assert math.isclose(float(lowfreq_mse(cast[..., :8, :8], x[..., :8, :8])), 0.01, rel_tol=1e-4)  # < a block


def test_stage2_lowfreq_term_is_inside_lambda_and_off_by_default():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    x_hat = x + 0.05
    zc, z0 = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    zero = torch.zeros(())
    off = stage2_loss(x_hat, x, zc, z0, zero, zero, lambda_g=2.0, lpips_fn=None)
    on = stage2_loss(x_hat, x, zc, z0, zero, zero, lambda_g=2.0, lpips_fn=None, lowfreq_weight=3.0)
    assert "l_lowfreq" not in off.terms
    assert math.isclose(float(on.total - off.total), 2.0 * 3.0 * float(on.terms["l_lowfreq"]), rel_tol=1e-5)
