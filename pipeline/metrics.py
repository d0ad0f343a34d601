"""Image-quality metrics of the audit: PSNR and MS-SSIM always; LPIPS, DISTS, FID/KID from local weights.

* **PSNR** on the 8-bit RGB pixels, all channels: ``10 log10(255^2 / MSE)`` (``inf`` when equal).
* **MS-SSIM**: ``pytorch_msssim.ms_ssim`` (5 scales, standard weights, Gaussian sigma 1.5,
  ``data_range=255``) on float32 RGB. The library needs the short side to exceed
  ``(win_size - 1) * 16``; the standard 11-px window therefore needs > 160 px. **Fallback for
  smaller images**: the window shrinks to the largest odd size that fits
  (``ms_ssim_window``: 9 px for 129..160, 7 for 97..128, 5 for 65..96, 3 for 33..64), all 5 scales
  kept, sigma unchanged; the window used is stored per image (``ms_ssim_win``). Below 33 px no
  window fits and MS-SSIM is null (``ms_ssim_win`` null).
* **LPIPS** (v0.1, AlexNet; ``rdeic_core.training.perceptual.LPIPSAlex``, the same module training
  uses), **DISTS** (Ding et al. 2020, VGG16 + L2 pooling + learned alpha/beta, as
  ``DISTS_pytorch``) and **FID/KID** features (the TF-ported FID Inception-v3 pool3 of
  ``pytorch-fid``) run only when their weight files are on disk, in torch hub's checkpoint
  directory (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``) or at
  the path in the named environment variable (:data:`WEIGHT_FILES`). Nothing is ever downloaded:
  a missing file makes that metric null and :func:`find_weights` says exactly which file is
  missing. LPIPS and DISTS need a short side of at least 32 px (AlexNet's strides), else null.
* **FID/KID** follow the HiFiC / MS-ILLM patch protocol: each image pair contributes the
  non-overlapping ``P x P`` patches of a grid from the top-left corner plus those of the grid
  shifted by ``P/2`` in both axes (default ``P = 256``); each patch is resized bilinearly to 299
  px and mapped to [-1, 1] as in ``pytorch-fid``; FID is the Frechet distance of the two 2048-d
  Gaussians, KID the unbiased cubic-polynomial-kernel MMD averaged over random subsets.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_SIGMA = 1.5
MIN_PERCEPTUAL_SIDE = 32
DEFAULT_FID_PATCH = 256
INCEPTION_SIZE = 299
FID_FEATURES = 2048
PERCEPTUAL_METRICS = ("lpips", "dists", "fid")  # "fid" covers FID and KID (same features)


# ------------------------------------------------------------------------------------ PSNR, MS-SSIM
def mse(a: np.ndarray, b: np.ndarray) -> float:
    _same_shape(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (all channels); ``inf`` when they are equal."""
    m = mse(a, b)
    return math.inf if m == 0 else 10.0 * math.log10(255.0**2 / m)


