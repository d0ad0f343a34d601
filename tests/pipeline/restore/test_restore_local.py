"""``rdeic restore`` with the local executor: folder output, resume, refused settings, batched decoding
with size bucketing, damaged streams and unsafe keys."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from jobs.codec import RDEICDecoderFactory
from pipeline.archives import ArchiveLocation
from pipeline.decoder import SizeBuckets
from pipeline.manifest import OutputLocation
from pipeline.restore import RestoreConfig, restore_shard
from rdeic_core.bitstream import peek_header
from tests.pipeline.conftest import Expect, build_shard_specs, encode_image
from tests.pipeline.restore.conftest import LocalArchive, damage_archive, write_archive


def _argv(archive: Path, out: Path, *extra: str) -> list[str]:
    return ["--log-level", "WARNING", "restore", "--archive", str(archive), "--output", str(out), "--executor",
            "local", "--no-progress", *extra]


def test_folder_restore_resumes_and_refuses_other_settings(tmp_path: Path, local_archive: LocalArchive,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "folder"
    assert main(_argv(local_archive.archive, out, "--format", "folder")) == 0
    text = capsys.readouterr().out
    ok = local_archive.ok_rows()
    assert f"{len(ok)} archived keys ({len(ok)} restored, 0 failed to decode" in text
    files = sorted(str(p.relative_to(out / "images"))[:-4] for p in (out / "images").rglob("*.png"))
    assert files == sorted(ok)  # <shard>/<sample key>.png for every archived key
    for key in ("shard-000000/photo000", "shard-000001/one_pixel", "shard-000000/exif_rotated"):
        image = np.asarray(Image.open(out / "images" / f"{key}.png"))
        assert image.shape == (ok[key]["height"], ok[key]["width"], 3)
    records = {r["key"]: r for s in local_archive.specs
               for r in pq.read_table(out / "keys" / f"{s.name}.parquet").to_pylist()}
    assert sorted(records) == sorted(ok) and {r["status"] for r in records.values()} == {"ok"}
    assert records["shard-000000/photo000"]["output"] == "shard-000000/photo000.png"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    assert main(_argv(local_archive.archive, out, "--format", "folder")) == 0
    assert "(0 this run, 2 before)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before

    assert main(_argv(local_archive.archive, out, "--format", "folder", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "written with other settings" in err and "steps: None -> 1" in err
    assert main(_argv(local_archive.archive, out, "--format", "wds")) == 2
    assert "format: 'folder' -> 'wds'" in capsys.readouterr().err


def test_not_an_archive_and_wrong_model_exit_2(tmp_path: Path, local_archive: LocalArchive, other_model_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(tmp_path / "nothing", tmp_path / "o1")) == 2
    assert "is not an archive: it has no run.json" in capsys.readouterr().err
    assert main(_argv(local_archive.archive, tmp_path / "o2", "--model", str(other_model_dir))) == 2
    err = capsys.readouterr().err
    assert "pass the --model that wrote it" in err and str(other_model_dir) in err
    assert not (tmp_path / "o2").exists()


class SpyDecoder:
    """The real decoder, recording the streams of every decode call."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, []
        self.fingerprint, self.device = inner.fingerprint, inner.device

    def inspect(self, *a: Any, **kw: Any) -> Any:
        return self.inner.inspect(*a, **kw)

    def decode(self, streams: list[bytes], *a: Any, **kw: Any) -> list[np.ndarray]:
        images = self.inner.decode(streams, *a, **kw)
        self.calls.append((list(streams), images))
        return images


