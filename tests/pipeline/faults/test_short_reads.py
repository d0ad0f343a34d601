"""Short reads are transient read errors, never damage.

A read that ends before the object does (a GET answered with fewer bytes than the object holds, a
HEAD reporting 0 or half the size) must be retried and the shard archived whole; only bytes the
store confirms are the whole object may be recorded as damage. The faults come from the flaky
proxy in front of moto; everything else is the real reader, the real archive job and ``verify``.
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from jobs.commands.archive import ArchiveJob, run_archive
from jobs.commands.verify import verify_archive
from pipeline import storage
from pipeline.reader import ShardReader, StorageReadError
from tests.pipeline.conftest import TEST_MAX_PIXELS, build_shard_specs, member_data_offset

pytestmark = [pytest.mark.s3]
BUCKET = "short-reads"


@pytest.fixture(scope="module")
def shard(s3_server, small_photo_paths) -> tuple[str, bytes, list[str]]:
    """One shard of 4 real photos (+ side members) stored in moto: (bucket path, tar bytes, sample keys)."""
    spec = build_shard_specs(small_photo_paths, n_shards=1, photos_per_shard=4, with_hostile=False)[0]
    fs = s3_server.make_bucket(BUCKET)
    data = spec.tar_bytes()
    fs.pipe(f"{BUCKET}/src/{spec.name}.tar", data)
    return f"{BUCKET}/src/{spec.name}.tar", data, [k for k, _ in spec.samples]


def _members(samples: list) -> dict[str, bytes]:
    return {m.name: m.data for s in samples for m in s.members}


def _members_of(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]


def _read(url: str, options: dict) -> tuple[list, ShardReader]:
    reader = ShardReader(url, options)
    return list(reader), reader


@pytest.mark.parametrize("faults", [
    {"HEAD": ["head_zero"]},  # the store says the object is empty
    {"HEAD": ["head_short"]},  # ... or half its size: the stream would end inside a member
    {"GET": ["empty", "empty"]},  # GETs answered with no bytes (consistently framed)
    {"HEAD": ["head_zero"], "GET": ["empty", "short", "empty"]},
], ids=["head-zero", "head-half", "empty-gets", "all"])
def test_a_short_read_is_retried_not_recorded_as_damage(flaky_s3, shard, faults: dict) -> None:
    path, data, keys = shard
    proxy = flaky_s3(rate=0.0)
    for method, kinds in faults.items():
        proxy.force(kinds, method=method, path_contains="/src/")
    samples, reader = _read(f"s3://{path}", proxy.storage_options)
    assert proxy.pending_forced() == 0, "every forced fault was served"
    assert reader.damage is None
    assert [s.key for s in samples] == keys and all(s.damage is None for s in samples)
    assert _members(samples) == _members_of(data)  # every member, byte for byte
    assert reader.read_recoveries >= 1


def test_without_the_size_check_the_same_fault_looks_like_damage(flaky_s3, shard,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: a stream that trusts the first HEAD records the shard as damaged with no samples."""
    import pipeline.reader as reader_module

    path, _, _ = shard
    proxy = flaky_s3(rate=0.0)
    proxy.force("head_zero", method="HEAD", path_contains="/src/")
    monkeypatch.setattr(reader_module.storage, "is_local", lambda fs: True)  # no recovery source
    samples, reader = _read(f"s3://{path}", proxy.storage_options)
    assert samples == [] and reader.damage is not None and "not a readable tar" in reader.damage.message


