"""End to end on a real S3 endpoint (moto over HTTP) with a real local Ray, plus fault injection:
an actor killed mid-shard, the driver killed mid-job and rerun, a shard truncated in storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.commands.archive import ArchiveJob, run_archive
from pipeline.progress import NullProgress
from pipeline.writer import ARCHIVE_SCHEMA
from tests.pipeline.conftest import TEST_MAX_PIXELS, Expect, build_shard_specs, member_data_offset

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "e2e"
PATTERN = f"s3://{BUCKET}/shards/shard-{{000000..000003}}.tar"


@pytest.fixture(scope="module")
def e2e_shards(s3_server, small_photo_paths) -> dict[str, Expect]:
    """Three shards of 6 real photos + every hostile sample, and a 4th shard truncated in storage
    in the middle of its 3rd photo. Returns the expected outcome of every archive key."""
    specs = build_shard_specs(small_photo_paths, n_shards=3, photos_per_shard=6)
    cut = build_shard_specs(small_photo_paths[18:], n_shards=1, photos_per_shard=4, with_hostile=False)[0]
    cut.name = "shard-000003"
    fs = s3_server.make_bucket(BUCKET)
    for spec in specs:
        fs.pipe(f"{BUCKET}/shards/{spec.name}.tar", spec.tar_bytes())
    full = cut.tar_bytes()
    third = cut.samples[2][0]
    offset, size = member_data_offset(full, f"{third}.png")
    fs.pipe(f"{BUCKET}/shards/{cut.name}.tar", full[: offset + size // 2])
    expected = {f"{s.name}/{k}": e for s in specs for k, e in s.expect.items()}
    for key, _ in cut.samples[:2]:
        expected[f"{cut.name}/{key}"] = cut.expect[key]
    expected[f"{cut.name}/{third}"] = Expect("failed", "shard_damaged")
    return expected


def _read_archive(s3_server, prefix: str) -> pa.Table:
    fs = s3_server.filesystem()
    return ds.dataset(f"{BUCKET}/{prefix}/archive", format="parquet", filesystem=fs).to_table()


def _check_rows(table: pa.Table, expected: dict[str, Expect]) -> None:
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key appears more than once"
    assert set(keys) == set(expected)
    for row in table.select(["key", "status", "reason", "mode", "width", "height", "exif_orientation"]).to_pylist():
        want = expected[row["key"]]
        assert (row["status"], row["reason"]) == (want.status, want.reason), row
        if want.status == "ok":
            assert row["mode"] == want.mode and (row["width"], row["height"]) == want.size, row
            assert row["exif_orientation"] == want.exif_orientation, row


class KillOneActorMidShard(NullProgress):
    """Progress sink that kills the worker actor of the first shard seen half-way through."""

    def __init__(self) -> None:
        self.killed: tuple[str, str] | None = None
        self.done: set[str] = set()

    def shard_progress(self, shard_id: str, images: int, worker: str) -> None:
        import ray

        if self.killed is None and images > 0 and shard_id not in self.done:
            ray.kill(ray.get_actor(worker), no_restart=False)  # Ray restarts it; the shard must be redone
            self.killed = (shard_id, worker)

    def shard_done(self, stats) -> None:
        self.done.add(stats.shard_id)
        super().shard_done(stats)


def test_ray_archive_on_s3_survives_an_actor_killed_mid_shard(s3_server, ray_address, e2e_shards, tiny_model_dir,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pipeline.executors.ray")
    job = ArchiveJob(inputs=(PATTERN,), output=f"s3://{BUCKET}/out-kill", model=str(tiny_model_dir),
                     executor="ray", num_actors=2, storage_options=s3_server.storage_options,
                     max_pixels=TEST_MAX_PIXELS, batch_size=1)
    sink = KillOneActorMidShard()
    outcome = run_archive(job, progress=sink)
    assert outcome.exit_code == 0, outcome.summary
    assert sink.killed is not None
    assert "starting 2 GPU actor(s)" in caplog.text and "gpus [0]" in caplog.text  # one fake GPU each
    summary = outcome.summary
    assert summary["shards"]["done_this_run"] == 4 and summary["shards"]["failed"] == 0
    assert summary["shards"]["retried"] >= 1
    assert [d["shard_id"] for d in summary["damaged_shards"]] == ["shard-000003"]

    table = _read_archive(s3_server, "out-kill")
    _check_rows(table, e2e_shards)

    fs = s3_server.filesystem()
    markers = {p.rsplit("/", 1)[-1][:-5]: json.loads(fs.cat(p)) for p in fs.ls(f"{BUCKET}/out-kill/_manifest/done")}
    assert sorted(markers) == [f"shard-{i:06d}" for i in range(4)]
    killed_shard = sink.killed[0]
    assert markers[killed_shard]["attempt"] == 2
    assert markers["shard-000003"]["damage"]["message"].startswith("member ")
    assert all(m["codec_fingerprint"] == json.loads((tiny_model_dir / "config.json").read_text())["fingerprint"]
               for m in markers.values())


def test_archive_reads_back_with_pyarrow_and_duckdb_with_documented_schema(s3_server, ray_address, e2e_shards,
                                                                             tiny_model_dir) -> None:
    """Reads what the previous test wrote (or writes it if run alone)."""
    import duckdb

    fs = s3_server.filesystem()
    if not fs.exists(f"{BUCKET}/out-kill/_manifest/done/shard-000003.json"):
        job = ArchiveJob(inputs=(PATTERN,), output=f"s3://{BUCKET}/out-kill", model=str(tiny_model_dir),
                         executor="ray", num_actors=2, storage_options=s3_server.storage_options,
                         max_pixels=TEST_MAX_PIXELS)
        assert run_archive(job).exit_code == 0
    model_meta = json.loads((tiny_model_dir / "config.json").read_text())
    for path in fs.ls(f"{BUCKET}/out-kill/archive"):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            assert pf.schema_arrow.remove_metadata().equals(ARCHIVE_SCHEMA.remove_metadata())
            meta = {k.decode(): v.decode() for k, v in pf.metadata.metadata.items() if k.startswith(b"rdeic.")}
        assert meta["rdeic.format"] == "rdeic-archive" and meta["rdeic.format_version"] == "1"
        assert meta["rdeic.codec.fingerprint"] == model_meta["fingerprint"]
        assert meta["rdeic.codec.entropy_table_digest"] == model_meta["entropy_table_digest"]
        assert meta["rdeic.codec.name"] == "tiny"
        assert set(json.loads(meta["rdeic.model.hashes"])) == {"config.json", "model.safetensors"}
        assert {"python", "torch", "pyarrow", "ray"} <= set(json.loads(meta["rdeic.versions"]))
        job = json.loads(meta["rdeic.job"])
        assert job["inputs"] == [PATTERN] and job["executor"] == "ray"
        assert json.loads(meta["rdeic.shard"])["shard_id"] == path.rsplit("/", 1)[-1][: -len(".parquet")]

    con = duckdb.connect()
    con.register_filesystem(fs)
    rows = con.execute(
        f"SELECT status, coalesce(reason, ''), count(*) FROM read_parquet('s3://{BUCKET}/out-kill/archive/*.parquet') "
        "GROUP BY ALL ORDER BY ALL").fetchall()
    want: dict[tuple[str, str], int] = {}
    for e in e2e_shards.values():
        want[(e.status, e.reason or "")] = want.get((e.status, e.reason or ""), 0) + 1
    assert {(s, r): n for s, r, n in rows} == want
    key, size, crc = con.execute(
        "SELECT key, octet_length(bitstream), bitstream_crc32 "
        f"FROM read_parquet('s3://{BUCKET}/out-kill/archive/*.parquet') WHERE key = 'shard-000001/photo007'"
    ).fetchone()
    assert key == "shard-000001/photo007" and size > 0 and crc > 0
    df = _read_archive(s3_server, "out-kill").to_pandas()
    assert df.loc[df.status == "ok", "bitstream"].map(len).min() > 0 and df["key"].is_unique


def _cli(ray_address: str, model: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "--log-level", "WARNING", "archive", "--input", PATTERN,
            "--output", out, "--model", str(model), "--executor", "ray", "--num-actors", "1",
            "--ray-address", ray_address, "--max-pixels", str(TEST_MAX_PIXELS), "--batch-size", "1",
            "--no-progress"]


def _wait_for_actors_gone(prefix: str, timeout: float = 60) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        if not any(n.startswith(prefix) for n in names):
            return
        time.sleep(0.5)
    raise AssertionError(f"actors of the killed driver still alive after {timeout}s")


def test_driver_killed_mid_job_then_rerun_does_only_the_missing_shards(s3_server, ray_address, e2e_shards,
                                                                         tiny_model_dir) -> None:
    """The CLI in a subprocess, S3 endpoint from AWS_ENDPOINT_URL only, joined to the test's Ray."""
    fs = s3_server.filesystem()
    out = f"s3://{BUCKET}/out-resume"
    done_dir = f"{BUCKET}/out-resume/_manifest/done"
    env = os.environ | {"AWS_ENDPOINT_URL": s3_server.endpoint, "RAY_AUTH_MODE": "disabled",
                        "PYTHONPATH": str(REPO_ROOT)}
    driver = subprocess.Popen(_cli(ray_address, tiny_model_dir, out), cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if fs.exists(done_dir) and fs.ls(done_dir, refresh=True):
            break
        time.sleep(0.2)
    assert driver.poll() is None, f"driver ended before it could be killed:\n{driver.communicate()[0]}"
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    _wait_for_actors_gone("rdeic-archive-")

    before = {p: fs.cat(p) for p in fs.ls(done_dir, refresh=True)}
    etags = {p: fs.info(p, refresh=True)["ETag"] for p in fs.ls(f"{BUCKET}/out-resume/archive", refresh=True)}
    assert 1 <= len(before) < 4

    rerun = subprocess.run(_cli(ray_address, tiny_model_dir, out), cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"({4 - len(before)} this run, {len(before)} before)" in rerun.stdout
    for path, data in before.items():
        assert fs.cat(path) == data, f"{path} was redone"
        parquet = path.replace("_manifest/done", "archive").replace(".json", ".parquet")
        assert fs.info(parquet, refresh=True)["ETag"] == etags[parquet]
    assert len(fs.ls(done_dir, refresh=True)) == 4
    _check_rows(_read_archive(s3_server, "out-resume"), e2e_shards)

    again = subprocess.run(_cli(ray_address, tiny_model_dir, out), cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "(0 this run, 4 before)" in again.stdout, again.stdout + again.stderr


def test_actor_shape_follows_the_cluster(ray_address) -> None:
    import ray

    from pipeline.executors.ray import RayExecutor

    assert RayExecutor()._actor_shape(ray, True, 10) == (2, 1.0)  # one actor per (fake) GPU
    assert RayExecutor()._actor_shape(ray, False, 10) == (8, 1.0)  # 8 CPUs / 1 per CPU actor (single-threaded codec)
    assert RayExecutor(cpu_actor_cpus=4.0)._actor_shape(ray, False, 10) == (2, 4.0)
    assert RayExecutor(num_actors=5)._actor_shape(ray, True, 3) == (3, 1.0)  # never more than shards
    with pytest.raises(ValueError, match="num_actors must be >= 1"):
        RayExecutor(num_actors=0)._actor_shape(ray, True, 3)


def test_cpu_actors_when_gpus_are_not_used(tmp_path: Path, ray_address, shard_specs, tiny_model_dir,
                                           caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.executors.ray import RayExecutor

    spec = shard_specs[0]
    (tmp_path / f"{spec.name}.tar").write_bytes(spec.tar_bytes())
    job = ArchiveJob(inputs=(str(tmp_path / f"{spec.name}.tar"),), output=str(tmp_path / "out"),
                     model=str(tiny_model_dir), executor="ray", max_pixels=TEST_MAX_PIXELS)
    caplog.set_level("INFO", logger="pipeline.executors.ray")
    outcome = run_archive(job, executor=RayExecutor(use_gpus=False, cpu_actor_cpus=1.0))
    assert outcome.exit_code == 0 and outcome.summary["images"]["total"] == len(spec.expect)
    assert "starting 1 CPU actor(s)" in caplog.text and "gpus []" in caplog.text


def test_a_worker_that_cannot_start_fails_the_run_before_any_shard(tmp_path: Path, ray_address, shard_specs,
                                                                    tiny_model_dir) -> None:
    import torch

    from pipeline.executors.base import ExecutorStartError
    from pipeline.executors.ray import RayExecutor

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    spec = shard_specs[0]
    (tmp_path / f"{spec.name}.tar").write_bytes(spec.tar_bytes())
    job = ArchiveJob(inputs=(str(tmp_path / f"{spec.name}.tar"),), output=str(tmp_path / "out"),
                     model=str(tiny_model_dir), executor="ray")
    with pytest.raises(ExecutorStartError, match="CUDA is not available"):
        run_archive(job, executor=RayExecutor(num_actors=1, device="cuda", max_actor_restarts=0))
    assert not (tmp_path / "out" / "_manifest" / "done").exists()
