"""Training crops from the repo's photos (``data/photos``, made by ``make photos``).

The reference trains on LSDIR with ``LICDataset``: open the file, ``random_crop_arr``
(resize the short side to U[crop/max_frac, crop/min_frac] with BOX halvings then
one BICUBIC resize, random crop), random horizontal flip, map to [-1, 1].
We do the same on the *training* split of our photos, with two production changes:

* Each full-size photo (up to 5312x2988 JPEG) is decoded **once** and kept in
  memory as a downscaled copy (long side ``max_side``, but never so small that
  a crop would have to be upsampled); decoding the original for every crop would
  cost more than a small model's training step.
* Sample ``i`` is a pure function of ``(seed, i)``: photo order is a per-epoch
  permutation and the crop geometry comes from a ``random.Random`` seeded with
  ``(seed, i)``. A run resumed at step k therefore sees exactly the crops an
  uninterrupted run would, without saving any data-loader state, and DDP ranks
  read disjoint indices.

Validation photos (``tools.photos.VALIDATION`` / ``split.json``) are refused.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

# data/photos of the repo checkout (what `make photos` writes; tools/photos.py owns the split).
DEFAULT_PHOTOS_DIR = Path(__file__).resolve().parents[2] / "data" / "photos"

# (min_crop_frac, max_crop_frac) of the reference's random_crop_arr (used for 512 crops)
# and random_crop_arr_256 (its stage-2 crops): the short side is resized to
# U[ceil(crop / max_frac), ceil(crop / min_frac)].
REFERENCE_SCALE_RANGE = (0.8, 1.0)
REFERENCE_STAGE2_SCALE_RANGE = (0.4, 0.5)

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, index) pairs


class DataError(ValueError):
    """The photos needed for training are missing or not allowed."""


@dataclass(frozen=True)
class CropSettings:
    """Geometry of one training crop (pixels); ``scale_range`` as the reference's crop fractions."""

    crop: int
    scale_range: tuple[float, float] = REFERENCE_SCALE_RANGE
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.crop < 8:
            raise DataError(f"crop must be >= 8 px, got {self.crop}")
        lo, hi = self.scale_range
        if not (0.0 < lo <= hi <= 1.0):
            raise DataError(f"scale_range must satisfy 0 < min_frac <= max_frac <= 1, got {self.scale_range}")

    @property
    def short_side_range(self) -> tuple[int, int]:
        """Inclusive range of the resized short side (the reference's min/max_smaller_dim_size)."""
        lo, hi = self.scale_range
        return math.ceil(self.crop / hi), math.ceil(self.crop / lo)