def test_batched_decoding_groups_by_padded_size_and_equals_codec_decode_of_each_batch(
        tmp_path: Path, local_archive: LocalArchive, codec) -> None:
    spy = SpyDecoder(RDEICDecoderFactory(str(local_archive.model)).load("cpu"))
    out = OutputLocation(str(tmp_path / "batched"))
    shard = ArchiveLocation(str(local_archive.archive)).complete_shards()[0]
    stats = restore_shard(shard, spy, out, RestoreConfig(batch_size=8))
    rows = {r["key"]: r for r in local_archive.rows(shard.shard_id) if r["status"] == "ok"}
    assert stats.ok == len(rows) and stats.failed == 0
    assert sum(len(s) for s, _ in spy.calls) == len(rows)  # each stream decoded exactly once
    shapes = [{peek_header(b).z_shape for b in streams} for streams, _ in spy.calls]
    assert all(len(s) == 1 for s in shapes)  # one padded size per batch
    assert len({next(iter(s)) for s in shapes}) >= 2 and max(len(s) for s, _ in spy.calls) >= 2
    by_stream = {r["bitstream"]: k for k, r in rows.items()}
    with tarfile.open(out.path("shards", f"{shard.shard_id}.tar")) as tf:
        restored = {f"{shard.shard_id}/{m.name[:-4]}": np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())))
                    for m in tf.getmembers()}
        assert [m.name for m in tf.getmembers()] == [k.split("/", 1)[1] + ".png" for k in
                                                    sorted(rows, key=lambda k: rows[k]["src_index"])]
    for streams, _ in spy.calls:
        expected = codec.decode(streams)  # independently, the same batch
        for stream, want in zip(streams, expected):
            assert np.array_equal(restored[by_stream[stream]], want)
            # batch composition moves a few pixels by one level at most (codec batch variance)
            single = codec.decode([stream])[0]
            assert int(np.abs(single.astype(int) - want.astype(int)).max()) <= 1


def test_size_buckets_bound_batches_and_pending_pixels() -> None:
    b: SizeBuckets[str] = SizeBuckets(batch_size=2, max_pending_pixels=100)
    assert b.add("A", "a1", 10) == []
    assert b.add("B", "b1", 10) == []
    assert b.add("A", "a2", 10) == [["a1", "a2"]]  # full bucket
    assert b.add("C", "c1", 95) == [["c1"]]  # over the pixel budget: the heaviest bucket goes
    assert b.flush() == [["b1"]] and len(b) == 0
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SizeBuckets(0)


def test_damaged_streams_and_unsafe_keys_are_recorded_not_skipped(
        tmp_path: Path, small_photo_paths: list[Path], codec_model_dir: Path, other_model_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    specs = build_shard_specs(small_photo_paths[6:], n_shards=1, photos_per_shard=4, with_hostile=False)
    photo = Image.open(small_photo_paths[6]).convert("RGB")
    specs[0].add("../escape", {"png": encode_image(photo, "PNG")}, Expect("ok"))
    specs[0].add("nested/dir/img", {"png": encode_image(photo, "PNG")}, Expect("ok"))
    archive = write_archive(tmp_path / "a", specs, codec_model_dir)
    damage = {"shard-000000/photo000": "crc_mismatch", "shard-000000/photo001": "corrupt_bitstream",
              "shard-000000/photo002": "foreign_model"}
    damage_archive(archive, other_model_dir, damage)
    for fmt in ("wds", "folder"):
        out = tmp_path / fmt
        assert main(_argv(archive.archive, out, "--format", fmt)) == 0
        text = capsys.readouterr().out
        assert "corrupt_bitstream=1, crc_mismatch=1, foreign_model=1, unsafe_key=1" in text
        records = {r["key"]: r for r in pq.read_table(out / "keys" / "shard-000000.parquet").to_pylist()}
        assert {k: r["reason"] for k, r in records.items() if r["status"] != "ok"} == {
            **damage, "shard-000000/../escape": "unsafe_key"}
        assert "0x" in records["shard-000000/photo000"]["error"]  # both CRCs named
        assert "this codec is" in records["shard-000000/photo002"]["error"]
        assert records["shard-000000/nested/dir/img"]["status"] == "ok"
    assert (tmp_path / "folder" / "images" / "shard-000000" / "nested" / "dir" / "img.png").is_file()
    assert not any(p.name == "escape.png" for p in tmp_path.rglob("*.png"))
    with tarfile.open(tmp_path / "wds" / "shards" / "shard-000000.tar") as tf:
        assert sorted(tf.getnames()) == ["nested/dir/img.png", "photo003.png"]
    shutil.rmtree(tmp_path / "a")
