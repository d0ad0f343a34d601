"""Where the perceptual metrics' weight files are, and which are missing: no network, no download.

One module for every network's files so the lookup rule (torch hub's checkpoint directory, or the
path in a named environment variable) and the "exactly which file is missing" messages are written
once, and the table in docs/restore-audit.md has a single place to match. Importing it needs no
torch: ``rdeic audit`` checks the files on the driver before starting any worker.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PERCEPTUAL_METRICS = ("lpips", "dists", "fid")  # "fid" covers FID and KID (same features)


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
    # the names and variables training's LPIPS loss looks for (imported late: that module imports torch)
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


def load_state(path: str) -> dict[str, Any]:
    """A state dict from a local file, tensors only (``weights_only``: no pickled code runs)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
