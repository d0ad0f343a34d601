"""archive -> restore (and audit) round trip on a real S3 endpoint (moto over HTTP) with a real local Ray.

Every archived key must come back: restored PNGs equal ``codec.decode`` of the archived bitstream,
in source order, under the same keys; damaged rows (payload CRC, stream CRC, foreign model) are
listed per key with their reason by restore and by audit, and a rerun does nothing.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.commands.archive import ArchiveJob, run_archive
from jobs.commands.audit import AuditJob, run_audit
from jobs.commands.restore import RestoreJob, run_restore
from pipeline.progress import NullProgress
from tests.pipeline.conftest import TEST_MAX_PIXELS, build_shard_specs
from tests.pipeline.restore.conftest import flip_byte

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]
BUCKET = "restore-rt"
DAMAGE = {"shard-000000/photo001": "crc_mismatch", "shard-000001/photo004": "corrupt_bitstream",
          "shard-000001/photo005": "foreign_model"}


class Recorder(NullProgress):
    def __init__(self) -> None:
        self.workers: set[str] = set()

    def shard_done(self, stats) -> None:
        self.workers.add(stats.worker)
        super().shard_done(stats)


def _damage_on_s3(fs: Any, prefix: str, other_codec: Any, sources: dict[str, np.ndarray]) -> None:
    """Rewrite the archive files on S3 with the rows of DAMAGE damaged (schema and metadata kept)."""
    for shard_id in sorted({k.split("/", 1)[0] for k in DAMAGE}):
        path = f"{prefix}/archive/{shard_id}.parquet"
        table = pq.read_table(io.BytesIO(fs.cat(path)))
        rows = table.to_pylist()
        for row in rows:
            kind = DAMAGE.get(row["key"])
            if kind == "crc_mismatch":
                row["bitstream"] = flip_byte(row["bitstream"], len(row["bitstream"]) // 2)
            elif kind == "corrupt_bitstream":
                row["bitstream"] = flip_byte(row["bitstream"], len(row["bitstream"]) // 2)
                row["bitstream_crc32"] = zlib.crc32(row["bitstream"])
            elif kind == "foreign_model":
                row["bitstream"] = other_codec.encode([sources[row["key"]]])[0]
                row["bitstream_crc32"] = zlib.crc32(row["bitstream"])
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), sink, row_group_size=4)
        fs.pipe(path, sink.getvalue())


def test_ray_round_trip_on_s3_restores_every_key_and_lists_damaged_ones(
        s3_server, ray_address, small_photo_paths, codec_model_dir, other_model_dir, codec) -> None:
    from rdeic_core import RDEICCodec

    specs = build_shard_specs(small_photo_paths, n_shards=2, photos_per_shard=3)
    fs = s3_server.make_bucket(BUCKET)
    for spec in specs:
        fs.pipe(f"{BUCKET}/src/{spec.name}.tar", spec.tar_bytes())
    opts = s3_server.storage_options
    archived = run_archive(ArchiveJob(inputs=(f"s3://{BUCKET}/src/*.tar",), output=f"s3://{BUCKET}/archive",
                                      model=str(codec_model_dir), executor="local", storage_options=opts,
                                      max_pixels=TEST_MAX_PIXELS))
    assert archived.exit_code == 0
    sources = {f"{s.name}/{k}": np.asarray(Image.open(io.BytesIO(next(v for e, v in dict(s.samples)[k].items()
                                                                       if e in ("png", "jpg")))).convert("RGB"))
               for s in specs for k in s.expect if k.startswith("photo")}
    _damage_on_s3(fs, f"{BUCKET}/archive", RDEICCodec.from_pretrained(other_model_dir), sources)

    recorder = Recorder()
    job = RestoreJob(archive=f"s3://{BUCKET}/archive", output=f"s3://{BUCKET}/restored", executor="ray",
                     num_actors=2, storage_options=opts, batch_size=1)
    outcome = run_restore(job, progress=recorder)
    summary = outcome.summary
    assert outcome.exit_code == 0, summary
    assert summary["shards"]["done_this_run"] == 2 and summary["shards"]["failed"] == 0
    assert sorted(summary["failed_keys"]) == sorted(DAMAGE)
    assert summary["images"]["failed_by_reason"] == {"corrupt_bitstream": 1, "crc_mismatch": 1, "foreign_model": 1}
    assert all(w.startswith("rdeic-restore-") for w in recorder.workers) and len(recorder.workers) >= 1

    # the archive as stored (after the damage), read independently of the restore code
    rows = {r["key"]: r for s in specs
            for r in pq.read_table(io.BytesIO(fs.cat(f"{BUCKET}/archive/archive/{s.name}.parquet"))).to_pylist()}
    ok_keys = sorted(k for k, r in rows.items() if r["status"] == "ok")
    assert summary["images"]["total"] == len(ok_keys)
    assert summary["images"]["not_archived"] == sum(1 for r in rows.values() if r["status"] != "ok")

    records = {}
    for spec in specs:
        table = pq.read_table(io.BytesIO(fs.cat(f"{BUCKET}/restored/keys/{spec.name}.parquet")))
        records.update({r["key"]: r for r in table.to_pylist()})
    assert sorted(records) == ok_keys  # every archived key accounted for exactly once
    for key, kind in DAMAGE.items():
        assert (records[key]["status"], records[key]["reason"], records[key]["output"]) == ("failed", kind, None)
        assert records[key]["error"]

    restored = 0
    for spec in specs:
        with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{BUCKET}/restored/shards/{spec.name}.tar")), mode="r:") as tf:
            members = tf.getmembers()
            names = [m.name for m in members]
            expected = [k.split("/", 1)[1] + ".png" for k in sorted(
                (k for k in ok_keys if k.startswith(spec.name + "/") and k not in DAMAGE),
                key=lambda k: rows[k]["src_index"])]
            assert names == expected  # same keys, in source order, failed ones absent
            for m in members:
                key = f"{spec.name}/{m.name[:-4]}"
                image = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())))  # type: ignore[union-attr]
                want = codec.decode([rows[key]["bitstream"]])[0]
                assert image.shape == want.shape == (rows[key]["height"], rows[key]["width"], 3)
                assert np.array_equal(image, want), key
                restored += 1
    assert restored == len(ok_keys) - len(DAMAGE) == summary["images"]["ok"]

    markers = sorted(fs.ls(f"{BUCKET}/restored/_manifest/done", refresh=True))
    assert len(markers) == 2
    marker = json.loads(fs.cat(markers[0]))
    assert marker["extra"]["format"] == "wds" and marker["worker"].startswith("rdeic-restore-")

    again = run_restore(job)
    assert again.exit_code == 0
    assert again.summary["shards"]["done_before"] == 2 and again.summary["shards"]["done_this_run"] == 0
    assert sorted(again.summary["failed_keys"]) == sorted(DAMAGE)

    # the audit of the same damaged archive, on Ray, reading the sources back from S3
    audit = run_audit(AuditJob(archive=f"s3://{BUCKET}/archive", sources=(f"s3://{BUCKET}/src/*.tar",),
                               output=f"s3://{BUCKET}/audit", executor="ray", num_actors=2, storage_options=opts,
                               perceptual=(), fraction=1.0))
    assert audit.exit_code == 0
    failures = {k: r for k, r in zip(audit.summary["failed_keys"], audit.summary["failures"])}
    assert {k: f["reason"] for k, f in failures.items()} == DAMAGE
    assert audit.summary["images"]["audited"] == len(ok_keys) and audit.summary["images"]["ok"] == restored
    assert fs.exists(f"{BUCKET}/audit/report.html") and fs.exists(f"{BUCKET}/audit/plots/hist_psnr.png")
    assert json.loads(fs.cat(f"{BUCKET}/audit/summary.json"))["images"] == audit.summary["images"]

