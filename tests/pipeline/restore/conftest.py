"""Fixtures for restore / get / audit: real photos archived by the real archive job (local executor),
helpers to damage one row of an archive file, and a temporary torch hub cache.

Moto S3, the tiny codecs and the local Ray come from ``tests/conftest.py``; the shard helpers from
``tests/pipeline/conftest.py``.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.pipeline.conftest import TEST_MAX_PIXELS, ShardSpec, build_shard_specs

ZOO_MODEL = "mini"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def codec_model_dir() -> Path:
    """The embedded model (``rdeic_core/zoo/mini``): restore and audit are tested on what users get."""
    from rdeic_core.codec import resolve_model_path

    return resolve_model_path(ZOO_MODEL)  # raises when the shipped model is missing


@pytest.fixture(scope="session")
def codec(codec_model_dir: Path):
    from rdeic_core import RDEICCodec

    return RDEICCodec.from_pretrained(codec_model_dir)


@dataclass(frozen=True)
class LocalArchive:
    """Source shards + the archive the real archive job wrote from them."""

    root: Path
    specs: list[ShardSpec]
    pattern: str
    archive: Path
    model: Path

    def shard_file(self, shard_id: str) -> Path:
        return self.archive / "archive" / f"{shard_id}.parquet"

    def rows(self, shard_id: str) -> list[dict[str, Any]]:
        return pq.read_table(self.shard_file(shard_id)).to_pylist()

    def ok_rows(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for s in self.specs for r in self.rows(s.name) if r["status"] == "ok"}


def write_archive(root: Path, specs: list[ShardSpec], model: Path, **job_kw: Any) -> LocalArchive:
    from jobs.commands.archive import ArchiveJob, run_archive

    (root / "in").mkdir(parents=True, exist_ok=True)
    for spec in specs:
        (root / "in" / f"{spec.name}.tar").write_bytes(spec.tar_bytes())
    pattern = str(root / "in" / "*.tar")
    job = ArchiveJob(inputs=(pattern,), output=str(root / "archive"), model=str(model), executor="local",
                     max_pixels=TEST_MAX_PIXELS, **job_kw)
    assert run_archive(job).exit_code == 0
    return LocalArchive(root, specs, pattern, root / "archive", model)


@pytest.fixture(scope="session")
def local_archive(tmp_path_factory: pytest.TempPathFactory, small_photo_paths: list[Path],
                  codec_model_dir: Path) -> LocalArchive:
    """Two shards of 3 real photos each (PNG and JPEG) plus every hostile sample, archived locally
    with small row groups (2 rows) so point lookups have several row groups to skip."""
    specs = build_shard_specs(small_photo_paths, n_shards=2, photos_per_shard=3)
    return write_archive(tmp_path_factory.mktemp("archived"), specs, codec_model_dir, row_group_size=2)


def rewrite_rows(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite an archive file with ``edit`` applied to every row, keeping schema and metadata."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    for row in rows:
        edit(row)
    new = pa.Table.from_pylist(rows, schema=table.schema)
    pq.write_table(new, path, row_group_size=2)


def flip_byte(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset % len(out)] ^= 0x5A
    return bytes(out)


def damage_archive(archive: LocalArchive, other_model: Path, keys: dict[str, str]) -> None:
    """Damage archived rows in place: ``keys`` maps a key to the damage:

    * ``crc_mismatch``: one payload byte flipped, the archive's CRC column left as it was;
    * ``corrupt_bitstream``: byte flipped and the CRC column updated (only the stream's own CRC fails);
    * ``foreign_model``: the stream replaced by another model's encoding of the same image (CRC updated).
    """
    from rdeic_core import RDEICCodec

    other = RDEICCodec.from_pretrained(other_model) if "foreign_model" in keys.values() else None

    def edit(row: dict[str, Any]) -> None:
        kind = keys.get(row["key"])
        if kind is None:
            return
        stream = row["bitstream"]
        if kind == "crc_mismatch":
            row["bitstream"] = flip_byte(stream, len(stream) // 2)
        elif kind == "corrupt_bitstream":
            row["bitstream"] = flip_byte(stream, len(stream) // 2)
            row["bitstream_crc32"] = zlib.crc32(row["bitstream"])
        elif kind == "foreign_model":
            image = source_image(archive, row["key"])
            row["bitstream"] = other.encode([image])[0]  # type: ignore[union-attr]
            row["bitstream_crc32"] = zlib.crc32(row["bitstream"])
        else:
            raise ValueError(kind)

    for shard_id in sorted({k.split("/", 1)[0] for k in keys}):
        rewrite_rows(archive.shard_file(shard_id), edit)


def source_image(archive: LocalArchive, key: str) -> np.ndarray:
    """The source pixels of a photo key, decoded independently of the pipeline (PIL, EXIF-transposed, RGB)."""
    from PIL import Image, ImageOps

    shard_id, sample = key.split("/", 1)
    spec = next(s for s in archive.specs if s.name == shard_id)
    members = dict(spec.samples)[sample]
    data = next(v for k, v in members.items() if k in ("png", "jpg"))
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


# ------------------------------------------------------------------------------------ audit
class NetworkBlocked(AssertionError):
    """Raised by the guards below: a test reached for the network."""


def block_network(mp: pytest.MonkeyPatch) -> None:
    """Refuse every non-loopback connection and torch.hub download for the rest of the test."""
    import socket

    import torch.hub

    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise NetworkBlocked(f"network call to {address!r} during an audit")
        return real_connect(self, address)

    def no_download(*args: Any, **kwargs: Any) -> Any:
        raise NetworkBlocked(f"torch.hub download attempted: {args!r}")

    mp.setattr(socket.socket, "connect", guarded_connect)
    mp.setattr(torch.hub, "load_state_dict_from_url", no_download)
    mp.setattr(torch.hub, "download_url_to_file", no_download)


def empty_hub(mp: pytest.MonkeyPatch, root: Path) -> Path:
    """Point $TORCH_HOME at ``root`` (nothing in it) and clear the weight-path variables."""
    mp.setenv("TORCH_HOME", str(root))
    for env in ("RDEIC_ALEXNET_WEIGHTS", "RDEIC_LPIPS_LIN_WEIGHTS", "RDEIC_VGG16_WEIGHTS", "RDEIC_DISTS_WEIGHTS",
                "RDEIC_FID_INCEPTION_WEIGHTS"):
        mp.delenv(env, raising=False)
    ckpt = root / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    return ckpt


@dataclass(frozen=True)
class AuditRun:
    outcome: Any
    output: Path
    checkpoints: Path


@pytest.fixture(scope="session")
def audit_without_weights(tmp_path_factory: pytest.TempPathFactory, local_archive: LocalArchive) -> AuditRun:
    """The whole local archive audited with an empty torch hub cache and the network blocked;
    batch size 1, so every decoded image equals ``codec.decode([bitstream])``."""
    from jobs.commands.audit import AuditJob, run_audit

    root = tmp_path_factory.mktemp("audit-noweights")
    with pytest.MonkeyPatch.context() as mp:
        ckpt = empty_hub(mp, root / "torch")
        block_network(mp)
        job = AuditJob(archive=str(local_archive.archive), sources=(local_archive.pattern,), output=str(root / "out"),
                       executor="local", batch_size=1, fid_patch=128, worst_k=4)
        outcome = run_audit(job)
    return AuditRun(outcome, root / "out", ckpt)


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache ($TORCH_HOME) for one test; returns its checkpoints directory."""
    return empty_hub(monkeypatch, tmp_path / "torch")