def train_photo_paths(photos_dir: str | Path = DEFAULT_PHOTOS_DIR) -> list[Path]:
    """The full-size photos of the training split, sorted; never a validation photo."""
    root = Path(photos_dir)
    split_file = root / "split.json"
    if not split_file.is_file():
        raise DataError(f"{split_file} is missing: run `make photos` (python tools/photos.py fetch) first")
    split = json.loads(split_file.read_text(encoding="utf-8"))
    names = sorted(split.get("train", []))
    if not names:
        raise DataError(f"{split_file} lists no training photos")
    paths = [root / "full" / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = " ..." if len(missing) > 3 else ""
        raise DataError(f"training photos missing (run `make photos`): {missing[:3]}{more}")
    _refuse_validation(paths, set(split.get("validation", [])))
    return paths


def validation_names(paths: Sequence[Path] = ()) -> set[str]:
    """Names of held-out photos: ``tools.photos.VALIDATION`` (when ``tools`` is importable, as in a
    checkout) plus the ``validation`` list of any ``split.json`` next to the photos' ``full/`` folder.

    ``tools`` is not part of the installed package, so the split file is the check that always works.
    """
    names: set[str] = set()
    try:
        from tools.photos import VALIDATION

        names.update(VALIDATION)
    except ImportError:
        pass
    for folder in {Path(p).resolve().parent.parent for p in paths}:
        split_file = folder / "split.json"
        if split_file.is_file():
            names.update(json.loads(split_file.read_text(encoding="utf-8")).get("validation", []))
    return names


def _refuse_validation(paths: Sequence[Path], extra_validation: AbstractSet[str] = frozenset()) -> None:
    banned = validation_names(paths) | set(extra_validation)
    banned_stems = {Path(n).stem for n in banned}
    bad = [str(p) for p in paths if Path(p).name in banned or Path(p).stem in banned_stems]
    if bad:
        raise DataError(f"validation photos must never be used for training: {bad}")


def load_downscaled(path: str | Path, max_side: int, min_short_side: int) -> Image.Image:
    """Decode once, upright (EXIF), RGB, long side <= ``max_side`` unless the short side would drop below
    ``min_short_side`` (then the short side is kept at ``min_short_side``, or the original if smaller).

    JPEG ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly (never below the target),
    which is most of the time saved on a 16-megapixel original.
    """
    with Image.open(path) as im:
        w0, h0 = im.size
        scale = min(1.0, max(max_side / max(w0, h0), min_short_side / min(w0, h0)))
        target = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
        if im.format == "JPEG" and scale < 1.0:
            # sizes here are the stored (pre-EXIF-rotation) ones, which is what draft works on;
            # it never goes below the requested size
            im.draft("RGB", target)
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    w1, h1 = rgb.size
    scale = min(1.0, max(max_side / max(w1, h1), min_short_side / min(w1, h1)))
    if scale < 1.0:
        rgb = rgb.resize((max(1, round(w1 * scale)), max(1, round(h1 * scale))), resample=Image.Resampling.LANCZOS)
    return rgb


def random_crop(img: Image.Image, crop: CropSettings, rng: random.Random) -> np.ndarray:
    """The reference's ``random_crop_arr`` (+ hflip), drawing from ``rng``; uint8 H x W x 3."""
    lo, hi = crop.short_side_range
    short = rng.randrange(lo, hi + 1)
    while min(img.size) >= 2 * short:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = short / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    y = rng.randrange(arr.shape[0] - crop.crop + 1)
    x = rng.randrange(arr.shape[1] - crop.crop + 1)
    out = arr[y: y + crop.crop, x: x + crop.crop]
    if crop.hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def to_model_range(arr: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> float32 3 x H x W in [-1, 1] (LICDataset's ``jpg``, channels first)."""
    t = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32)
    return t / 127.5 - 1.0


class PhotoCrops(Dataset):
    """Deterministic random crops of in-memory photos; ``ds[i]`` is crop number ``i`` (any i >= 0).

    ``len(ds)`` is the number of photos (one "epoch" = one crop of each, in a per-epoch random
    order), but any non-negative index is valid, so a trainer can simply ask for indices
    ``step * world * batch + rank * batch + j``.
    """

    def __init__(self, paths: Sequence[str | Path], crop: CropSettings, seed: int = 0, max_side: int = 1024):
        if not paths:
            raise DataError("PhotoCrops needs at least one photo")
        photo_paths = [Path(p) for p in paths]
        _refuse_validation(photo_paths)
        self.paths = photo_paths
        self.crop = crop
        self.seed = int(seed)
        need_short = crop.short_side_range[1]
        self.images = [load_downscaled(p, max_side, need_short) for p in photo_paths]
        small = [(str(p), im.size) for p, im in zip(photo_paths, self.images) if min(im.size) < crop.crop]
        if small:
            raise DataError(f"photos smaller than the {crop.crop}px crop: {small}")
        self._perm_cache: dict[int, list[int]] = {}

    @classmethod
    def from_photos_dir(cls, photos_dir: str | Path, crop: CropSettings, seed: int = 0,
                        max_side: int = 1024) -> PhotoCrops:
        return cls(train_photo_paths(photos_dir), crop, seed=seed, max_side=max_side)

    def __len__(self) -> int:
        return len(self.images)

    def _rng(self, *key: int) -> random.Random:
        h = self.seed & 0xFFFFFFFFFFFFFFFF
        for k in key:
            h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * _SEED_MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        return random.Random(h)

    def _photo_index(self, index: int) -> int:
        n = len(self.images)
        epoch, pos = divmod(index, n)
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = list(range(n))
            self._rng(1, epoch).shuffle(perm)
            self._perm_cache = {epoch: perm}  # indices are consumed in order; keep one epoch
        return perm[pos]

    def crop_array(self, index: int) -> np.ndarray:
        """Crop ``index`` as uint8 H x W x 3."""
        if index < 0:
            raise IndexError(f"crop index must be >= 0, got {index}")
        img = self.images[self._photo_index(index)]
        return random_crop(img, self.crop, self._rng(2, index))

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_model_range(self.crop_array(index))

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """The [B, 3, crop, crop] batch of ``rank`` at ``step`` (disjoint across ranks)."""
        start = (step * world_size + rank) * batch_size
        return torch.stack([self[start + j] for j in range(batch_size)])
