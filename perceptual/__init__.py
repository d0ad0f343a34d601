"""Perceptual image-quality networks, from local weight files only: LPIPS, DISTS, FID/KID's Inception.

Model code kept out of ``pipeline/`` (which moves shards, images and records and does plain metric
math in ``pipeline.metrics``): the network definitions, finding and loading their weights, and the
per-worker runner ``rdeic audit`` uses.

* :mod:`perceptual.weights` — which files each metric needs, where they are looked for
  (``$TORCH_HOME/hub/checkpoints`` or an environment variable), what is missing; no torch import.
* :mod:`perceptual.lpips` — LPIPS v0.1 AlexNet, built from ``rdeic_core.training.perceptual``
  (the module training's loss uses: one definition).
* :mod:`perceptual.dists` — DISTS (VGG16, L2 pooling, learned alpha/beta).
* :mod:`perceptual.inception` — pytorch-fid's Inception-v3 and the HiFiC/MS-ILLM patch protocol.
* :mod:`perceptual.runner` — :class:`PerceptualMetrics`: the loaded networks on uint8 image pairs.

Nothing here downloads: a missing file disables its metric and is named. Importing the package
does not import torch (the networks import it when built).
"""

from .dists import build_dists
from .inception import DEFAULT_FID_PATCH, FID_FEATURES, INCEPTION_SIZE, build_fid_inception, fid_patches
from .lpips import build_lpips
from .runner import MIN_PERCEPTUAL_SIDE, PerceptualMetrics
from .weights import (
    DISTS_FILE,
    FID_INCEPTION_FILE,
    PERCEPTUAL_METRICS,
    VGG16_FILE,
    WeightFile,
    WeightStatus,
    checkpoint_dir,
    find_weights,
    load_state,
    weight_files,
)

__all__ = [
    "DEFAULT_FID_PATCH",
    "DISTS_FILE",
    "FID_FEATURES",
    "FID_INCEPTION_FILE",
    "INCEPTION_SIZE",
    "MIN_PERCEPTUAL_SIDE",
    "PERCEPTUAL_METRICS",
    "VGG16_FILE",
    "PerceptualMetrics",
    "WeightFile",
    "WeightStatus",
    "build_dists",
    "build_fid_inception",
    "build_lpips",
    "checkpoint_dir",
    "fid_patches",
    "find_weights",
    "load_state",
    "weight_files",
]
