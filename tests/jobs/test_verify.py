"""``rdeic verify``: reconciliation of an archive with its sources by key and content.

A real archive (local executor, the tiny codec) of real-photo shards plus every hostile sample and
a source shard cut off in the middle of a photo; then copies of it damaged in each way verify must
report: missing, duplicate (in one file and across files), unexpected, hash mismatch, failed
without a reason, a shard without its done marker, an archive shard no source names.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.commands.archive import ArchiveJob, run_archive
from jobs.commands.verify import VerifyUsageError, verify_archive
from tests.pipeline.conftest import TEST_MAX_PIXELS, build_shard_specs, member_data_offset


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory, small_photo_paths: list[Path],
             tiny_model_dir: Path) -> tuple[Path, str, dict[str, str]]:
    """(root with in/ and archive/, source pattern, key -> status) of a clean local archive."""
    root = tmp_path_factory.mktemp("verify")
    specs = build_shard_specs(small_photo_paths, n_shards=3, photos_per_shard=2)
    (root / "in").mkdir()
    for spec in specs:
        (root / "in" / f"{spec.name}.tar").write_bytes(spec.tar_bytes())
    cut = build_shard_specs(small_photo_paths[6:], n_shards=1, photos_per_shard=3, with_hostile=False)[0]
    full = cut.tar_bytes()
    offset, size = member_data_offset(full, f"{cut.samples[2][0]}.png")  # photos alternate png, jpg
    (root / "in" / "shard-000003.tar").write_bytes(full[: offset + size // 2])
    pattern = str(root / "in" / "shard-{000000..000003}.tar")
    job = ArchiveJob(inputs=(pattern,), output=str(root / "archive"), model=str(tiny_model_dir), executor="local",
                     max_pixels=TEST_MAX_PIXELS, batch_size=4)
    assert run_archive(job).exit_code == 0
    statuses = {r["key"]: r["status"] for p in sorted((root / "archive" / "archive").glob("*.parquet"))
                for r in pq.read_table(p, columns=["key", "status"]).to_pylist()}
    return root, pattern, statuses


def _copy(archived: tuple[Path, str, dict[str, str]], tmp_path: Path) -> Path:
    root = archived[0]
    shutil.copytree(root / "archive", tmp_path / "archive")
    return tmp_path / "archive"


def _rewrite(archive: Path, shard: str, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    path = archive / "archive" / f"{shard}.parquet"
    table = pq.read_table(path)
    rows = edit(table.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def test_a_clean_archive_verifies_and_the_cli_exits_0(archived, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root, pattern, statuses = archived
    report = verify_archive(str(root / "archive"), [pattern])
    assert report.clean and report.problems == []
    assert report.source_shards == 4 and report.archive_shards == 4
    assert report.source_keys == report.archive_rows == len(statuses)
    assert report.ok == sum(s == "ok" for s in statuses.values()) and report.failed == len(statuses) - report.ok
    assert report.hashes_checked == report.hashes_matched >= report.ok
    assert [d["shard"] for d in report.damaged_sources] == ["shard-000003"]  # reported, not a problem
    assert report.failed_by_reason["shard_damaged"] == 1

    out = tmp_path / "report.json"
    assert main(["--log-level", "WARNING", "verify", str(root / "archive"), "--source", pattern,
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CLEAN" in text and f"source keys: {len(statuses)}" in text and "damaged source shard shard-000003" in text
    saved = json.loads(out.read_text())
    assert saved["clean"] is True and saved["source_keys"] == len(statuses)
    assert set(saved["problem_counts"]) >= {"missing", "duplicate", "unexpected", "hash_mismatch",
                                            "failed_without_reason"}


def test_every_kind_of_damage_is_listed_by_key(archived, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root, pattern, statuses = archived
    archive = _copy(archived, tmp_path)

    def shard0(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        by_key = {r["key"]: r for r in rows}
        dup = dict(by_key["shard-000000/photo001"])
        return [r for r in rows if r["key"] != "shard-000000/photo000"] + [dup]  # one lost, one twice

    def shard1(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in rows:
            if r["key"] == "shard-000001/photo003":
                r["src_sha256"] = bytes(32)  # stored hash no longer the source's
            if r["key"] == "shard-000001/zero_bytes":
                r["reason"] = ""  # failed, but nobody can tell why
        ghost = dict(rows[0], key="shard-000001/ghost", src_index=99)
        misplaced = dict(rows[0], key="shard-000000/photo001")  # stored in the wrong shard's file
        return rows + [ghost, misplaced]

    _rewrite(archive, "shard-000000", shard0)
    _rewrite(archive, "shard-000001", shard1)
    (archive / "_manifest" / "done" / "shard-000002.json").unlink()  # shard 2 not done: all its keys missing
    # a done shard no source names (as if archived from another input list)
    table = pq.read_table(root / "archive" / "archive" / "shard-000000.parquet")  # the untouched copy
    extra = [dict(r, key="extra-000009/" + r["key"].split("/", 1)[1], shard="extra-000009") for r in table.to_pylist()]
    pq.write_table(pa.Table.from_pylist(extra, schema=table.schema), archive / "archive" / "extra-000009.parquet")
    done = archive / "_manifest" / "done"
    shutil.copy(done / "shard-000000.json", done / "extra-000009.json")

    report = verify_archive(str(archive), [pattern])
    shard2 = sorted(k for k in statuses if k.startswith("shard-000002/"))
    assert not report.clean
    assert sorted(report.keys("missing")) == sorted(["shard-000000/photo000", *shard2])
    assert sorted(report.keys("duplicate")) == ["shard-000000/photo001", "shard-000000/photo001"]
    assert report.keys("hash_mismatch") == ["shard-000001/photo003"]
    assert report.keys("failed_without_reason") == ["shard-000001/zero_bytes"]
    unexpected = report.keys("unexpected")
    assert "shard-000001/ghost" in unexpected
    assert report.count("unexpected") == 1 + len({r["key"] for r in extra})  # the ghost, and extra-000009's rows
    assert sorted(k for k in unexpected if k.startswith("extra-")) == sorted({r["key"] for r in extra})
    assert report.count("source_unreadable") == report.count("archive_unreadable") == 0
    assert report.shards_not_done == ["shard-000002"] and report.leftover_files == ["shard-000002.parquet"]

    out = tmp_path / "problems.json"
    assert main(["--log-level", "WARNING", "verify", str(archive), "--source", pattern, "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "PROBLEM(S)" in text and "MISSING shard-000000/photo000" in text
    assert "HASH_MISMATCH shard-000001/photo003" in text
    saved = json.loads(out.read_text())
    assert saved["clean"] is False and saved["problem_counts"] == report.problem_counts
    assert {p["kind"] for p in saved["problems"]} == {"missing", "duplicate", "unexpected", "hash_mismatch",
                                                      "failed_without_reason"}


def test_unreadable_sources_are_problems_and_bad_usage_exits_2(archived, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root, pattern, _ = archived
    report = verify_archive(str(root / "archive"), [pattern.replace("000003}", "000004}")])
    assert report.count("source_unreadable") == 1 and "shard-000004" in report.problems[0].detail
    assert not report.clean

    with pytest.raises(VerifyUsageError, match="not an archive"):
        verify_archive(str(tmp_path / "nothing"), [pattern])
    assert main(["verify", str(tmp_path / "nothing"), "--source", pattern]) == 2
    assert "is not an archive" in capsys.readouterr().err
    assert main(["verify", str(root / "archive"), "--source", str(tmp_path / "*.tar")]) == 2
    assert "matches no files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["verify", str(root / "archive")])
    assert info.value.code == 2 and "--source" in capsys.readouterr().err
