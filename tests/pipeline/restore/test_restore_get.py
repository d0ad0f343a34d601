"""``rdeic get``: one key, decoded without scanning the archive (footer + one row group)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from jobs.commands.get import GetError, GetJob, run_get
from pipeline.archives import ArchiveLocation, KeyNotFoundError, lookup
from tests.pipeline.restore.conftest import LocalArchive, damage_archive


def _get(archive: Path, key: str, out: Path, *extra: str) -> list[str]:
    return ["--log-level", "WARNING", "get", str(archive), key, "-o", str(out), *extra]


def test_get_decodes_one_key_reading_one_row_group(tmp_path: Path, local_archive: LocalArchive, codec,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    key = "shard-000001/photo004"
    assert main(_get(local_archive.archive, key, tmp_path / "one.png")) == 0
    report = json.loads(capsys.readouterr().out)
    row = local_archive.ok_rows()[key]
    image = np.asarray(Image.open(tmp_path / "one.png"))
    assert np.array_equal(image, codec.decode([row["bitstream"]])[0])
    meta = pq.read_metadata(local_archive.shard_file("shard-000001"))
    assert report["row_groups"] == meta.num_row_groups >= 4
    assert report["row_groups_read"] == 1
    assert (report["width"], report["height"]) == (row["width"], row["height"])

    # --steps overrides the header's default (0 steps = the compressed latent, no diffusion)
    assert main(_get(local_archive.archive, key, tmp_path / "s0.png", "--steps", "0")) == 0
    s0 = np.asarray(Image.open(tmp_path / "s0.png"))
    assert np.array_equal(s0, codec.decode([row["bitstream"]], steps=0)[0]) and not np.array_equal(s0, image)
    assert main(_get(local_archive.archive, key, tmp_path / "one.jpg")) == 0  # format from the extension
    capsys.readouterr()
    assert Image.open(tmp_path / "one.jpg").format == "JPEG"


def test_lookup_reads_the_footer_and_one_row_group_of_a_large_file(tmp_path: Path) -> None:
    """A 2000-row archive file (the real writer, random payloads): a lookup reads a small fraction of it."""
    import hashlib
    import random
    import zlib

    from pipeline.types import Record
    from pipeline.writer import build_table, to_parquet_bytes

    rng = random.Random(0)
    records = []
    for i in range(2000):
        payload = rng.randbytes(400)
        records.append(Record(f"big/{i:05d}", "big", i, "s3://b/big.tar", "ab" * 32, status="ok", src_member=f"{i}.png",
                              src_bytes=1, src_sha256=hashlib.sha256(payload).digest(), width=64, height=48,
                              mode="RGB", bitstream=payload, bitstream_crc32=zlib.crc32(payload), bpp=1.0))
    data = to_parquet_bytes(build_table(records), row_group_size=256)
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "big.parquet").write_bytes(data)
    row, stats = lookup(ArchiveLocation(str(tmp_path)), "big/01234", ["key", "src_index", "bitstream"],
                        require_complete=False)
    assert row["src_index"] == 1234 and row["bitstream"] == records[1234].bitstream
    assert stats.row_groups == 8 and stats.row_groups_read == 1
    assert stats.file_bytes == len(data) > 800_000
    assert stats.bytes_read < 0.25 * stats.file_bytes  # the speculative footer read + one row group


def test_lookup_statistics_prune_to_the_row_group_of_the_key(local_archive: LocalArchive) -> None:
    archive = ArchiveLocation(str(local_archive.archive))
    rows = local_archive.rows("shard-000000")
    for row in rows:
        found, stats = lookup(archive, row["key"], ["key", "status"])
        assert found == {"key": row["key"], "status": row["status"]}
        assert stats.row_groups_read == 1 and stats.row_groups == -(-len(rows) // 2)
    with pytest.raises(KeyNotFoundError, match="is not in"):
        lookup(archive, "shard-000000/zzz-not-there")


@pytest.mark.parametrize(("key", "reason"), [
    ("shard-000000/no-such-sample", "no_such_key"),
    ("shard-000009/photo000", "no_such_key"),
    ("shard-000000/truncated_jpeg", "not_archived"),
])
def test_get_failures_exit_1_with_the_reason(tmp_path: Path, local_archive: LocalArchive, key: str, reason: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_get(local_archive.archive, key, tmp_path / "x.png")) == 1
    assert f"{key}: {reason}:" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_get_reports_damage_and_incomplete_shards(tmp_path: Path, local_archive: LocalArchive,
                                                  other_model_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(local_archive.archive, copy)
    damaged = LocalArchive(local_archive.root, local_archive.specs, local_archive.pattern, copy, local_archive.model)
    damage_archive(damaged, other_model_dir, {"shard-000000/photo000": "crc_mismatch",
                                              "shard-000000/photo002": "foreign_model"})
    for key, reason in (("shard-000000/photo000", "crc_mismatch"), ("shard-000000/photo002", "foreign_model")):
        with pytest.raises(GetError) as info:
            run_get(GetJob(archive=str(copy), key=key, output=str(tmp_path / "d.png"), executor="local"))
        assert info.value.reason == reason
    (copy / "_manifest" / "done" / "shard-000001.json").unlink()
    with pytest.raises(GetError, match="incomplete_shard: .*not complete"):
        run_get(GetJob(archive=str(copy), key="shard-000001/photo003", output=str(tmp_path / "d.png")))


@pytest.mark.ray
def test_get_on_ray_decodes_in_a_ray_task(tmp_path: Path, ray_address, local_archive: LocalArchive,
                                          codec) -> None:
    key = "shard-000000/photo002"
    result = run_get(GetJob(archive=str(local_archive.archive), key=key, output=str(tmp_path / "r.png"),
                            executor="ray", device="cpu"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png")),
                          codec.decode([local_archive.ok_rows()[key]["bitstream"]])[0])
    assert result.lookup.row_groups_read == 1
