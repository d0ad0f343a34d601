"""``rdeic archive --retry-failed``: transient row failures redone, permanent ones left alone.

First the classification (``pipeline.failures``): every failure reason and every kind of shard
error, one test per class. Then real runs (local executor, the tiny codec with random weights,
real-photo shards plus every hostile sample, in moto): an encoder that runs out of memory on
chosen images (a host ``MemoryError`` and a device ``OutOfMemoryError``) and refuses another one
for good (``ValueError``); ``--retry-failed`` then archives exactly the out-of-memory rows, leaves
every other row byte for byte as it was, rewrites only the affected shards' files and markers, and
``rdeic verify`` finds every key exactly once with its source hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.commands.archive import ArchiveJob, run_archive
from jobs.commands.verify import verify_archive
from pipeline import images as images_mod
from pipeline.executors.errors import FatalShardError, is_retryable
from pipeline.executors.local import LocalExecutor
from pipeline.failures import (
    PERMANENT,
    TRANSIENT,
    failure_class,
    may_have_transient,
    shard_error_class,
)
from pipeline.images import SampleFailure, decode_image
from pipeline.lease import LeaseLostError
from pipeline.reader import StorageReadError
from pipeline.types import REASONS
from tests.pipeline.conftest import TEST_MAX_PIXELS, ShardSpec, build_shard_specs

BUCKET = "retry-failed"


# ------------------------------------------------------------------------------------ classes
@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_row_failure_reason_has_a_class(reason: str) -> None:
    expected = TRANSIENT if reason == "out_of_memory" else PERMANENT
    assert failure_class(reason, "whatever the message") == expected
    assert may_have_transient({reason: 1}) == (reason in ("out_of_memory", "encode_error"))


@pytest.mark.parametrize(("error", "expected"), [
    ("MemoryError: cannot allocate 2 GiB", TRANSIENT),  # written as encode_error before out_of_memory existed
    ("OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB", TRANSIENT),
    ("ValueError: image values outside 0..255", PERMANENT),  # the codec refused the image: it will again
    (None, PERMANENT),
])
def test_an_encode_error_is_transient_only_when_it_was_out_of_memory(error: str | None, expected: str) -> None:
    assert failure_class("encode_error", error) == expected


def test_an_unknown_reason_is_never_retried() -> None:
    assert failure_class("some_future_reason", "MemoryError: x") == PERMANENT
    assert failure_class(None) == PERMANENT


@pytest.mark.parametrize(("exc", "expected", "retryable"), [
    (StorageReadError("reset after 3 reopens"), TRANSIENT, True),  # read errors
    (TimeoutError("read timed out"), TRANSIENT, True),  # timeouts
    (ConnectionError("connection reset"), TRANSIENT, True),
    (RuntimeError("CUDA error: device lost"), TRANSIENT, True),  # the device, not one image
    (FileNotFoundError("no such shard"), PERMANENT, False),
    (PermissionError("access denied"), PERMANENT, False),
    (FatalShardError("another model"), TRANSIENT, False),  # stops the run instead
    (LeaseLostError("another job owns the prefix now"), TRANSIENT, False),
])
def test_shard_errors_are_retried_unless_permanent_or_fatal(exc: BaseException, expected: str,
                                                            retryable: bool) -> None:
    assert shard_error_class(exc) == expected and is_retryable(exc) == retryable


def test_out_of_memory_while_decoding_an_image_is_transient(small_photo_paths, monkeypatch) -> None:
    data = small_photo_paths[0].read_bytes()

    def no_room(img):
        raise MemoryError("cannot allocate the RGB buffer")

    monkeypatch.setattr(images_mod, "to_rgb_uint8", no_room)
    with pytest.raises(SampleFailure) as info:
        decode_image(data)
    assert info.value.reason == "out_of_memory" and failure_class(info.value.reason, info.value.message) == TRANSIENT


# ------------------------------------------------------------------------------------ real runs
class OutOfMemoryError(RuntimeError):
    """Named like ``torch.cuda.OutOfMemoryError`` (the pipeline recognises it by name)."""


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


class _RefusingEncoder:
    """The real tiny codec, except that chosen images (by pixel digest) raise a chosen error."""

    def __init__(self, inner: Any, errors: dict[str, Callable[[], Exception]]) -> None:
        self.inner, self.errors = inner, errors
        self.fingerprint, self.device = inner.fingerprint, inner.device

    def encode(self, images):
        for im in images:
            make = self.errors.get(_digest(im))
            if make is not None:
                raise make()
        return self.inner.encode(images)


class _Factory:
    def __init__(self, inner: Any, errors: dict[str, Callable[[], Exception]]) -> None:
        self.inner, self.errors = inner, errors

    def load(self, device: str = "auto") -> _RefusingEncoder:
        return _RefusingEncoder(self.inner.load(device), self.errors)


class _InjectingExecutor:
    """The local executor whose workers load the refusing encoder."""

    def __init__(self, errors: dict[str, Callable[[], Exception]]) -> None:
        self.errors = errors

    def run(self, plan, progress):
        plan.factory = _Factory(plan.factory, self.errors)
        return LocalExecutor(device="cpu").run(plan, progress)


def _pixels_digest(spec: ShardSpec, key: str) -> str:
    members = dict(spec.samples)[key]
    data = next(v for ext, v in members.items() if ext in ("png", "jpg"))
    return _digest(decode_image(data, TEST_MAX_PIXELS).pixels)


def _rows(fs: Any, prefix: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(fs.ls(f"{prefix}/archive", refresh=True)):
        for row in pq.read_table(io.BytesIO(fs.cat(path))).to_pylist():
            assert row["key"] not in rows, f"{row['key']} twice"
            rows[row["key"]] = row
    return rows


def _etags(fs: Any, prefix: str) -> dict[str, str]:
    paths = [*fs.ls(f"{prefix}/archive", refresh=True), *fs.ls(f"{prefix}/_manifest/done", refresh=True)]
    return {p: fs.info(p, refresh=True)["ETag"] for p in paths}


@pytest.fixture(scope="module")
def specs(small_photo_paths) -> list[ShardSpec]:
    return build_shard_specs(small_photo_paths, n_shards=3, photos_per_shard=2)


@pytest.mark.s3
def test_retry_failed_redoes_only_transient_rows_and_keeps_every_key_once(
        s3_server, specs, tiny_model_dir, capsys: pytest.CaptureFixture[str]) -> None:
    fs = s3_server.make_bucket(BUCKET)
    for spec in specs:
        fs.pipe(f"{BUCKET}/src/{spec.name}.tar", spec.tar_bytes())
    sources, out_url, prefix = f"s3://{BUCKET}/src/shard-{{000000..000002}}.tar", f"s3://{BUCKET}/out", f"{BUCKET}/out"
    s0, s1 = specs[0], specs[1]
    assert {"photo001", "cmyk_jpeg"} <= set(s0.expect) and {"photo002", "png16"} <= set(s1.expect)
    oom = {_pixels_digest(s0, "photo001"): lambda: MemoryError("no room for photo001"),
           _pixels_digest(s0, "cmyk_jpeg"): lambda: OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
           _pixels_digest(s1, "photo002"): lambda: MemoryError("no room for photo002")}
    refused = {_pixels_digest(s1, "png16"): lambda: ValueError("the codec refuses this one for good")}
    transient_keys = {f"{s0.name}/photo001", f"{s0.name}/cmyk_jpeg", f"{s1.name}/photo002"}
    job = ArchiveJob(inputs=(sources,), output=out_url, model=str(tiny_model_dir), executor="local",
                     storage_options=s3_server.storage_options, max_pixels=TEST_MAX_PIXELS, batch_size=4)

    # 1. the first run: three rows out of memory, one refused by the codec
    first = run_archive(job, executor=_InjectingExecutor(oom | refused))
    assert first.exit_code == 0 and first.summary["images"]["failed_by_reason"]["out_of_memory"] == 3
    before = _rows(fs, prefix)
    assert {k for k, r in before.items() if r["reason"] == "out_of_memory"} == transient_keys
    assert before[f"{s1.name}/png16"]["reason"] == "encode_error"
    etags = _etags(fs, prefix)

    # 2. --retry-failed while one image still does not fit: 2 of 3 now ok, the third stays out_of_memory
    still = {_pixels_digest(s1, "photo002"): oom[_pixels_digest(s1, "photo002")]}
    retry = run_archive(dataclasses.replace(job, retry_failed=True), executor=_InjectingExecutor(still))
    assert retry.exit_code == 0
    r = retry.summary["retry_failed"]
    assert (r["shards"], r["shards_retried"], r["rows"], r["now_ok"], r["still_failed"]) == (2, 2, 3, 2, 1)
    assert r["still_failed_by_reason"] == {"out_of_memory": 1} and r["kept"] == 0
    assert retry.summary["shards"]["done_this_run"] == 0 and retry.summary["shards"]["done_before"] == 3
    assert retry.summary["images"]["failed_by_reason"]["out_of_memory"] == 1

    # 3. --retry-failed from the command line, nothing injected: the last one is archived
    capsys.readouterr()
    argv = ["archive", "--input", sources, "--output", out_url, "--model", str(tiny_model_dir), "--executor", "local",
            "--storage-options", json.dumps(s3_server.storage_options), "--max-pixels", str(TEST_MAX_PIXELS),
            "--batch-size", "4", "--no-progress", "--retry-failed"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "retry-failed: 1 transiently failed row(s) retried in 1 shard(s): 1 now ok, 0 still failed" in text

    after = _rows(fs, prefix)
    assert sorted(after) == sorted(before), "same keys, each once"
    for key, row in after.items():
        if key in transient_keys:
            assert row["status"] == "ok" and row["reason"] is None and row["bitstream"]
            assert row["src_sha256"] == before[key]["src_sha256"] and row["src_member"] == before[key]["src_member"]
        else:
            assert row == before[key], f"{key} changed"  # ok rows, permanent failures, the refused one
    assert after[f"{s1.name}/png16"]["reason"] == "encode_error"
    now = _etags(fs, prefix)
    untouched = [p for p in etags if specs[2].name in p]
    assert untouched and all(now[p] == etags[p] for p in untouched), "a shard without transient rows is not rewritten"
    for spec in (s0, s1):
        marker = json.loads(fs.cat(f"{prefix}/_manifest/done/{spec.name}.json"))
        data = fs.cat(f"{prefix}/archive/{spec.name}.parquet")
        assert marker["parquet_sha256"] == hashlib.sha256(data).hexdigest() and marker["parquet_bytes"] == len(data)
        rows = [v for k, v in after.items() if k.startswith(f"{spec.name}/")]
        assert marker["ok"] == sum(v["status"] == "ok" for v in rows) and marker["rows"] == len(rows)
        assert "out_of_memory" not in marker["failed_by_reason"] and marker["extra"]["retry"]["now_ok"] >= 1
        meta = pq.read_metadata(io.BytesIO(data)).metadata
        assert b"rdeic.retry" in meta
        assert meta[b"rdeic.codec.fingerprint"].decode() == before[f"{spec.name}/photo000" if spec is s0 else
                                                                    f"{spec.name}/photo002"]["codec_fingerprint"]

    report = verify_archive(out_url, sources, s3_server.storage_options)
    assert report.clean, report.problems
    assert report.count("missing") == report.count("duplicate") == 0 and report.hashes_matched == report.hashes_checked

    # 4. nothing transient left: a further --retry-failed rewrites nothing
    assert main(argv) == 0
    assert "retry-failed: 0 transiently failed row(s) retried in 0 shard(s)" in capsys.readouterr().out
    assert _etags(fs, prefix) == now


def test_a_row_whose_source_changed_is_kept_as_it_was(tmp_path: Path, specs, tiny_model_dir,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    spec = specs[0]
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / f"{spec.name}.tar"
    src.write_bytes(spec.tar_bytes())
    out = tmp_path / "out"
    job = ArchiveJob(inputs=(str(src),), output=str(out), model=str(tiny_model_dir), executor="local",
                     max_pixels=TEST_MAX_PIXELS, batch_size=4)
    oom = {_pixels_digest(spec, "photo000"): lambda: MemoryError("no room")}
    assert run_archive(job, executor=_InjectingExecutor(oom)).exit_code == 0
    before = pq.read_table(out / "archive" / f"{spec.name}.parquet").to_pylist()

    # the source sample is replaced by other bytes under the same key: the failed row stays as it was
    samples = [(k, dict(m)) for k, m in spec.samples]
    samples[0][1]["png"] = dict(specs[1].samples)["photo002"]["png"]
    src.write_bytes(ShardSpec(spec.name, samples, spec.expect).tar_bytes())
    capsys.readouterr()
    assert main(["archive", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir),
                 "--executor", "local", "--max-pixels", str(TEST_MAX_PIXELS), "--no-progress", "--retry-failed"]) == 0
    assert "1 kept as they were (source gone or changed)" in capsys.readouterr().out
    assert pq.read_table(out / "archive" / f"{spec.name}.parquet").to_pylist() == before
    marker = json.loads((out / "_manifest" / "done" / f"{spec.name}.json").read_text())
    assert marker["extra"]["retry"]["kept_keys"] == [f"{spec.name}/photo000"]
    assert marker["failed_by_reason"]["out_of_memory"] == 1
