"""Streaming tar reader: WebDataset grouping, and damage recorded instead of losing the shard."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from pipeline.reader import ShardReader, StorageReadError, _GuardedStream, split_member_name
from tests.pipeline.conftest import member_data_offset, tar_of

SAMPLES = [(f"s{i}", {"jpg": bytes([i]) * (700 + i), "json": b"{}"}) for i in range(5)]


def _read(path: Path, **kwargs: object) -> tuple[list, ShardReader]:
    reader = ShardReader(str(path), **kwargs)  # type: ignore[arg-type]
    return list(reader), reader


def _write(tmp_path: Path, data: bytes, name: str = "shard.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "key", "ext"),
    [
        ("a.jpg", "a", "jpg"),
        ("dir/a.b.png", "dir/a", "b.png"),
        ("./x/y.JPG", "x/y", "JPG"),
        ("noext", "noext", ""),
        ("dir/.hidden", "dir/.hidden", ""),
    ],
)
def test_split_member_name_follows_webdataset(name: str, key: str, ext: str) -> None:
    assert split_member_name(name) == (key, ext)


def test_groups_members_into_samples_in_order(tmp_path: Path) -> None:
    samples, reader = _read(_write(tmp_path, tar_of(SAMPLES)))
    assert [s.key for s in samples] == [k for k, _ in SAMPLES]
    assert [s.index for s in samples] == list(range(5))
    assert [[m.ext for m in s.members] for s in samples] == [["jpg", "json"]] * 5
    assert samples[3].members[0].data == bytes([3]) * 703
    assert reader.damage is None
    assert reader.bytes_read == (tmp_path / "shard.tar").stat().st_size


def test_non_contiguous_key_yields_two_samples(tmp_path: Path) -> None:
    data = tar_of([("a", {"jpg": b"1"}), ("b", {"jpg": b"2"}), ("a", {"json": b"{}"})])
    samples, _ = _read(_write(tmp_path, data))
    assert [(s.key, s.index) for s in samples] == [("a", 0), ("b", 1), ("a", 2)]


def test_truncated_inside_a_member_keeps_earlier_samples_and_flags_the_cut_one(tmp_path: Path) -> None:
    full = tar_of(SAMPLES)
    offset, size = member_data_offset(full, "s2.jpg")
    samples, reader = _read(_write(tmp_path, full[: offset + size // 2]))
    assert [s.key for s in samples] == ["s0", "s1", "s2"]
    assert [s.damage for s in samples[:2]] == [None, None]
    assert samples[2].damage is not None and "s2.jpg" in samples[2].damage
    assert reader.damage is not None and reader.damage.offset == offset
    assert "cut off" in reader.damage.message


@pytest.mark.parametrize("cut", ["member_boundary", "inside_header"])
def test_truncated_between_members_is_damage_not_a_clean_end(tmp_path: Path, cut: str) -> None:
    full = tar_of(SAMPLES)
    offset, size = member_data_offset(full, "s1.json")
    end = offset + 512  # data of s1.json padded to one block; the next header starts here
    data = full[:end] if cut == "member_boundary" else full[: end + 100]
    samples, reader = _read(_write(tmp_path, data))
    assert [s.key for s in samples] == ["s0", "s1"]
    assert all(s.damage is None for s in samples)
    assert reader.damage is not None and reader.damage.offset == end
    expected = "without the end-of-archive marker" if cut == "member_boundary" else "truncated tar header"
    assert expected in reader.damage.message


def test_garbage_header_mid_stream(tmp_path: Path) -> None:
    full = bytearray(tar_of(SAMPLES))
    offset, _ = member_data_offset(bytes(full), "s3.jpg")
    full[offset - 512: offset] = b"\xff" * 512  # the header of s3.jpg
    samples, reader = _read(_write(tmp_path, bytes(full)))
    assert [s.key for s in samples] == ["s0", "s1", "s2"]
    assert reader.damage is not None and "invalid tar header" in reader.damage.message


@pytest.mark.parametrize("data", [b"", b"definitely not a tar archive" * 40])
def test_unreadable_shard_is_damage_with_no_samples(tmp_path: Path, data: bytes) -> None:
    samples, reader = _read(_write(tmp_path, data))
    assert samples == []
    assert reader.damage is not None and reader.damage.offset == 0
    assert "not a readable tar archive" in reader.damage.message


def test_gzip_tars_and_truncated_gzip(tmp_path: Path) -> None:
    packed = gzip.compress(tar_of(SAMPLES))
    samples, reader = _read(_write(tmp_path, packed, "s.tar.gz"))
    assert len(samples) == 5 and reader.damage is None
    samples, reader = _read(_write(tmp_path, packed[: len(packed) * 2 // 3], "t.tar.gz"))
    assert 0 < len(samples) < 5
    assert reader.damage is not None


def test_oversized_and_non_file_members_are_not_read(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("big.jpg", b"x" * 5000), ("small.jpg", b"y" * 10)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "small.jpg"
        tf.addfile(link)
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
    samples, reader = _read(_write(tmp_path, buf.getvalue()), max_member_bytes=1000)
    members = {s.key: s.members[0] for s in samples}
    assert set(members) == {"big", "small", "link"}  # the directory is not a sample
    assert (members["big"].data, members["big"].problem, members["big"].size) == (None, "member_too_large", 5000)
    assert members["small"].data == b"y" * 10 and members["small"].problem is None
    assert members["link"].problem == "unsupported_member"
    assert reader.damage is None


def test_missing_shard_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(ShardReader(str(tmp_path / "nope.tar")))


class _FlakyFile(io.BytesIO):
    """A storage file object whose connection drops after ``limit`` bytes (not a tar problem)."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__(data)
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        if self.tell() >= self.limit:
            raise ConnectionResetError("connection reset by peer")
        return super().read(min(size, self.limit - self.tell()) if size >= 0 else self.limit - self.tell())


def test_storage_errors_are_not_mistaken_for_damage() -> None:
    data = tar_of(SAMPLES)
    reader = ShardReader("mem://flaky.tar")
    stream = _GuardedStream(_FlakyFile(data, 3000), "mem://flaky.tar")
    with pytest.raises(StorageReadError, match="connection reset"):
        list(reader._samples(stream))
    assert reader.damage is None


@pytest.mark.s3
def test_streams_from_s3(s3_server) -> None:
    fs = s3_server.make_bucket("reader-s3")
    full = tar_of(SAMPLES)
    fs.pipe("reader-s3/whole.tar", full)
    offset, size = member_data_offset(full, "s4.jpg")
    fs.pipe("reader-s3/cut.tar", full[: offset + 10])
    samples, reader = _read("s3://reader-s3/whole.tar", storage_options=s3_server.storage_options)  # type: ignore[arg-type]
    assert [s.key for s in samples] == [f"s{i}" for i in range(5)] and reader.damage is None
    samples, reader = _read("s3://reader-s3/cut.tar", storage_options=s3_server.storage_options)  # type: ignore[arg-type]
    assert [s.key for s in samples] == [f"s{i}" for i in range(5)]
    assert samples[-1].damage is not None and reader.damage is not None
    with pytest.raises(FileNotFoundError):
        list(ShardReader("s3://reader-s3/missing.tar", s3_server.storage_options))
