"""The flaky proxy itself, and our storage helpers under a heavy fault rate (every kind, every
operation: GET, HEAD, PUT, multipart create/part/complete, list, DELETE)."""

from __future__ import annotations

import hashlib

import pytest
import s3fs

from pipeline import storage
from tests.pipeline.faults.flaky_proxy import RANDOM_KINDS, FlakyS3Proxy, classify

pytestmark = [pytest.mark.s3]
BUCKET = "flaky-store"


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    s3_server.make_bucket(BUCKET)
    return BUCKET


def _fs(proxy: FlakyS3Proxy) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **proxy.storage_options)


def test_requests_are_classified_by_operation() -> None:
    assert classify("GET", "/b", "list-type=2&prefix=x") == "LIST"
    assert classify("GET", "/b/k/x.tar", "") == "GET"
    assert classify("PUT", "/b/k", "partNumber=2&uploadId=u") == "PART"
    assert classify("POST", "/b/k", "uploads") == "MPU_CREATE"
    assert classify("POST", "/b/k", "uploadId=u") == "MPU_COMPLETE"
    assert classify("DELETE", "/b/k", "uploadId=u") == "MPU_ABORT"
    assert classify("POST", "/b", "delete") == "DELETE_MANY"


def test_without_faults_the_proxy_is_transparent(flaky_s3, bucket: str) -> None:
    proxy = flaky_s3(rate=0.0)
    fs = _fs(proxy)
    payload = bytes(range(256)) * 100
    fs.pipe(f"{bucket}/plain/a.bin", payload)
    with fs.open(f"{bucket}/plain/big.bin", "wb", block_size=5 * 2**20) as f:  # multipart: 3 parts
        for i in range(3):
            f.write(bytes([i]) * (5 * 2**20))
    assert fs.cat(f"{bucket}/plain/a.bin") == payload and fs.info(f"{bucket}/plain/a.bin")["size"] == len(payload)
    assert fs.cat_file(f"{bucket}/plain/a.bin", start=10, end=20) == payload[10:20]
    assert fs.cat(f"{bucket}/plain/big.bin")[5 * 2**20 * 2] == 2
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/plain")) == ["a.bin", "big.bin"]
    fs.rm_file(f"{bucket}/plain/a.bin")
    assert not fs.exists(f"{bucket}/plain/a.bin")
    requests = proxy.requests
    assert proxy.faults == [] and requests["PART"] == 3 and requests["MPU_COMPLETE"] == 1
    assert {"GET", "HEAD", "PUT", "LIST", "DELETE", "MPU_CREATE"} <= set(requests)


@pytest.mark.slow
def test_storage_helpers_survive_a_30_percent_fault_rate(flaky_s3, s3_server, bucket: str) -> None:
    """Atomic writes (one PUT and multipart), verified reads, listings and deletes: every kind of
    fault on every kind of request, and the store ends up exactly as written."""
    proxy = flaky_s3(rate=0.3, seed=3, slow_seconds=(0.05, 0.2))
    for kind, op in [("reset", "PART"), ("slowdown", "PART"), ("internal", "MPU_CREATE"), ("reset", "MPU_COMPLETE"),
                     ("slowdown", "MPU_COMPLETE"), ("reset", "DELETE"), ("slowdown", "LIST"), ("truncate", "GET"),
                     ("reset", "HEAD"), ("reset", "PUT")]:
        proxy.force(kind, op=op)
    # 5 MiB write blocks: the 6 MiB object is a multipart upload
    options = {**proxy.storage_options, "default_block_size": 5 * 2**20}
    fs, root = storage.filesystem(f"s3://{bucket}/heavy", options)
    blobs = {f"small-{i}.json": (b'{"n": %d}' % i) * (50 + i) for i in range(9)}
    blobs["large.bin"] = hashlib.sha256(b"seed").digest() * (6 * 2**20 // 32)
    for name, data in blobs.items():
        storage.write_bytes_atomic(fs, storage.join(root, name), data)
    for name, data in blobs.items():
        assert storage.read_bytes(fs, storage.join(root, name)) == data, name
    assert storage.list_names(fs, root) == sorted(blobs)
    for name in list(blobs)[:5]:
        storage.remove_if_exists(fs, storage.join(root, name))
        assert not storage.exists(fs, storage.join(root, name))
    assert proxy.pending_forced() == 0

    direct = s3_server.filesystem()  # the truth, without the proxy
    assert sorted(p.rsplit("/", 1)[1] for p in direct.ls(f"{bucket}/heavy")) == sorted(list(blobs)[5:])
    for name in list(blobs)[5:]:
        assert direct.cat(f"{bucket}/heavy/{name}") == blobs[name]
    summary = proxy.summary()
    print(f"\nflaky store at 30%: {summary}")
    assert all(summary["faults_by_kind"].get(k, 0) > 0 for k in RANDOM_KINDS), summary
    ops = {"GET", "HEAD", "PUT", "PART", "MPU_CREATE", "MPU_COMPLETE", "LIST", "DELETE"}
    assert ops <= set(summary["faults_by_op"])
    assert summary["faults"] - summary["forced"] > 0
