"""The FID/KID feature network and patch protocol: pytorch-fid's Inception-v3 pool3 on image patches.

The network is the TF ``inception-2015-12-05`` graph as ``pytorch-fid`` ports it (torchvision's
Inception3 with TF's pooling quirks), so features, and therefore FID/KID, match what published
numbers use. The patches follow HiFiC / MS-ILLM: the non-overlapping ``P x P`` grid from the
top-left corner plus the grid shifted by ``P/2`` (default ``P = 256``), each resized bilinearly to
299 px and mapped to [-1, 1]. The statistics over the features (Frechet distance, KID) are plain
math and live in ``pipeline.metrics``. torch is imported when the network is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_FID_PATCH = 256
INCEPTION_SIZE = 299
FID_FEATURES = 2048


def build_fid_inception(state: dict[str, Any]) -> Any:
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
