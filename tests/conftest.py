"""Session fixtures shared by every test folder: the real test photos made by `make photos`.

Missing photos are a hard failure, never a skip: a suite that silently skips its real-image tests
would pass CI while testing nothing. `make test` fetches them first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# pyproject's `pythonpath = ["."]` does this for pytest runs; repeated here so the fixtures still
# import `tools` when pytest is started with another rootdir/config.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools import photos as photos_tool  # noqa: E402

PHOTOS_DIR_ENV = "RDEIC_PHOTOS_DIR"
MIN_SMALL_PHOTOS = 20


def _fail_missing(what: str, root: Path) -> None:
    pytest.fail(
        f"test photos incomplete: {what} (looked in {root}). Run `make photos` "
        f"(python tools/photos.py fetch) from the repo root, or set {PHOTOS_DIR_ENV}.",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def photos_root() -> Path:
    """data/photos (or $RDEIC_PHOTOS_DIR), checked to hold what `tools/photos.py fetch` writes."""
    root = Path(os.environ.get(PHOTOS_DIR_ENV, photos_tool.DEFAULT_DEST))
    for rel in ("full", "small", "val768", "split.json", "LICENSES.tsv"):
        if not (root / rel).exists():
            _fail_missing(f"{rel} is missing", root)
    return root


@pytest.fixture(scope="session")
def small_photo_paths(photos_root: Path) -> list[Path]:
    """Every photo at long side 256 px (PNG, RGB), training and validation alike, sorted."""
    paths = sorted((photos_root / "small").glob("*.png"))
    if len(paths) < MIN_SMALL_PHOTOS:
        _fail_missing(f"only {len(paths)} small PNGs, expected at least {MIN_SMALL_PHOTOS}", photos_root)
    return paths


@pytest.fixture(scope="session")
def train_photo_paths(small_photo_paths: list[Path], photos_root: Path) -> list[Path]:
    """Small PNGs of the training split only (never a VALIDATION photo), sorted."""
    train_stems = {Path(n).stem for n in photos_tool.load_split(photos_root)["train"]}
    return [p for p in small_photo_paths if p.stem in train_stems]


@pytest.fixture(scope="session")
def val_photo_paths(photos_root: Path) -> list[Path]:
    """The VALIDATION photos as 768x512 / 512x768 PNG centre crops, sorted."""
    paths = sorted((photos_root / "val768").glob("*.png"))
    if len(paths) != len(photos_tool.VALIDATION):
        _fail_missing(f"{len(paths)} val768 PNGs, expected {len(photos_tool.VALIDATION)}", photos_root)
    return paths
