"""`rdeic archive --config` end to end (resolved job.yaml, JSON per-shard logs, redaction), then
`rdeic status` and `rdeic inspect` checked against the Parquet files and markers themselves."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.config import load_spec
from tests.jobs.commands.conftest import TEST_MAX_PIXELS, Shards, write_spec

ENV_SECRET = "ENV-SECRET-value-4f9a"
SPEC_SECRET = "SPEC-SECRET-value-77c1"


@dataclass(frozen=True)
class Archived:
    out: Path
    spec: Path
    stdout: str
    stderr: str
    shards: Shards


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory, cli_shards: Shards, tiny_model_dir: Path) -> Archived:
    """One real local archive run, started from a spec, with JSON logs and secrets in env and options."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("archived")
    out = root / "out"
    spec = write_spec(root / "archive.yaml", f"""\
archive:
  input: {cli_shards.pattern}
  output: {out}
  model: {tiny_model_dir}
  executor: local
  batch_size: 4
  max_pixels: {TEST_MAX_PIXELS}
  storage_options: {{key: AKIA-FAKE-KEY-ID, secret: {SPEC_SECRET}}}
""")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
        assert main(["--log-format", "json", "archive", "--config", str(spec), "--no-progress"]) == 0
    return Archived(out, spec, stdout.getvalue(), stderr.getvalue(), cli_shards)


def _markers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "_manifest/done").glob("*.json"))}


def _table(out: Path):
    return pq.read_table(sorted((out / "archive").glob("*.parquet")))


def test_json_logs_have_one_event_per_shard_matching_its_marker(archived: Archived) -> None:
    events = [json.loads(line) for line in archived.stderr.splitlines() if line.startswith("{")]
    assert events and all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
    done = {e["shard"]: e for e in events if e.get("event") == "shard_done"}
    markers = _markers(archived.out)
    assert set(done) == set(markers) == {s.name for s in archived.shards.specs}
    for shard_id, event in done.items():
        m = markers[shard_id]
        for key in ("rows", "ok", "failed", "failed_by_reason", "bitstream_bytes", "mean_bpp", "attempt"):
            assert event[key] == m[key], (shard_id, key)
    assert [e["event"] for e in events if "event" in e][0] == "run_start"


def test_secrets_reach_no_log_no_config_and_no_metadata(archived: Archived) -> None:
    out = archived.out
    texts = {"stdout": archived.stdout, "stderr": archived.stderr,
             "job.yaml": (out / "job.yaml").read_text(), "run.json": (out / "run.json").read_text()}
    meta = pq.read_schema(next((out / "archive").glob("*.parquet"))).metadata
    texts["parquet metadata"] = meta[b"rdeic.job"].decode()
    for where, text in texts.items():
        for secret in (ENV_SECRET, SPEC_SECRET, "AKIA-FAKE-KEY-ID"):
            assert secret not in text, f"{secret} leaked into {where}"
    job = json.loads(texts["parquet metadata"])
    assert job["storage_options"] == {"key": "***", "secret": "***"}


