"""``rdeic archive`` with the local executor: resume, codec refusal, exit codes, S3 options."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from jobs.cli import main
from jobs.commands.archive import ArchiveJob, run_archive
from pipeline.manifest import RUN_FILE, Guard, Manifest, OutputConflictError, OutputLocation
from tests.pipeline.conftest import TEST_MAX_PIXELS, ShardSpec, build_shard_specs


@pytest.fixture(scope="module")
def small_specs(small_photo_paths) -> list[ShardSpec]:
    return build_shard_specs(small_photo_paths, n_shards=3, photos_per_shard=2)


def _write_inputs(root: Path, specs: list[ShardSpec]) -> str:
    (root / "in").mkdir(parents=True, exist_ok=True)
    for spec in specs:
        (root / "in" / f"{spec.name}.tar").write_bytes(spec.tar_bytes())
    return str(root / "in" / "shard-{000000..000002}.tar")


def _argv(pattern: str, out: str, model: Path, *extra: str) -> list[str]:
    return ["archive", "--input", pattern, "--output", out, "--model", str(model), "--executor", "local",
            "--max-pixels", str(TEST_MAX_PIXELS), "--batch-size", "4", "--no-progress", *extra]


def _mtimes(out: Path) -> dict[str, int]:
    files = [*out.glob("archive/*.parquet"), *out.glob("_manifest/done/*.json")]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def _keys(out: str, filesystem=None) -> list[str]:
    return ds.dataset(f"{out}/archive", format="parquet", filesystem=filesystem).to_table(columns=["key"]) \
        .column("key").to_pylist()


def _expected_keys(specs: list[ShardSpec]) -> list[str]:
    return sorted(f"{s.name}/{k}" for s in specs for k in s.expect)


def test_rerun_skips_done_shards_and_redoes_missing_or_half_written_ones(tmp_path: Path, small_specs, tiny_model_dir,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pattern, out = _write_inputs(tmp_path, small_specs), tmp_path / "out"
    assert main(_argv(pattern, str(out), tiny_model_dir)) == 0
    first = _mtimes(out)
    assert len(first) == 6 and sorted(_keys(str(out))) == _expected_keys(small_specs)
    assert "3/3 shards done (3 this run, 0 before)" in capsys.readouterr().out

    assert main(_argv(pattern, str(out), tiny_model_dir)) == 0  # nothing to do: nothing rewritten
    assert _mtimes(out) == first
    assert "(0 this run, 3 before)" in capsys.readouterr().out

    (out / "_manifest/done/shard-000001.json").unlink()  # lost marker: redo
    (out / "_manifest/done/shard-000002.json").unlink()  # half-written attempt: file without marker
    (out / "archive/shard-000002.parquet").write_bytes(b"PAR1 torn upload")
    assert main(_argv(pattern, str(out), tiny_model_dir)) == 0
    third = _mtimes(out)
    assert "(2 this run, 1 before)" in capsys.readouterr().out
    assert {k for k in first if first[k] == third[k]} == {"archive/shard-000000.parquet",
                                                          "_manifest/done/shard-000000.json"}
    keys = _keys(str(out))
    assert sorted(keys) == _expected_keys(small_specs) and len(keys) == len(set(keys))
    summary = json.loads((out / "_manifest/summary.json").read_text())
    assert summary["shards"] == {"total": 3, "done_before": 1, "done_this_run": 2, "failed": 0, "damaged": 0,
                                 "retried": 0}
    assert summary["images"]["total"] == len(keys)


def test_an_output_written_by_another_codec_is_refused(tmp_path: Path, small_specs, tiny_model_dir, other_model_dir,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pattern, out = _write_inputs(tmp_path, small_specs[:1]), tmp_path / "out"
    pattern = pattern.replace("{000000..000002}", "000000")
    assert main(_argv(pattern, str(out), tiny_model_dir)) == 0
    before = _mtimes(out)
    capsys.readouterr()
    assert main(_argv(pattern, str(out), other_model_dir)) == 2
    err = capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    other = json.loads((other_model_dir / "config.json").read_text())["fingerprint"]
    assert "refusing to write into" in err and run["codec"]["fingerprint"] in err and other in err
    assert _mtimes(out) == before


def test_done_markers_without_run_file_are_refused(tmp_path: Path, small_specs, tiny_model_dir) -> None:
    pattern, out = _write_inputs(tmp_path, small_specs[:1]), tmp_path / "out"
    job = ArchiveJob(inputs=(pattern.replace("{000000..000002}", "000000"),), output=str(out),
                     model=str(tiny_model_dir), executor="local", max_pixels=TEST_MAX_PIXELS)
    run_archive(job)
    (out / "run.json").unlink()
    with pytest.raises(OutputConflictError, match="no run.json"):
        Manifest(OutputLocation(str(out))).claim(Guard(RUN_FILE, dict, lambda run: None))


def test_missing_shard_fails_the_run_and_a_rerun_completes_it(tmp_path: Path, small_specs, tiny_model_dir,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    pattern, out = _write_inputs(tmp_path, small_specs[:2]), tmp_path / "out"
    assert main(_argv(pattern, str(out), tiny_model_dir)) == 1
    text = capsys.readouterr().out
    assert "FAILED shard shard-000002 after 1 attempt(s): FileNotFoundError" in text
    assert (out / "_manifest/failed/shard-000002.json").exists()
    assert len(list(out.glob("_manifest/done/*.json"))) == 2
    _write_inputs(tmp_path, small_specs)
    assert main(_argv(pattern, str(out), tiny_model_dir)) == 0
    assert not (out / "_manifest/failed/shard-000002.json").exists()
    assert sorted(_keys(str(out))) == _expected_keys(small_specs)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--storage-options", "[1, 2]"], "must be a JSON object"),
        (["--storage-options", "{bad json"], "not valid JSON"),
        (["--executor", "spark"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, tiny_model_dir, extra: list[str], message: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(_argv(str(tmp_path / "x.tar"), str(tmp_path / "out"), tiny_model_dir, *extra))
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_config_errors_exit_2_before_any_work(tmp_path: Path, tiny_model_dir,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(str(tmp_path / "*.tar"), str(tmp_path / "out"), tiny_model_dir)) == 2
    assert "matches no files" in capsys.readouterr().err
    assert main(_argv(str(tmp_path / "a.tar"), str(tmp_path / "out"), tmp_path / "no-model")) == 2
    assert "--model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
def test_s3_endpoint_from_environment_or_storage_options(s3_server, small_specs, tiny_model_dir,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fs = s3_server.make_bucket("local-exec")
    for spec in small_specs[:2]:
        fs.pipe(f"local-exec/in/{spec.name}.tar", spec.tar_bytes())
    pattern = "s3://local-exec/in/*.tar"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert main(_argv(pattern, "s3://local-exec/out-env", tiny_model_dir)) == 0
    assert sorted(_keys("local-exec/out-env", fs)) == _expected_keys(small_specs[:2])

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there: options must win
    options = json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint}, "key": "testing",
                          "secret": "testing"})
    assert main(_argv(pattern, "s3://local-exec/out-opt", tiny_model_dir, "--storage-options", options)) == 0
    run = json.loads(fs.cat("local-exec/out-opt/run.json"))
    assert run["job"]["storage_options"]["secret"] == "***" and run["job"]["storage_options"]["key"] == "***"
    assert sorted(_keys("local-exec/out-opt", fs)) == _expected_keys(small_specs[:2])


def test_a_worker_that_cannot_load_the_model_exits_1(tmp_path: Path, small_specs, tiny_model_dir,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    pattern = _write_inputs(tmp_path, small_specs[:1]).replace("{000000..000002}", "000000")
    assert main(_argv(pattern, str(tmp_path / "out"), tiny_model_dir, "--device", "cuda")) == 1
    err = capsys.readouterr().err
    assert "no shard processed" in err and "CUDA is not available" in err
    assert not (tmp_path / "out" / "_manifest" / "done").exists()