def ms_ssim_window(height: int, width: int) -> int | None:
    """The window MS-SSIM uses for an image of this size (11 when it fits; None when none fits)."""
    side = min(height, width)
    if side > 10 * 16:
        return 11
    win = min(11, (side - 1) // 16 + 1)
    if win % 2 == 0:
        win -= 1
    return win if win >= 3 else None


def ms_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float | None, int | None]:
    """(MS-SSIM, window) of two uint8 images via pytorch_msssim; (None, None) below 33 px."""
    import torch
    from pytorch_msssim import ms_ssim as library_ms_ssim

    _same_shape(a, b)
    win = ms_ssim_window(a.shape[0], a.shape[1])
    if win is None:
        return None, None
    x = torch.from_numpy(np.array(a, dtype=np.float32)).permute(2, 0, 1)[None]
    y = torch.from_numpy(np.array(b, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        value = library_ms_ssim(x, y, data_range=255, size_average=False, win_size=win, win_sigma=MS_SSIM_SIGMA,
                                weights=list(MS_SSIM_WEIGHTS))
    return float(value[0]), win


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"metrics need two H x W x 3 images of one size, got {a.shape} and {b.shape}")


# ------------------------------------------------------------------------------------ weight files
@dataclass(frozen=True)
class WeightFile:
    """A weight file a metric needs: accepted names in the hub checkpoint dir, or an env var path."""

    names: tuple[str, ...]
    env: str
    what: str

    def locate(self, checkpoint_dir: Path) -> Path | None:
        if os.environ.get(self.env):
            path = Path(os.environ[self.env])
            return path if path.is_file() else None
        return next((checkpoint_dir / n for n in self.names if (checkpoint_dir / n).is_file()), None)

    def describe_missing(self, checkpoint_dir: Path) -> str:
        if os.environ.get(self.env):
            return f"{os.environ[self.env]} (from ${self.env}: {self.what})"
        alternatives = " or ".join(str(checkpoint_dir / n) for n in self.names)
        return f"{alternatives} ({self.what}; or set ${self.env})"


def _lpips_files() -> tuple[WeightFile, WeightFile]:
    from rdeic_core.training.perceptual import ALEXNET_ENV, ALEXNET_FILE, LPIPS_LIN_ENV, LPIPS_LIN_FILES

    return (WeightFile((ALEXNET_FILE,), ALEXNET_ENV, "torchvision AlexNet IMAGENET1K_V1"),
            WeightFile(tuple(LPIPS_LIN_FILES), LPIPS_LIN_ENV, "LPIPS v0.1 lin layers, lpips/weights/v0.1/alex.pth"))


VGG16_FILE = WeightFile(("vgg16-397923af.pth",), "RDEIC_VGG16_WEIGHTS", "torchvision VGG16 IMAGENET1K_V1")
DISTS_FILE = WeightFile(("dists_alpha_beta.pt", "DISTS_weights.pt"), "RDEIC_DISTS_WEIGHTS",
                        "DISTS alpha/beta, the weights.pt of DISTS_pytorch")
FID_INCEPTION_FILE = WeightFile(("pt_inception-2015-12-05-6726825d.pth",), "RDEIC_FID_INCEPTION_WEIGHTS",
                                "pytorch-fid's FID Inception-v3 (TF inception-2015-12-05)")


def weight_files() -> dict[str, tuple[WeightFile, ...]]:
    """Metric -> the files it needs (documented in docs/restore-audit.md)."""
    return {"lpips": _lpips_files(), "dists": (VGG16_FILE, DISTS_FILE), "fid": (FID_INCEPTION_FILE,)}


def checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` as torch.hub resolves it (a path computation, no network)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class WeightStatus:
    """Which weight files of one metric were found, and which are missing (human-readable)."""

    metric: str
    found: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def available(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict[str, Any]:
        return {"available": self.available, "found": list(self.found), "missing": list(self.missing)}


def find_weights(metrics: Sequence[str] = PERCEPTUAL_METRICS) -> dict[str, WeightStatus]:
    """Look for every needed file (no network, no download); the result says exactly what is missing."""
    ckpt = checkpoint_dir()
    files = weight_files()
    out = {}
    for metric in metrics:
        found, missing = [], []
        for wf in files[metric]:
            path = wf.locate(ckpt)
            if path is None:
                missing.append(wf.describe_missing(ckpt))
            else:
                found.append(str(path))
        out[metric] = WeightStatus(metric, tuple(found), tuple(missing))
    return out


def _load_state(path: str) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------ DISTS
def _build_dists(vgg_state: dict[str, Any], alpha_beta: dict[str, Any]) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchvision.models.vgg import cfgs, make_layers

    class L2Pool(nn.Module):
        """DISTS' anti-aliased downsampling: sqrt(blur(x^2)), 3x3 Hann kernel, stride 2."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            a = torch.tensor(np.hanning(5)[1:-1], dtype=torch.float32)
            g = a[:, None] * a[None, :]
            self.register_buffer("kernel", (g / g.sum())[None, None].repeat(channels, 1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.conv2d(x * x, self.kernel, stride=2, padding=1, groups=x.shape[1])
            return torch.sqrt(out + 1e-12)

    class DISTS(nn.Module):
        """Inputs in [0, 1]; returns one distance per image (0 = identical)."""

        channels = (3, 64, 128, 256, 512, 512)

        def __init__(self) -> None:
            super().__init__()
            # Only VGG16's conv layers matter (the classifier is never used); strict over those.
            f = make_layers(cfgs["D"], batch_norm=False)
            f.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")})
            self.stages = nn.ModuleList([
                nn.Sequential(*[f[i] for i in range(0, 4)]),
                nn.Sequential(L2Pool(64), *[f[i] for i in range(5, 9)]),
                nn.Sequential(L2Pool(128), *[f[i] for i in range(10, 16)]),
                nn.Sequential(L2Pool(256), *[f[i] for i in range(17, 23)]),
                nn.Sequential(L2Pool(512), *[f[i] for i in range(24, 30)]),
            ])
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
            alpha, beta = alpha_beta["alpha"].float(), alpha_beta["beta"].float()
            total = sum(self.channels)
            if tuple(alpha.shape) != (1, total, 1, 1) or tuple(beta.shape) != (1, total, 1, 1):
                raise ValueError(f"DISTS alpha/beta must be [1, {total}, 1, 1], got {tuple(alpha.shape)} and "
                                 f"{tuple(beta.shape)}")
            norm = alpha.sum() + beta.sum()
            self.register_buffer("alpha", alpha / norm)
            self.register_buffer("beta", beta / norm)
            self.requires_grad_(False)
            self.eval()

        def features(self, x: torch.Tensor) -> list[torch.Tensor]:
            out, h = [x], (x - self.mean) / self.std
            for stage in self.stages:
                h = stage(h)
                out.append(h)
            return out

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            c = 1e-6
            alphas = torch.split(self.alpha, list(self.channels), dim=1)
            betas = torch.split(self.beta, list(self.channels), dim=1)
            structure = texture = x.new_zeros(x.shape[0], 1, 1, 1)
            for fx, fy, a, b in zip(self.features(x), self.features(y), alphas, betas):
                mx, my = fx.mean([2, 3], keepdim=True), fy.mean([2, 3], keepdim=True)
                vx = ((fx - mx) ** 2).mean([2, 3], keepdim=True)
                vy = ((fy - my) ** 2).mean([2, 3], keepdim=True)
                cov = (fx * fy).mean([2, 3], keepdim=True) - mx * my
                texture = texture + (a * (2 * mx * my + c) / (mx**2 + my**2 + c)).sum(1, keepdim=True)
                structure = structure + (b * (2 * cov + c) / (vx + vy + c)).sum(1, keepdim=True)
            return 1 - (texture + structure).flatten()

    return DISTS()


# ------------------------------------------------------------------------------------ FID Inception
def _build_fid_inception(state: dict[str, Any]) -> Any:
    """pytorch-fid's Inception-v3 (TF 2015-12-05 port): torchvision's, with TF's pooling quirks."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchvision.models import inception as tvi

    def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:  # TF's average pool ignores the zero padding
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class BlockA(tvi.InceptionA):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))]

    class BlockC(tvi.InceptionC):
        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                d = layer(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(tf_avg_pool(x))]

    class BlockE(tvi.InceptionE):
        max_pool = False  # the FID network's last block max-pools (a quirk of the TF graph)

        def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
            return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]

    class BlockEMax(BlockE):
        max_pool = True

    class FIDInception(nn.Module):
        """uint8-range patches [N,3,h,w] in [0,1] -> pool3 features [N, 2048]."""

        def __init__(self) -> None:
            super().__init__()
            net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False,
                                 inception_blocks=[tvi.BasicConv2d, BlockA, tvi.InceptionB, BlockC, tvi.InceptionD,
                                                   BlockE, tvi.InceptionAux])
            net.Mixed_7c = BlockEMax(2048)
            net.load_state_dict(state)
            self.body = nn.Sequential(
                net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(3, stride=2),
                net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(3, stride=2),
                net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
                net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(1))
            self.requires_grad_(False)
            self.eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            return self.body(2 * x - 1).flatten(1)

    return FIDInception()


def fid_patches(image: np.ndarray, patch: int) -> list[np.ndarray]:
    """HiFiC/MS-ILLM patches: the P x P grid from (0, 0), then the grid from (P/2, P/2)."""
    h, w = image.shape[:2]
    out = []
    for off in (0, patch // 2):
        for y in range(off, h - patch + 1, patch):
            for x in range(off, w - patch + 1, patch):
                out.append(image[y:y + patch, x:x + patch])
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets [N, D]: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    float64 moments. ``tr((S_a S_b)^(1/2))`` is computed as ``tr((A S_b A)^(1/2))`` with
    ``A = S_a^(1/2)``: the same value (similar matrices), but symmetric, so ``eigh`` stays accurate
    when the covariances are singular (fewer samples than dimensions, the usual case per audit).
    Rounding can leave a tiny negative value for identical sets; it is clamped to 0.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 features per side, got {len(a)} and {len(b)}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root_a @ s_b @ root_a
    tr_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None))))
    diff = mu_a - mu_b
    return max(0.0, float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (as torchmetrics)."""
    n = min(len(a), len(b), subset_size)
    if n < 2:
        raise ValueError(f"KID needs at least 2 features per side, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), n, replace=False)]
        y = b[rng.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


# ------------------------------------------------------------------------------------ the bundle
@dataclass
class PerceptualMetrics:
    """The perceptual nets that could be loaded on this worker (others stay None, with the reason)."""

    device: str = "cpu"
    fid_patch: int = DEFAULT_FID_PATCH
    lpips_net: Any = None
    dists_net: Any = None
    inception: Any = None
    status: dict[str, WeightStatus] = field(default_factory=dict)

    @classmethod
    def load(cls, device: str = "cpu", fid_patch: int = DEFAULT_FID_PATCH,
             metrics: Sequence[str] = PERCEPTUAL_METRICS) -> PerceptualMetrics:
        status = find_weights(metrics)
        out = cls(device=device, fid_patch=fid_patch, status=status)
        for metric, st in status.items():
            if not st.available:
                log.warning("%s disabled: missing %s", metric, "; ".join(st.missing))
                continue
            if metric == "lpips":
                from rdeic_core.training.perceptual import LPIPSAlex

                out.lpips_net = LPIPSAlex(_load_state(st.found[0]), _load_state(st.found[1])).to(device)
            elif metric == "dists":
                out.dists_net = _build_dists(_load_state(st.found[0]), _load_state(st.found[1])).to(device)
            elif metric == "fid":
                out.inception = _build_fid_inception(_load_state(st.found[0])).to(device)
        return out

    def unavailable(self) -> dict[str, list[str]]:
        return {m: list(s.missing) for m, s in self.status.items() if not s.available}

    def _pair(self, a: np.ndarray, b: np.ndarray) -> tuple[Any, Any]:
        import torch

        x = torch.from_numpy(np.array(a, dtype=np.float32)).permute(2, 0, 1)[None].div(255).to(self.device)
        y = torch.from_numpy(np.array(b, dtype=np.float32)).permute(2, 0, 1)[None].div(255).to(self.device)
        return x, y

    def lpips(self, a: np.ndarray, b: np.ndarray) -> float | None:
        """LPIPS of two uint8 images (None without weights or below 32 px)."""
        import torch

        if self.lpips_net is None or min(a.shape[:2]) < MIN_PERCEPTUAL_SIDE:
            return None
        x, y = self._pair(a, b)
        with torch.no_grad():
            return float(self.lpips_net(2 * x - 1, 2 * y - 1)[0])

    def dists(self, a: np.ndarray, b: np.ndarray) -> float | None:
        import torch

        if self.dists_net is None or min(a.shape[:2]) < MIN_PERCEPTUAL_SIDE:
            return None
        x, y = self._pair(a, b)
        with torch.no_grad():
            return float(self.dists_net(x, y)[0])

    def fid_features(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Inception features [n, 2048] of the pair's patches (None without weights; n may be 0)."""
        import torch

        if self.inception is None:
            return None
        pa, pb = fid_patches(a, self.fid_patch), fid_patches(b, self.fid_patch)
        if not pa:
            empty = np.zeros((0, FID_FEATURES), np.float32)
            return empty, empty.copy()
        with torch.no_grad():
            feats = []
            for patches in (pa, pb):
                x = torch.from_numpy(np.stack(patches).astype(np.float32)).permute(0, 3, 1, 2).div(255).to(self.device)
                feats.append(self.inception(x).float().cpu().numpy())
        return feats[0], feats[1]