def test_resolved_config_is_saved_next_to_the_output_and_reruns(archived: Archived,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    saved = load_spec(archived.out / "job.yaml", expect_kind="archive").job_values()
    assert saved["input"] == [archived.shards.pattern] and saved["output"] == str(archived.out)
    assert saved["batch_size"] == 4 and saved["max_pixels"] == TEST_MAX_PIXELS and saved["executor"] == "local"
    assert saved["storage_options"] == {"key": "***", "secret": "***"}
    assert main(["archive", "--config", str(archived.out / "job.yaml"), "--no-progress"]) == 0
    assert "3/3 shards done (0 this run, 3 before)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ status
def _status(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["status", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_of_a_complete_job_matches_the_archive(archived: Archived, capsys: pytest.CaptureFixture[str]) -> None:
    s = _status(capsys, str(archived.out))
    table = _table(archived.out)
    status = table.column("status").to_pylist()
    ok_bpp = [b for b, st in zip(table.column("bpp").to_pylist(), status) if st == "ok"]
    assert s["state"] == "complete"
    assert s["shards"] == {"total": 3, "done": 3, "failed": 0, "pending": 0, "damaged": 0}
    assert s["images"]["total"] == table.num_rows == sum(len(spec.expect) for spec in archived.shards.specs)
    assert s["images"]["ok"] == status.count("ok") and s["images"]["failed"] == status.count("failed")
    assert s["images"]["failed_by_reason"]["too_large"] == 2 and s["images"]["failed_by_reason"]["no_image"] == 1
    assert s["mean_bpp"] == pytest.approx(sum(ok_bpp) / len(ok_bpp), rel=1e-4)
    assert s["bytes"]["bitstreams"] == sum(len(b) for b in table.column("bitstream").to_pylist() if b)
    assert s["bytes"]["parquet"] == sum(p.stat().st_size for p in (archived.out / "archive").glob("*.parquet"))
    assert s["codec"]["fingerprint"] == json.loads((archived.out / "run.json").read_text())["codec"]["fingerprint"]
    assert _status(capsys, "--config", str(archived.spec)) == s  # the spec's output, same answer


def test_status_of_a_partial_job_counts_done_failed_and_pending(archived: Archived, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(archived.out, out)
    (out / "job.yaml").write_text((out / "job.yaml").read_text().replace(str(archived.out), str(out)))
    (out / "_manifest/done/shard-000001.json").unlink()  # still to do (e.g. stopped mid-shard)
    (out / "_manifest/done/shard-000002.json").unlink()
    (out / "_manifest/failed").mkdir()
    (out / "_manifest/failed/shard-000002.json").write_text(json.dumps(
        {"shard_id": "shard-000002", "url": "x", "error": "OSError: boom", "attempts": 3, "at": "t"}))
    s = _status(capsys, str(out))
    assert s["state"] == "incomplete (running or stopped)"
    assert s["shards"] == {"total": 3, "done": 1, "failed": 1, "pending": 1, "damaged": 0}
    assert s["images"]["total"] == _markers(out)["shard-000000"]["rows"]
    assert s["failed_shards"] == [{"shard_id": "shard-000002", "attempts": 3, "error": "OSError: boom"}]
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shards: 1/3 done, 1 failed, 1 pending" in text and "FAILED shard shard-000002 after 3 attempt(s)" in text


def test_status_elsewhere_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(tmp_path)]) == 1
    assert "no archive job at" in capsys.readouterr().err
    assert main(["status"]) == 2
    assert "give OUTPUT or --config" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ inspect
def test_inspect_a_file(archived: Archived, capsys: pytest.CaptureFixture[str]) -> None:
    path = archived.out / "archive" / "shard-000000.parquet"
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    table = pq.read_table(path)
    pf = pq.ParquetFile(path)
    assert info["rows"] == table.num_rows and info["row_groups"] == pf.num_row_groups
    assert info["status"] == {k: table.column("status").to_pylist().count(k) for k in ("ok", "failed")
                              if k in table.column("status").to_pylist()}
    assert info["bitstream_bytes"] == sum(len(b) for b in table.column("bitstream").to_pylist() if b)
    assert [c["name"] for c in info["schema"]] == table.schema.names
    run = json.loads((archived.out / "run.json").read_text())
    assert info["metadata"]["rdeic.codec.fingerprint"] == run["codec"]["fingerprint"]
    assert info["metadata"]["rdeic.format_version"] == "1" and info["metadata"]["rdeic.job"]["batch_size"] == 4
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"file {path}: {table.num_rows} rows" in text and f"fingerprint {run['codec']['fingerprint']}" in text


def test_inspect_a_prefix_counts_complete_shards_only(archived: Archived, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    shutil.copytree(archived.out, out)
    shutil.copy(out / "archive/shard-000001.parquet", out / "archive/shard-000009.parquet")  # no marker: leftover
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    table = _table(archived.out)
    assert info["files"] == 3 and info["leftover_files"] == ["shard-000009.parquet"]
    assert info["rows"] == table.num_rows
    assert info["failed_by_reason"]["too_large"] == 2
    ok_bpp = [b for b, s in zip(table.column("bpp").to_pylist(), table.column("status").to_pylist()) if s == "ok"]
    assert info["bpp"]["mean"] == pytest.approx(sum(ok_bpp) / len(ok_bpp), rel=1e-6)
    assert info["bpp"]["min"] == pytest.approx(min(ok_bpp)) and info["bpp"]["max"] == pytest.approx(max(ok_bpp))


def test_inspect_refuses_what_is_not_an_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa

    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    assert main(["inspect", str(tmp_path / "other.parquet")]) == 1
    assert "not an RDEIC archive" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "empty")]) == 1
    assert "holds no archive" in capsys.readouterr().err


@pytest.mark.s3
def test_status_and_inspect_read_s3(archived: Archived, s3_server, capsys: pytest.CaptureFixture[str]) -> None:
    fs = s3_server.make_bucket("cli-status")
    fs.put(str(archived.out), "cli-status/out", recursive=True)
    options = json.dumps(s3_server.storage_options)
    local = _status(capsys, str(archived.out))
    remote = _status(capsys, "s3://cli-status/out", "--storage-options", options)
    assert remote["output"] == "s3://cli-status/out"
    for key in ("state", "shards", "images", "bytes", "mean_bpp"):
        assert remote[key] == local[key], key
    assert main(["inspect", "s3://cli-status/out", "--storage-options", options, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == local["images"]["total"] and info["files"] == 3
