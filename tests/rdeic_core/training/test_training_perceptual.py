"""The stage-2 perceptual term: LPIPS-alex only from local files, otherwise the named substitute."""

from __future__ import annotations

import pytest
import torch

from rdeic_core.training import perceptual as P


def _fake_weights(dirpath, lin_name="lpips_alex_v0.1.pth", lin_scale=1.0):
    """AlexNet-shaped and LPIPS-lin-shaped files (random numbers: the shapes and keys are what matter)."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    dirpath.mkdir(parents=True, exist_ok=True)
    torch.save(alexnet(weights=None).state_dict(), dirpath / P.ALEXNET_FILE)
    lin = {f"lin{k}.model.1.weight": lin_scale * torch.rand(1, c, 1, 1) for k, c in enumerate(P._ALEX_CHANNELS)}
    torch.save(lin, dirpath / lin_name)
    return dirpath


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(P.ALEXNET_ENV, raising=False)
    monkeypatch.delenv(P.LPIPS_LIN_ENV, raising=False)
    return tmp_path / "torch"


def test_without_local_weights_the_substitute_is_used_and_named(empty_torch_home):
    module, name = P.build_perceptual_loss("auto")
    assert name == P.SUBSTITUTE_NAME == "ms-ssim-dssim"
    assert isinstance(module, P.MultiScaleDSSIM)
    with pytest.raises(FileNotFoundError, match=P.ALEXNET_FILE):
        P.build_perceptual_loss("lpips")
    assert P.build_perceptual_loss("none") == (None, "none")
    with pytest.raises(ValueError, match="vgg"):
        P.build_perceptual_loss("vgg")


@pytest.mark.parametrize("lin_name", P.LPIPS_LIN_FILES)
def test_lpips_is_loaded_from_the_hub_cache(empty_torch_home, lin_name):
    _fake_weights(empty_torch_home / "hub" / "checkpoints", lin_name)
    module, name = P.build_perceptual_loss("auto")
    assert name == P.LPIPS_NAME and isinstance(module, P.LPIPSAlex)
    assert not any(p.requires_grad for p in module.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    d = module(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    assert torch.allclose(module(x, x), torch.zeros(2), atol=1e-6)
    module.train()
    assert not module.training  # a loss network stays in eval


def test_lpips_uses_the_lin_weights_of_the_file(empty_torch_home, monkeypatch, tmp_path):
    a = _fake_weights(tmp_path / "a", lin_scale=1.0)
    b = _fake_weights(tmp_path / "b", lin_scale=2.0)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    y = torch.rand(1, 3, 64, 64) * 2 - 1
    values = []
    for d in (a, b):
        monkeypatch.setenv(P.ALEXNET_ENV, str(d / P.ALEXNET_FILE))
        monkeypatch.setenv(P.LPIPS_LIN_ENV, str(d / "lpips_alex_v0.1.pth"))
        module, name = P.build_perceptual_loss("lpips")
        values.append(float(module(x, y)))
    assert values[1] == pytest.approx(2 * values[0], rel=1e-5)


def test_ssim_matches_pytorch_msssim():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 40, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 48, 40, generator=g)).clamp(0, 1)
    ours = P.ssim(x, y)
    theirs = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_dssim_is_zero_for_equal_images_and_grows_with_distortion():
    loss = P.MultiScaleDSSIM()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    small = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    large = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(loss(x, x), torch.zeros(2), atol=1e-6)
    assert bool((loss(x, small) < loss(x, large)).all())


def test_dssim_gradient_is_finite_for_a_flat_untrained_output():
    # an untrained decoder can output a constant image: MS-SSIM's powers would give inf/NaN gradients
    x_hat = torch.zeros(1, 3, 64, 64, requires_grad=True)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    P.MultiScaleDSSIM()(x_hat, x).sum().backward()
    assert torch.isfinite(x_hat.grad).all() and float(x_hat.grad.abs().sum()) > 0


def test_dssim_uses_only_scales_that_fit_the_window():
    loss = P.MultiScaleDSSIM(max_scales=5, win_size=11)
    x = torch.rand(1, 3, 24, 24) * 2 - 1
    y = torch.rand(1, 3, 24, 24) * 2 - 1
    # 24 px: one scale (12 px would still fit 11, 24//2=12 >= 11 -> two scales)
    expected = 1 - (P.ssim((x + 1) / 2, (y + 1) / 2)
                    + P.ssim(torch.nn.functional.avg_pool2d((x + 1) / 2, 2),
                             torch.nn.functional.avg_pool2d((y + 1) / 2, 2))) / 2
    assert torch.allclose(loss(x, y), expected, atol=1e-6)