def test_a_really_truncated_object_is_still_damage(flaky_s3, s3_server, shard) -> None:
    path, data, keys = shard
    offset, size = member_data_offset(data, f"{keys[2]}.png")
    cut = f"{BUCKET}/src/cut.tar"
    s3_server.filesystem().pipe(cut, data[: offset + size // 2])
    proxy = flaky_s3(rate=0.0)
    samples, reader = _read(f"s3://{cut}", proxy.storage_options)
    assert [s.key for s in samples] == keys[:3] and samples[2].damage is not None
    assert reader.damage is not None and reader.read_recoveries == 0
    assert reader.bytes_read == offset + size // 2


def test_library_retries_first_then_ours_resume_at_the_failed_offset(flaky_s3, shard) -> None:
    """Six cut-off bodies in a row outlast s3fs's five reads of a body; the stream then reopens the
    object at the byte where it stopped and the shard still reads whole."""
    path, data, keys = shard
    proxy = flaky_s3(rate=0.0)
    proxy.force(["truncate"] * 6, method="GET", path_contains="/src/")
    samples, reader = _read(f"s3://{path}", proxy.storage_options)
    assert proxy.counts["truncate"] == 6
    assert [s.key for s in samples] == keys and reader.damage is None
    assert _members(samples) == _members_of(data) and reader.read_recoveries == 1


def test_a_read_that_stays_short_fails_the_attempt_as_a_storage_error(flaky_s3, shard, fast_backoff) -> None:
    path, _, _ = shard
    proxy = flaky_s3(rate=0.0)
    proxy.force(["empty"] * 20, method="GET", path_contains="/src/")
    reader = ShardReader(f"s3://{path}", proxy.storage_options)
    with pytest.raises(StorageReadError, match="reopen"):
        list(reader)
    assert reader.damage is None  # a storage error, not damage: the executor retries the shard


def test_read_bytes_checks_the_length_against_the_store(flaky_s3, s3_server, fast_backoff) -> None:
    s3_server.filesystem().pipe(f"{BUCKET}/small.json", b'{"a": 1, "padding": "' + b"x" * 300 + b'"}')
    proxy = flaky_s3(rate=0.0)
    fs, p = storage.filesystem(f"s3://{BUCKET}/small.json", proxy.storage_options)
    proxy.force(["short", "empty"], method="GET", path_contains="small.json")
    proxy.force(["head_zero"], method="HEAD", path_contains="small.json")
    assert json.loads(storage.read_bytes(fs, p))["a"] == 1
    assert proxy.pending_forced() == 0
    proxy.force(["short"] * 10, method="GET", path_contains="small.json")
    with pytest.raises(storage.ShortReadError, match="retries"):
        storage.read_bytes(fs, p)


@pytest.mark.slow
def test_archive_of_a_shard_read_short_is_whole_and_verifies(flaky_s3, s3_server, shard, tiny_model_dir,
                                                            tmp_path) -> None:
    """The job end to end: the shard's HEAD says 0 bytes once and its first GETs come back short."""
    path, _, keys = shard
    proxy = flaky_s3(rate=0.0)
    proxy.force("head_zero", method="HEAD", path_contains="/src/")
    proxy.force(["empty", "short"], method="GET", path_contains="/src/")
    out = f"s3://{BUCKET}/archive-short"
    job = ArchiveJob(inputs=(f"s3://{path}",), output=out, model=str(tiny_model_dir), executor="local",
                     storage_options=proxy.storage_options, max_pixels=TEST_MAX_PIXELS, batch_size=4)
    outcome = run_archive(job)
    assert outcome.exit_code == 0, outcome.summary
    assert proxy.pending_forced() == 0 and proxy.counts == {"head_zero": 1, "empty": 1, "short": 1}
    assert outcome.summary["shards"]["damaged"] == 0 and outcome.summary["images"]["ok"] == len(keys)
    shard_name = path.rsplit("/", 1)[1][:-4]
    marker = json.loads(s3_server.filesystem().cat(f"{BUCKET}/archive-short/_manifest/done/{shard_name}.json"))
    assert marker["damage"] is None and marker["extra"]["read_recoveries"] >= 1
    report = verify_archive(out, [f"s3://{path}"], s3_server.storage_options)
    assert report.clean, report.problems
    assert report.source_keys == report.archive_rows == report.ok == report.hashes_matched == len(keys)
