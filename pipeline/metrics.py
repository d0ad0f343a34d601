"""Image-quality metric math of the audit and of ``rdeic evaluate``: PSNR, MS-SSIM, FID and KID.

* **PSNR** on the 8-bit RGB pixels, all channels: ``10 log10(255^2 / MSE)`` (``inf`` when equal).
* **MS-SSIM**: ``pytorch_msssim.ms_ssim`` (5 scales, standard weights, Gaussian sigma 1.5,
  ``data_range=255``) on float32 RGB. The library needs the short side to exceed
  ``(win_size - 1) * 16``; the standard 11-px window therefore needs > 160 px. **Fallback for
  smaller images**: the window shrinks to the largest odd size that fits
  (``ms_ssim_window``: 9 px for 129..160, 7 for 97..128, 5 for 65..96, 3 for 33..64), all 5 scales
  kept, sigma unchanged; the window used is stored per image (``ms_ssim_win``). Below 33 px no
  window fits and MS-SSIM is null (``ms_ssim_win`` null).
* **FID/KID** over feature sets: FID is the Frechet distance of the two 2048-d Gaussians, KID the
  unbiased cubic-polynomial-kernel MMD averaged over random subsets.

The perceptual networks (LPIPS, DISTS, and the Inception network and patch protocol that produce
the FID/KID features), their weight files and the per-worker runner are model code and live in the
``perceptual`` package; this module is plain math on arrays.
"""

from __future__ import annotations

import math

import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_SIGMA = 1.5


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


# ------------------------------------------------------------------------------------ FID, KID
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
