"""Fixtures of the training tests: a photos folder with two small real training photos.

It has the layout ``tools/photos.py`` writes (``full/`` + ``split.json``), so the trainer reads it
exactly as it reads ``data/photos``; two ~1.3-megapixel originals keep the decode cost of every
run small.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TWO_SMALL_TRAIN_PHOTOS = ("GreenMeadow.jpg", "Picture_1A_by_freespace.jpg")


@pytest.fixture(scope="session")
def mini_photos_dir(photos_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    split = json.loads((photos_root / "split.json").read_text())
    for name in TWO_SMALL_TRAIN_PHOTOS:
        assert name in split["train"], f"{name} is no longer a training photo; update the fixture"
    root = tmp_path_factory.mktemp("photos")
    (root / "full").mkdir()
    for name in TWO_SMALL_TRAIN_PHOTOS:
        (root / "full" / name).symlink_to((photos_root / "full" / name).resolve())
    (root / "split.json").write_text(json.dumps({"validation": split["validation"],
                                                 "train": list(TWO_SMALL_TRAIN_PHOTOS)}))
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    """2 shared cores: keep every training test on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
