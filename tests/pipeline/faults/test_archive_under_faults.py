"""Nothing lost under real faults: archive and restore through a flaky object store.

Real-photo WebDataset shards live in moto; the jobs (Ray actors, the tiny codec with random
weights) reach them only through :class:`FlakyS3Proxy`, which fails 5% of all requests at random
(503 SlowDown, 500, connection resets, cut-off bodies, slow answers) and, to be sure the critical
writes are hit, the first Parquet and done-marker writes of each job. Then:

* ``rdeic verify`` (once straight against moto, once through another flaky proxy) finds no key
  lost, none duplicated, none unexpected, and every source hash matching;
* the restore output holds every archived key exactly once, each PNG equal to decoding its
  archived bitstream (read straight from moto, independently of the restore code).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from jobs.commands.archive import ArchiveJob, run_archive
from jobs.commands.restore import RestoreJob, run_restore
from jobs.commands.verify import verify_archive
from tests.pipeline.conftest import TEST_MAX_PIXELS, build_shard_specs
from tests.pipeline.faults.flaky_proxy import RANDOM_KINDS

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]
BUCKET = "flaky"
RATE = 0.05
SEED = 5  # 5 random faults in the first 60 requests, 11 in the first 120 (one RNG draw per request)


def test_archive_and_restore_through_a_flaky_store_lose_nothing(
        s3_server, ray_address, flaky_s3, small_photo_paths, tiny_model_dir, tmp_path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from rdeic_core import RDEICCodec

    specs = build_shard_specs(small_photo_paths, n_shards=8, photos_per_shard=2)
    fs = s3_server.make_bucket(BUCKET)
    for spec in specs:
        fs.pipe(f"{BUCKET}/src/{spec.name}.tar", spec.tar_bytes())
    expected = {f"{s.name}/{k}": e for s in specs for k, e in s.expect.items()}
    sources = f"s3://{BUCKET}/src/shard-{{000000..000007}}.tar"
    proxy = flaky_s3(rate=RATE, seed=SEED)
    timings: dict[str, float] = {}

    # ---------------------------------------------------------------- archive (Ray, 2 actors)
    proxy.force(["reset", "slowdown"], method="PUT", path_contains="/out/archive/")  # Parquet writes
    proxy.force(["internal", "reset"], method="PUT", path_contains="/out/_manifest/done/")  # done markers
    proxy.force(["truncate"], method="GET", path_contains="/src/")  # a source shard's body cut off
    proxy.force(["slow"], op="LIST")
    t0 = time.perf_counter()
    outcome = run_archive(ArchiveJob(inputs=(sources,), output=f"s3://{BUCKET}/out", model=str(tiny_model_dir),
                                     executor="ray", num_actors=2, storage_options=proxy.storage_options,
                                     max_pixels=TEST_MAX_PIXELS, batch_size=4))
    timings["archive"] = time.perf_counter() - t0
    assert outcome.exit_code == 0, outcome.summary
    assert proxy.pending_forced() == 0, "every forced fault was served"
    summary = outcome.summary
    assert summary["shards"]["done_this_run"] == 8 and summary["shards"]["failed"] == 0
    assert summary["shards"]["damaged"] == 0 and summary["images"]["total"] == len(expected)
    after_archive = proxy.summary()

    # the archive as stored, read straight from moto: each key once, with the expected outcome
    rows = {}
    for spec in specs:
        table = pq.read_table(io.BytesIO(fs.cat(f"{BUCKET}/out/archive/{spec.name}.parquet")))
        for row in table.to_pylist():
            assert row["key"] not in rows, f"{row['key']} archived twice"
            rows[row["key"]] = row
    assert sorted(rows) == sorted(expected)
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == \
        {k: (e.status, e.reason) for k, e in expected.items()}

    # ---------------------------------------------------------------- verify
    t0 = time.perf_counter()
    report = verify_archive(f"s3://{BUCKET}/out", [sources], s3_server.storage_options)
    timings["verify"] = time.perf_counter() - t0
    assert report.clean, report.problems
    ok = sum(e.status == "ok" for e in expected.values())
    assert report.source_keys == report.archive_rows == len(expected) and report.ok == ok
    assert report.hashes_checked == report.hashes_matched == sum(r["src_sha256"] is not None for r in rows.values())
    assert report.hashes_checked >= ok and report.leftover_files == [] and report.shards_not_done == []
    verify_proxy = flaky_s3(rate=RATE, seed=1)
    report_json = tmp_path / "verify.json"
    assert main(["verify", f"s3://{BUCKET}/out", "--source", sources, "--storage-options",
                 json.dumps(verify_proxy.storage_options), "--json", str(report_json)]) == 0
    assert "CLEAN" in capsys.readouterr().out
    assert json.loads(report_json.read_text())["problem_counts"] == report.problem_counts
    assert verify_proxy.summary()["faults"] > 0

    # ---------------------------------------------------------------- restore (Ray, 2 actors)
    proxy.force(["truncate", "reset"], method="GET", path_contains="/out/archive/")  # archive reads
    proxy.force(["reset", "internal"], method="PUT", path_contains="/restored/shards/")  # restored tars
    proxy.force(["slowdown"], method="PUT", path_contains="/restored/keys/")
    proxy.force(["reset"], method="PUT", path_contains="/restored/_manifest/done/")
    t0 = time.perf_counter()
    restored = run_restore(RestoreJob(archive=f"s3://{BUCKET}/out", output=f"s3://{BUCKET}/restored",
                                      model=str(tiny_model_dir), executor="ray", num_actors=2,
                                      storage_options=proxy.storage_options, batch_size=1))
    timings["restore"] = time.perf_counter() - t0
    assert restored.exit_code == 0, restored.summary
    assert proxy.pending_forced() == 0
    assert restored.summary["failed_keys"] == [] and restored.summary["shards"]["failed"] == 0

    codec = RDEICCodec.from_pretrained(tiny_model_dir)
    ok_rows = {k: r for k, r in rows.items() if r["status"] == "ok"}
    seen: Counter[str] = Counter()
    for spec in specs:
        with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{BUCKET}/restored/shards/{spec.name}.tar")), mode="r:") as tf:
            members = tf.getmembers()
            mine = sorted((k for k in ok_rows if k.startswith(spec.name + "/")), key=lambda k: ok_rows[k]["src_index"])
            assert [m.name for m in members] == [k.split("/", 1)[1] + ".png" for k in mine]  # source order
            for m in members:
                key = f"{spec.name}/{m.name[:-4]}"
                seen[key] += 1
                image = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())))  # type: ignore[union-attr]
                assert np.array_equal(image, codec.decode([ok_rows[key]["bitstream"]])[0]), key
        keys = pq.read_table(io.BytesIO(fs.cat(f"{BUCKET}/restored/keys/{spec.name}.parquet"))).to_pylist()
        assert sorted(r["key"] for r in keys) == sorted(mine) and {r["status"] for r in keys} <= {"ok"}
    assert seen == Counter(list(ok_rows)), "every archived key restored exactly once"

    # ---------------------------------------------------------------- the faults really happened
    faults = proxy.faults
    by_kind = Counter(f.kind for f in faults)
    random_faults = [f for f in faults if not f.forced]
    print(f"\nflaky store: archive {after_archive}\n  archive+restore {proxy.summary()}\n"
          f"  verify through the proxy {verify_proxy.summary()}\n  seconds {timings}")
    assert all(by_kind[k] > 0 for k in RANDOM_KINDS), by_kind
    assert len(random_faults) >= 5, proxy.summary()
    hit = {(f.method, part) for f in faults for part in ("/archive/", "/_manifest/done/", "/shards/", "/src/")
           if part in f.path}
    assert {("PUT", "/archive/"), ("PUT", "/_manifest/done/"), ("GET", "/src/"), ("GET", "/archive/"),
            ("PUT", "/shards/")} <= hit
