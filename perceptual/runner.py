"""The perceptual metrics one audit worker runs: the networks whose weights it found, on uint8 pairs.

:class:`PerceptualMetrics` is what ``pipeline.audit`` holds per worker: it looks for the weight
files (:mod:`perceptual.weights`), builds the networks that have them (LPIPS, DISTS, the FID
Inception) once, and turns a pair of H x W x 3 uint8 images into an LPIPS value, a DISTS value and
the two sides' Inception features. A network without its files stays None and its metric is null,
with the missing files named in :attr:`PerceptualMetrics.status`; nothing is downloaded.
LPIPS and DISTS need a short side of at least 32 px (AlexNet's strides), else null.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dists import build_dists
from .inception import DEFAULT_FID_PATCH, FID_FEATURES, build_fid_inception, fid_patches
from .lpips import build_lpips
from .weights import PERCEPTUAL_METRICS, WeightStatus, find_weights, load_state

log = logging.getLogger(__name__)

MIN_PERCEPTUAL_SIDE = 32


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
                out.lpips_net = build_lpips(load_state(st.found[0]), load_state(st.found[1])).to(device)
            elif metric == "dists":
                out.dists_net = build_dists(load_state(st.found[0]), load_state(st.found[1])).to(device)
            elif metric == "fid":
                out.inception = build_fid_inception(load_state(st.found[0])).to(device)
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
