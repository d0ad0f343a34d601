"""Fixtures for CLI tests: shards of real photos (the real tiny codec and moto S3 come from
tests/conftest.py) plus a small archive written once by the real `rdeic archive` command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pipeline.conftest import TEST_MAX_PIXELS as TEST_MAX_PIXELS  # re-exported for the tests here
from tests.pipeline.conftest import ShardSpec, build_shard_specs

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Shards:
    """Shard tars on disk: the brace pattern over all of them and the specs (expected outcomes)."""

    dir: Path
    pattern: str
    specs: list[ShardSpec]


def write_shards(root: Path, specs: list[ShardSpec]) -> Shards:
    root.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        (root / f"{spec.name}.tar").write_bytes(spec.tar_bytes())
    last = len(specs) - 1
    return Shards(root, str(root / f"shard-{{000000..{last:06d}}}.tar"), specs)


@pytest.fixture(scope="session")
def cli_shards(tmp_path_factory: pytest.TempPathFactory, small_photo_paths: list[Path]) -> Shards:
    """Three shards: 3 real photos plus every hostile sample (so failures have reasons)."""
    specs = build_shard_specs(small_photo_paths, n_shards=3, photos_per_shard=1)
    return write_shards(tmp_path_factory.mktemp("cli-shards"), specs)


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
