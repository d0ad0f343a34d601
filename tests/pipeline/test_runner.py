"""``process_shard`` with the real tiny codec: accounting, damage, encode failures, retries."""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.executors.base import ShardPlan
from pipeline.executors.errors import FatalShardError
from pipeline.executors.local import LocalExecutor
from pipeline.images import decode_image
from pipeline.manifest import OutputLocation
from pipeline.progress import NullProgress
from pipeline.runner import ShardConfig, process_shard
from pipeline.types import ShardRef
from rdeic_core.bitstream import peek_header
from tests.pipeline.conftest import TEST_MAX_PIXELS, ShardSpec, member_data_offset, tar_of


def _shard(tmp_path: Path, spec: ShardSpec) -> ShardRef:
    path = tmp_path / "in" / f"{spec.name}.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(spec.tar_bytes())
    return ShardRef(spec.name, str(path))


def _config(encoder, **kw: object) -> ShardConfig:
    options = {"batch_size": 3, "max_pixels": TEST_MAX_PIXELS, "expected_fingerprint": encoder.fingerprint.hex()}
    return ShardConfig(**(options | kw))  # type: ignore[arg-type]


def _rows(out: OutputLocation, shard_id: str) -> dict[str, dict]:
    table = pq.read_table(out.archive_path(shard_id))
    return {r["key"]: r for r in table.to_pylist()}


def test_every_sample_is_accounted_for_exactly_once(tmp_path: Path, shard_specs: list[ShardSpec], tiny_encoder) -> None:
    out = OutputLocation(str(tmp_path / "out"))
    seen = []
    for spec in shard_specs:
        shard = _shard(tmp_path, spec)
        stats = process_shard(shard, tiny_encoder, out, _config(tiny_encoder), progress=seen.append)
        rows = _rows(out, spec.name)
        assert set(rows) == {f"{spec.name}/{k}" for k in spec.expect}
        assert stats.rows == len(spec.samples) and stats.ok + stats.failed == stats.rows
        assert stats.damage is None and seen[-1] == stats.rows
        members = dict(spec.samples)
        for key, expect in spec.expect.items():
            row = rows[f"{spec.name}/{key}"]
            assert (row["status"], row["reason"]) == (expect.status, expect.reason), key
            assert row["shard"] == spec.name and row["src_url"] == shard.url
            assert row["codec_fingerprint"] == tiny_encoder.fingerprint.hex()
            image_member = next((e for e in members[key] if e in ("jpg", "png")), None)
            if image_member is not None:
                data = members[key][image_member]
                assert row["src_member"] == f"{key}.{image_member}" and row["src_bytes"] == len(data)
                assert row["src_sha256"] == hashlib.sha256(data).digest()
            if expect.status == "failed":
                assert row["bitstream"] is None and row["error"]
                continue
            assert (row["width"], row["height"]) == expect.size and row["mode"] == expect.mode
            assert row["exif_orientation"] == expect.exif_orientation
            header = peek_header(row["bitstream"])
            assert (header.width, header.height) == expect.size
            assert row["bitstream_crc32"] == zlib.crc32(row["bitstream"])
            assert row["bpp"] == pytest.approx(8 * len(row["bitstream"]) / (header.width * header.height), rel=1e-6)
        marker = json.loads((tmp_path / "out" / "_manifest" / "done" / f"{spec.name}.json").read_text())
        assert marker["rows"] == stats.rows and marker["codec_fingerprint"] == tiny_encoder.fingerprint.hex()
        parquet = Path(out.archive_path(spec.name)).read_bytes()
        assert marker["parquet_sha256"] == hashlib.sha256(parquet).hexdigest()


def test_archived_bytes_equal_a_direct_encode_of_the_upright_image(tmp_path: Path, shard_specs, tiny_encoder) -> None:
    spec = next(s for s in shard_specs if "exif_rotated" in s.expect)
    out = OutputLocation(str(tmp_path / "out"))
    process_shard(_shard(tmp_path, spec), tiny_encoder, out, _config(tiny_encoder))
    rows = _rows(out, spec.name)
    for key in ("exif_rotated", next(k for k in spec.expect if k.startswith("photo"))):
        data = next(v for e, v in dict(spec.samples)[key].items() if e in ("jpg", "png"))
        direct = tiny_encoder.encode([decode_image(data).pixels])[0]
        assert rows[f"{spec.name}/{key}"]["bitstream"] == direct, key


