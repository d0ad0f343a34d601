"""Session fixtures shared by every test folder: the real test photos made by `make photos`, the
moto S3 server, the tiny codecs and one local Ray. Each is defined here once, so the folders share
one instance per session (a fixture re-exported by several conftests is a separate fixture per
folder, and a second ``ray.init`` in one process fails).

Missing photos are a hard failure, never a skip: a suite that silently skips its real-image tests
would pass CI while testing nothing. `make test` fetches them first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# pyproject's `pythonpath = ["."]` does this for pytest runs; repeated here so the fixtures still
# import `tools` when pytest is started with another rootdir/config.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from demo.local_s3 import LocalS3, local_s3  # noqa: E402
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


# ------------------------------------------------------------------------------------- S3 (moto)
@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    """A real S3 endpoint on 127.0.0.1 (moto server); local test credentials in the environment."""
    with local_s3() as server:
        yield server


# ------------------------------------------------------------------------------------- codecs
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real tiny RDEIC codec (seeded random weights) saved with save_pretrained."""
    from rdeic_core import RDEICCodec

    path = tmp_path_factory.mktemp("model") / "tiny"
    RDEICCodec.from_config("tiny", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny codec with other weights (another fingerprint)."""
    from rdeic_core import RDEICCodec

    path = tmp_path_factory.mktemp("model") / "tiny-seed1"
    RDEICCodec.from_config("tiny", seed=1).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="session")
def ray_address(s3_server: LocalS3) -> Iterator[str]:
    """A real local Ray: 8 logical CPUs on this 2-core machine (fewer deadlock, see ecosystem §1.8)
    and 2 fake GPUs, so the executor takes its GPU-actor path (the codec then runs on CPU).

    Depends on ``s3_server`` so the AWS test environment is set before any worker starts.
    """
    import ray

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 turns token auth on by default
    # address="local": always a private instance, never a cluster someone started on this machine
    # (ray.init() would join it, and refuse num_cpus/num_gpus for a cluster it did not start)
    ray.init(address="local", num_cpus=8, num_gpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
