"""PhotoCrops: the reference's random_crop_arr geometry, determinism by index, and the split rule."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rdeic_core.training.data import (
    CropSettings,
    DataError,
    PhotoCrops,
    load_downscaled,
    random_crop,
    train_photo_paths,
)


def test_train_paths_are_the_train_split_only(photos_root):
    paths = train_photo_paths(photos_root)
    split = json.loads((photos_root / "split.json").read_text())
    assert sorted(p.name for p in paths) == sorted(split["train"])
    assert not {p.name for p in paths} & set(split["validation"])
    assert all(p.parent.name == "full" and p.is_file() for p in paths)


def test_validation_photo_is_refused(photos_root):
    val = photos_root / "full" / json.loads((photos_root / "split.json").read_text())["validation"][0]
    with pytest.raises(DataError, match="validation"):
        PhotoCrops([val], CropSettings(64))


def test_validation_photo_is_refused_by_split_file_alone(tmp_path, mini_photos_dir):
    # a photo that is only listed as validation in the folder's split.json (not in tools.photos)
    name = "GreenMeadow.jpg"
    (tmp_path / "full").mkdir()
    shutil.copy(mini_photos_dir / "full" / name, tmp_path / "full" / name)
    (tmp_path / "split.json").write_text(json.dumps({"validation": [name], "train": []}))
    with pytest.raises(DataError, match="validation"):
        PhotoCrops([tmp_path / "full" / name], CropSettings(64))


def test_missing_split_file_says_make_photos(tmp_path):
    with pytest.raises(DataError, match="make photos"):
        train_photo_paths(tmp_path)


def test_downscaled_copy_keeps_enough_short_side(mini_photos_dir):
    path = mini_photos_dir / "full" / "GreenMeadow.jpg"  # 1280 x 1024
    im = load_downscaled(path, max_side=256, min_short_side=100)
    assert im.size == (256, 205) and im.mode == "RGB"
    im = load_downscaled(path, max_side=256, min_short_side=640)  # crops need a 640 short side: no upsampling
    assert im.size == (800, 640)
    im = load_downscaled(path, max_side=4096, min_short_side=10)  # never upscaled
    assert im.size == (1280, 1024)


def test_random_crop_follows_reference_geometry():
    # a gradient image: the crop's pixel values reveal the scale the image was resized to
    w, h = 400, 300
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.float64).astype(np.uint8)[None, :]
    img = Image.fromarray(arr)
    crop = CropSettings(64, (0.8, 1.0), hflip=False)
    assert crop.short_side_range == (64, 80)
    spans = []
    for seed in range(40):
        out = random_crop(img, crop, random.Random(seed))
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        spans.append(int(out[0, -1, 0]) - int(out[0, 0, 0]))
    # resized short side in [64, 80] -> width in [85, 107] px for the 255-level ramp:
    # 63 px of it span 255*63/(W-1) levels, i.e. between ~150 and ~191
    assert min(spans) >= 145 and max(spans) <= 195
    assert max(spans) - min(spans) > 10  # the scale really varies


def test_hflip_happens_about_half_the_time():
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = 255
    img = Image.fromarray(arr)
    crop = CropSettings(64, (1.0, 1.0), hflip=True)
    flips = sum(random_crop(img, crop, random.Random(s))[0, 0, 0] == 0 for s in range(200))
    assert 70 < flips < 130


def test_crops_are_a_function_of_seed_and_index(mini_photos_dir):
    paths = sorted((mini_photos_dir / "full").iterdir())
    a = PhotoCrops(paths, CropSettings(64), seed=5, max_side=256)
    b = PhotoCrops(paths, CropSettings(64), seed=5, max_side=256)
    c = PhotoCrops(paths, CropSettings(64), seed=6, max_side=256)
    assert len(a) == 2
    x = a[7]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(a[7], b[7])  # same seed, same index: same crop
    assert not torch.equal(a[7], a[8])
    assert not all(torch.equal(a[i], c[i]) for i in range(4))
    # each epoch of len(ds) crops visits every photo once
    first = {a._photo_index(i) for i in range(2)}
    second = {a._photo_index(i) for i in range(2, 4)}
    assert first == second == {0, 1}


def test_batches_of_ranks_are_disjoint_indices(mini_photos_dir):
    paths = sorted((mini_photos_dir / "full").iterdir())
    ds = PhotoCrops(paths, CropSettings(64), seed=1, max_side=256)
    b0 = ds.batch(3, 2, rank=0, world_size=2)
    b1 = ds.batch(3, 2, rank=1, world_size=2)
    assert b0.shape == (2, 3, 64, 64)
    assert torch.equal(b0[0], ds[12]) and torch.equal(b1[1], ds[15])
    assert torch.equal(ds.batch(3, 2), torch.stack([ds[6], ds[7]]))


def test_bad_crop_settings_are_refused():
    with pytest.raises(DataError, match="scale_range"):
        CropSettings(64, (0.9, 0.5))
    with pytest.raises(DataError, match="crop"):
        CropSettings(4)
