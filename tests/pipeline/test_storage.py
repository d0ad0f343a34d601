"""fsspec helpers: atomic writes (local, S3, generic), fresh listings, option handling."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from pipeline import storage


class Boom(RuntimeError):
    pass


def test_local_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    fs, path = storage.filesystem(str(tmp_path / "d" / "f.bin"))
    storage.write_bytes_atomic(fs, path, b"first")
    assert Path(path).read_bytes() == b"first"
    with pytest.raises(Boom), storage.open_atomic(fs, path) as f:
        f.write(b"half of the second vers")
        raise Boom
    assert Path(path).read_bytes() == b"first"
    assert os.listdir(tmp_path / "d") == ["f.bin"]  # no temporary left behind


def test_generic_filesystem_uses_temporary_then_move() -> None:
    fs = fsspec.filesystem("memory")
    with pytest.raises(Boom), storage.open_atomic(fs, "/atomic/x.bin") as f:
        f.write(b"partial")
        raise Boom
    assert not fs.exists("/atomic/x.bin") and fs.find("/atomic") == []
    storage.write_bytes_atomic(fs, "/atomic/x.bin", b"whole")
    assert fs.cat_file("/atomic/x.bin") == b"whole" and fs.find("/atomic") == ["/atomic/x.bin"]


@pytest.mark.s3
def test_s3_object_appears_only_when_complete(s3_server) -> None:
    s3_server.make_bucket("atomic")
    fs, path = storage.filesystem("s3://atomic/out/big.bin", s3_server.storage_options)
    big = os.urandom(6 * 1024 * 1024)  # beyond s3fs's 5 MiB block: a multipart upload is under way
    with pytest.raises(Boom), storage.open_atomic(fs, path) as f:
        f.write(big)
        f.flush()
        raise Boom
    assert not storage.exists(fs, path)
    storage.write_bytes_atomic(fs, path, big)
    assert storage.read_bytes(fs, path) == big


@pytest.mark.s3
def test_listing_sees_writes_by_other_processes(s3_server) -> None:
    s3_server.make_bucket("listing")
    fs, root = storage.filesystem("s3://listing/done", s3_server.storage_options)
    assert storage.list_names(fs, root) == []
    other = s3_server.filesystem()  # stands for a Ray worker: another client, another cache
    other.pipe("listing/done/a.json", b"{}")
    assert storage.list_names(fs, root) == ["a.json"]
    other.pipe("listing/done/b.json", b"{}")
    assert storage.list_names(fs, root) == ["a.json", "b.json"]
    assert storage.exists(fs, "listing/done/b.json")


def test_local_paths_ignore_remote_options_and_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.filesystem("rel/x.tar", {"client_kwargs": {"endpoint_url": "http://nowhere"}})
    assert storage.is_local(fs) and path == str(tmp_path / "rel" / "x.tar")
    assert storage.normalize_url("file://" + str(tmp_path / "a")) == str(tmp_path / "a")
    assert storage.normalize_url("s3://b/k") == "s3://b/k"
    assert storage.join("s3://b/out/", "/archive/", "x.parquet") == "s3://b/out/archive/x.parquet"


def test_s3_clients_retry_in_botocore_unless_the_options_say_otherwise() -> None:
    options = {"client_kwargs": {"endpoint_url": "http://h:9000"}, "config_kwargs": {"connect_timeout": 3}}
    with_retries = storage.with_defaults("s3", options)
    assert with_retries["config_kwargs"] == {"connect_timeout": 3, "retries": storage.S3_RETRIES}
    assert options["config_kwargs"] == {"connect_timeout": 3}  # the caller's dict is untouched
    mine = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    assert storage.with_defaults("s3", mine) == mine
    assert storage.with_defaults("gs", {"token": "anon"}) == {"token": "anon"}


def test_redact_hides_secrets_but_keeps_structure() -> None:
    options = {"key": "AKIA123", "secret": "s3cr3t", "anon": False,
               "client_kwargs": {"endpoint_url": "http://h:9000", "aws_session_token": "tok"}}
    assert storage.redact(options) == {"key": "***", "secret": "***", "anon": False,
                                       "client_kwargs": {"endpoint_url": "http://h:9000", "aws_session_token": "***"}}
    assert options["secret"] == "s3cr3t"  # the original is untouched
