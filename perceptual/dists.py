"""DISTS (Ding et al. 2020): VGG16 features with L2 pooling, compared by learned alpha/beta.

The same computation as ``DISTS_pytorch`` (docs/restore-audit.md, "Equivalence"), rebuilt on
torchvision's VGG16 layers so it loads the standard weight files and adds no dependency. torch is
imported when a network is built, not when this module is imported, so the audit's driver (which
only checks weight files) never loads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def build_dists(vgg_state: dict[str, Any], alpha_beta: dict[str, Any]) -> Any:
    """DISTS from a torchvision VGG16 state dict and ``{alpha, beta}: [1, 1475, 1, 1]``; frozen, eval."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchvision.models.vgg import cfgs, make_layers

    class L2Pool(nn.Module):
        kernel: torch.Tensor  # buffers, declared so their type is a tensor, not "Tensor | Module"

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
        mean: torch.Tensor
        std: torch.Tensor
        alpha: torch.Tensor
        beta: torch.Tensor

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
