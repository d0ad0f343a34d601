"""Input patterns -> shard lists: braces, globs (local and S3), list files, stable ids, collisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.shards import expand_braces, expand_inputs, make_refs, shard_id_from_url
from pipeline.types import ShardRef


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("s3://b/{000..003}.tar", [f"s3://b/{i:03d}.tar" for i in range(4)]),
        ("x/{8..11}.tar", ["x/8.tar", "x/9.tar", "x/10.tar", "x/11.tar"]),
        ("{0..6..3}", ["0", "3", "6"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{a,b}/{1..2}", ["a/1", "a/2", "b/1", "b/2"]),
        ("p{a,b{1,2}}q", ["paq", "pb1q", "pb2q"]),
        ("lit{x}eral.tar", ["lit{x}eral.tar"]),
        ("plain.tar", ["plain.tar"]),
        ("{09..10}", ["09", "10"]),
    ],
)
def test_expand_braces(pattern: str, expected: list[str]) -> None:
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize("pattern", ["a{1..3", "a{b,c", "a}b", "{0..5..0}"])
def test_expand_braces_refuses_malformed_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        expand_braces(pattern)


@pytest.mark.parametrize(
    ("url", "shard_id"),
    [
        ("s3://bucket/shards/000123.tar", "000123"),
        ("/data/a/train-0001.tar.gz", "train-0001"),
        ("https://h/x/shard.tgz?X-Amz-Signature=abc", "shard"),
        ("gs://b/dir/name with space.tar", "name_with_space"),
        ("/data/no_suffix", "no_suffix"),
        ("s3://b/v1.2.tar", "v1.2"),
    ],
)
def test_shard_id_is_the_file_name(url: str, shard_id: str) -> None:
    assert shard_id_from_url(url) == shard_id


def test_shard_id_refuses_empty_names() -> None:
    with pytest.raises(ValueError, match="shard id"):
        shard_id_from_url("s3://bucket/x/..")


def test_make_refs_dedupes_and_refuses_id_collisions() -> None:
    refs = make_refs(["s3://b/a/1.tar", "s3://b/a/2.tar", "s3://b/a/1.tar"])
    assert refs == [ShardRef("1", "s3://b/a/1.tar"), ShardRef("2", "s3://b/a/2.tar")]
    with pytest.raises(ValueError, match=r"same shard id '1'"):
        make_refs(["s3://b/a/1.tar", "s3://b/other/1.tar"])
    with pytest.raises(ValueError, match="no shards"):
        make_refs([])


def _touch(root: Path, names: list[str]) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"x")


def test_local_globs_braces_and_list_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path, ["s/000.tar", "s/001.tar", "s/002.tar", "s/readme.md", "t/extra.tar"])
    globbed = expand_inputs([str(tmp_path / "s" / "*.tar")])
    assert [r.shard_id for r in globbed] == ["000", "001", "002"]
    assert all(Path(r.url).is_absolute() for r in globbed)

    braced = expand_inputs(f"file://{tmp_path}/s/{{000..001}}.tar")
    assert [r.url for r in braced] == [str(tmp_path / "s" / "000.tar"), str(tmp_path / "s" / "001.tar")]

    lst = tmp_path / "list.txt"
    lst.write_text(f"# shards to do\n\n{tmp_path}/s/002.tar\n{tmp_path}/t/*.tar\n  {tmp_path}/s/000.tar  \n")
    for arg in (str(lst), f"@{lst}"):
        assert [r.shard_id for r in expand_inputs([arg])] == ["002", "extra", "000"]

    monkeypatch.chdir(tmp_path)
    relative = expand_inputs(["s/001.tar"])
    assert relative == [ShardRef("001", str(tmp_path / "s" / "001.tar"))]


def test_unmatched_glob_and_missing_list_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.tar")])
    with pytest.raises(ValueError, match="does not exist"):
        expand_inputs([f"@{tmp_path}/nope.txt"])


@pytest.mark.s3
def test_s3_glob_and_remote_list_file(s3_server) -> None:
    fs = s3_server.make_bucket("shards-glob")
    for name in ("a/000.tar", "a/001.tar", "a/skip.txt"):
        fs.pipe(f"shards-glob/{name}", b"x")
    fs.pipe("shards-glob/list.txt", b"s3://shards-glob/a/001.tar\n")
    opts = s3_server.storage_options
    refs = expand_inputs(["s3://shards-glob/a/*.tar"], opts)
    assert refs == [ShardRef("000", "s3://shards-glob/a/000.tar"), ShardRef("001", "s3://shards-glob/a/001.tar")]
    assert expand_inputs(["@s3://shards-glob/list.txt"], opts) == [ShardRef("001", "s3://shards-glob/a/001.tar")]