def test_duplicate_keys_and_a_cut_shard(tmp_path: Path, small_photo_paths, tiny_encoder) -> None:
    png = [p.read_bytes() for p in small_photo_paths[:4]]
    samples = [("a", {"png": png[0]}), ("b", {"png": png[1]}), ("a", {"png": png[2]}), ("c", {"png": png[3]}),
               ("d", {"png": png[0]})]
    full = tar_of(samples)
    offset, size = member_data_offset(full, "c.png")
    path = tmp_path / "cut.tar"
    path.write_bytes(full[: offset + size // 3])
    out = OutputLocation(str(tmp_path / "out"))
    stats = process_shard(ShardRef("cut", str(path)), tiny_encoder, out, _config(tiny_encoder))
    rows = _rows(out, "cut")
    assert {k: (r["status"], r["reason"], r["src_index"]) for k, r in rows.items()} == {
        "cut/a": ("ok", None, 0),
        "cut/b": ("ok", None, 1),
        "cut/a#2": ("failed", "duplicate_key", 2),
        "cut/c": ("failed", "shard_damaged", 3),
    }
    assert stats.damage is not None and stats.damage["offset"] == offset
    assert stats.failed_by_reason == {"duplicate_key": 1, "shard_damaged": 1}
    assert sorted(stats.failed_keys) == ["cut/a#2", "cut/c"]


class _PickyEncoder:
    """The real codec behind a fault injector: images matching ``refuse`` raise ``error``."""

    def __init__(self, inner, refuse, error: Exception, times: int | None = None) -> None:
        self.inner, self.refuse, self.error, self.times = inner, refuse, error, times
        self.fingerprint, self.device = inner.fingerprint, inner.device
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        if any(self.refuse(im) for im in images) and (self.times is None or self.calls <= self.times):
            raise self.error
        return self.inner.encode(images)


def test_per_image_encode_errors_fail_only_that_image(tmp_path: Path, shard_specs, tiny_encoder) -> None:
    spec = next(s for s in shard_specs if "one_pixel" in s.expect)
    encoder = _PickyEncoder(tiny_encoder, lambda im: im.shape[:2] == (1, 1), MemoryError("no room for 1x1"))
    out = OutputLocation(str(tmp_path / "out"))
    stats = process_shard(_shard(tmp_path, spec), encoder, out, _config(tiny_encoder, batch_size=8))
    rows = _rows(out, spec.name)
    one = rows[f"{spec.name}/one_pixel"]
    assert (one["status"], one["reason"]) == ("failed", "out_of_memory") and "no room" in one["error"]
    others_ok = [k for k, e in spec.expect.items() if e.status == "ok" and k != "one_pixel"]
    assert all(rows[f"{spec.name}/{k}"]["status"] == "ok" for k in others_ok)
    assert stats.failed_by_reason.get("out_of_memory") == 1


def test_systemic_encode_errors_fail_the_shard_and_leave_nothing(tmp_path: Path, shard_specs, tiny_encoder) -> None:
    spec = shard_specs[0]
    encoder = _PickyEncoder(tiny_encoder, lambda im: True, RuntimeError("CUDA error: device lost"))
    out = OutputLocation(str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="device lost"):
        process_shard(_shard(tmp_path, spec), encoder, out, _config(tiny_encoder))
    assert not (tmp_path / "out" / "archive").exists() and not (tmp_path / "out" / "_manifest").exists()


def test_wrong_model_is_fatal(tmp_path: Path, shard_specs, tiny_encoder) -> None:
    config = ShardConfig(expected_fingerprint="00" * 32)
    with pytest.raises(FatalShardError, match="expects 0000"):
        process_shard(_shard(tmp_path, shard_specs[0]), tiny_encoder, OutputLocation(str(tmp_path / "o")), config)


class _Factory:
    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def load(self, device: str = "auto"):
        return self.encoder


def test_local_executor_retries_a_flaky_shard_and_gives_up_on_a_broken_one(tmp_path: Path, shard_specs,
                                                                          tiny_encoder) -> None:
    out = OutputLocation(str(tmp_path / "out"))
    # fails the batch and its one-by-one fallback (2 calls): attempt 1 fails, attempt 2 succeeds
    flaky = _PickyEncoder(tiny_encoder, lambda im: True, ConnectionError("link flapped"), times=2)
    plan = ShardPlan([_shard(tmp_path, shard_specs[0])], _Factory(flaky), out, _config(tiny_encoder), process_shard,
                       max_shard_retries=2)
    result = LocalExecutor(device="cpu").run(plan, NullProgress())
    assert [s.attempt for s in result.done] == [2] and result.failed == []

    broken = _PickyEncoder(tiny_encoder, lambda im: True, RuntimeError("always broken"))
    shards = [_shard(tmp_path, shard_specs[1]), ShardRef("missing", str(tmp_path / "missing.tar"))]
    plan = ShardPlan(shards, _Factory(broken), out, _config(tiny_encoder), process_shard, max_shard_retries=2)
    result = LocalExecutor(device="cpu").run(plan, NullProgress())
    assert result.done == []
    assert {(f.shard_id, f.attempts) for f in result.failed} == {(shard_specs[1].name, 3), ("missing", 1)}
    failed_marker = json.loads((tmp_path / "out" / "_manifest" / "failed" / "missing.json").read_text())
    assert "FileNotFoundError" in failed_marker["error"]
    assert not (tmp_path / "out" / "_manifest" / "done" / f"{shard_specs[1].name}.json").exists()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        ShardConfig(batch_size=0)
    with pytest.raises(ValueError, match="row_group_size"):
        ShardConfig(row_group_size=-5)
