"""The perceptual term of stage 2: LPIPS-alex from local weights, else a named substitute.

The reference's stage-2 loss has ``0.5 * LPIPS_alex(x_hat, x)`` (richzhang's LPIPS v0.1:
torchvision AlexNet features, unit-normalised per channel, squared differences weighted
by 1x1 "lin" layers, spatially averaged, summed over 5 layers). Its weights cannot be
downloaded here and nothing may be downloaded at run time, so:

* **LPIPS-alex** is used when both files are found locally:

  - the AlexNet backbone, torchvision's ``alexnet-owt-7be5be79.pth``, and
  - the LPIPS v0.1 lin layers, ``alex.pth`` of the ``lpips`` package
    (``lpips/weights/v0.1/alex.pth``; the reference ships it as ``weight/lpips/alex.pth``)
    saved under the name ``lpips_alex_v0.1.pth`` (or ``alex.pth``),

  both in ``$TORCH_HOME/hub/checkpoints/`` (default ``~/.cache/torch/hub/checkpoints``), or
  at the paths in ``$RDEIC_ALEXNET_WEIGHTS`` and ``$RDEIC_LPIPS_LIN_WEIGHTS``.
* otherwise the **substitute** ``ms-ssim-dssim`` is used: ``1 - mean over scales of SSIM``
  (Gaussian 11x11, sigma 1.5, on images mapped to [0, 1], at every dyadic scale whose side is
  still >= 11 px, at most 5). It is structural rather than learned-perceptual, but it is a
  real image-quality term with the same range (0 = identical) and gradients everywhere;
  a randomly initialised AlexNet would not be perceptual at all.

:func:`build_perceptual_loss` returns the loss module and its name; trainers must record
the name (``perceptual_loss`` in the model card) so a model trained with the substitute is
never mistaken for a reference-recipe one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_LIN_FILES = ("lpips_alex_v0.1.pth", "alex.pth")
ALEXNET_ENV = "RDEIC_ALEXNET_WEIGHTS"
LPIPS_LIN_ENV = "RDEIC_LPIPS_LIN_WEIGHTS"

LPIPS_NAME = "lpips-alex-v0.1"
SUBSTITUTE_NAME = "ms-ssim-dssim"

# AlexNet ``features`` indices that end each LPIPS slice (relu1..relu5) and their widths.
_ALEX_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
_ALEX_CHANNELS = (64, 192, 384, 256, 256)


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` as torch.hub resolves it (no network access)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_lpips_weights() -> tuple[Path, Path] | None:
    """(alexnet file, lin file) when both exist locally, else None."""
    ckpt = hub_checkpoint_dir()
    alex = Path(os.environ[ALEXNET_ENV]) if os.environ.get(ALEXNET_ENV) else ckpt / ALEXNET_FILE
    if os.environ.get(LPIPS_LIN_ENV):
        lin_candidates = [Path(os.environ[LPIPS_LIN_ENV])]
    else:
        lin_candidates = [ckpt / n for n in LPIPS_LIN_FILES]
    lin = next((p for p in lin_candidates if p.is_file()), None)
    if alex.is_file() and lin is not None:
        return alex, lin
    return None


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone; inputs in [-1, 1]; returns one distance per image [B].

    Always in eval mode and frozen. (The reference's lin layers carry dropout that Lightning's
    ``train()`` would switch on during stage 2; its expectation is the same, so we leave it off
    and keep the loss deterministic.)
    """

    shift: torch.Tensor  # buffers: LPIPS's input normalisation
    scale: torch.Tensor

    def __init__(self, alexnet_state: dict[str, torch.Tensor], lin_state: dict[str, torch.Tensor]):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None)
        net.load_state_dict(alexnet_state)
        feats = net.features
        self.slices = nn.ModuleList(nn.Sequential(*[feats[i] for i in range(a, b)]) for a, b in _ALEX_SLICES)
        lins = [nn.Conv2d(c, 1, 1, bias=False) for c in _ALEX_CHANNELS]
        self.lins = nn.ModuleList(lins)
        for k, lin in enumerate(lins):
            w = _lin_weight(lin_state, k)
            if w.shape != lin.weight.shape:
                raise ValueError(f"LPIPS lin{k} weight has shape {tuple(w.shape)}, expected {tuple(lin.weight.shape)}")
            lin.weight.data.copy_(w)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSAlex:  # a loss network never trains
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hx = (x - self.shift) / self.scale
        hy = (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        for block, lin in zip(self.slices, self.lins):
            hx, hy = block(hx), block(hy)
            d = (_unit(hx) - _unit(hy)) ** 2
            total = total + lin(d).mean(dim=(1, 2, 3))
        return total


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


def _lin_weight(state: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    # lpips v0.1 files store lin{k}.model.1.weight (index 0 is the Dropout); accept a dropout-free layout too
    for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight", f"lins.{k}.model.1.weight"):
        if key in state:
            return state[key].float()
    raise KeyError(f"LPIPS lin weights have no entry for layer {k} (keys: {sorted(state)[:8]} ...)")


def _gaussian_window(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def ssim(x: torch.Tensor, y: torch.Tensor, win_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """SSIM per image [B] (Wang et al. 2004: Gaussian window, K1 = 0.01, K2 = 0.03, valid filtering).

    Same definition as ``pytorch_msssim.ssim`` (tested against it when installed).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two [B,C,H,W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than the {win_size}px SSIM window")
    c = x.shape[1]
    g = _gaussian_window(win_size, sigma, x.device, x.dtype)
    gh = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    gv = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    s = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs
    return s.flatten(1).mean(dim=1)


class MultiScaleDSSIM(nn.Module):
    """``1 - mean_l SSIM(x_l, y_l)`` over dyadic scales (2x2 average pooling), inputs in [-1, 1], [B].

    A plain mean of per-scale SSIMs rather than MS-SSIM's product of powers: the product's
    fractional powers have infinite gradients at 0, which an untrained decoder reaches.
    """

    def __init__(self, max_scales: int = 5, win_size: int = 11):
        super().__init__()
        self.max_scales = int(max_scales)
        self.win_size = int(win_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = ((x.float() + 1) / 2)
        y = ((y.float() + 1) / 2)
        values = []
        for level in range(self.max_scales):
            if level:
                if min(x.shape[-2:]) // 2 < self.win_size:
                    break
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            values.append(ssim(x, y, self.win_size))
        return 1.0 - torch.stack(values).mean(dim=0)


def load_lpips(paths: tuple[Path, Path]) -> LPIPSAlex:
    alex_path, lin_path = paths
    alex_state = torch.load(alex_path, map_location="cpu", weights_only=True)
    lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
    return LPIPSAlex(alex_state, lin_state)


def build_perceptual_loss(kind: str = "auto") -> tuple[nn.Module | None, str]:
    """(loss module or None, its name). ``kind``: ``auto`` (LPIPS if its weights are local, else the
    substitute), ``lpips`` (required: error if missing), ``ms-ssim`` (the substitute), ``none``."""
    if kind not in ("auto", "lpips", "ms-ssim", "none"):
        raise ValueError(f"perceptual loss kind must be auto, lpips, ms-ssim or none, got {kind!r}")
    if kind == "none":
        return None, "none"
    if kind in ("auto", "lpips"):
        found = find_lpips_weights()
        if found is not None:
            log.info("perceptual loss: LPIPS-alex from %s and %s", *found)
            return load_lpips(found), LPIPS_NAME
        if kind == "lpips":
            raise FileNotFoundError(
                f"LPIPS-alex weights not found: need {hub_checkpoint_dir() / ALEXNET_FILE} and one of "
                f"{[str(hub_checkpoint_dir() / n) for n in LPIPS_LIN_FILES]} (or ${ALEXNET_ENV} / ${LPIPS_LIN_ENV}); "
                "nothing is downloaded at run time"
            )
        log.warning("perceptual loss: LPIPS-alex weights not found in %s; using the substitute %s",
                    hub_checkpoint_dir(), SUBSTITUTE_NAME)
    return MultiScaleDSSIM(), SUBSTITUTE_NAME
