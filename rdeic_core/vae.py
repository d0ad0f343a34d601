"""The SD VAE (diffusers ``AutoencoderKL``) and the feature RDEIC compresses.

RDEIC does not compress the VAE's posterior latent: it takes the encoder's
feature just before ``conv_out`` — ``SiLU(GroupNorm(mid_block(...)))``, 512
channels at H/8 for SD 2.1 — and multiplies it by the latent scaling factor
0.18215 (spec section 1; ``encode_hc`` in the reference). Training also needs
the posterior latent (z_0 = 0.18215 * posterior.sample()): it takes both from one
encoder pass (``training.stages.encode_for_training``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn


class SDVAE(nn.Module):
    def __init__(self, vae_kwargs: dict[str, Any], scaling_factor: float):
        super().__init__()
        self.vae = AutoencoderKL(**vae_kwargs)
        self.scaling_factor = float(scaling_factor)

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-``conv_out`` encoder feature of images in [-1, 1], times the scaling factor."""
        enc = self.vae.encoder
        h = enc.conv_in(x)
        for block in enc.down_blocks:
            h = block(h)
        h = enc.mid_block(h)
        h = enc.conv_norm_out(h)
        h = enc.conv_act(h)
        return h * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (scaled) -> image in about [-1, 1]."""
        return self.vae.decode(z / self.scaling_factor).sample
