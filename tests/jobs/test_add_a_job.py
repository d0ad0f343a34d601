"""Adding a job is one file: the toy ``count`` job (tests/jobs/toy_commands/count.py) becomes a command with
flags, a spec section, --print-config, job.yaml, resume and exit statuses, and nothing else is edited."""

from __future__ import annotations

import importlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import jobs.commands
from jobs import config as cfg
from jobs.cli import main

TOY_DIR = Path(__file__).parent / "toy_commands"


@pytest.fixture
def toy_command(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The toy job's folder joins the command package's path, as a new file in jobs/commands/ would."""
    monkeypatch.setattr(jobs.commands, "__path__", [*jobs.commands.__path__, str(TOY_DIR)])
    cfg.job_schemas.cache_clear()
    yield
    cfg.job_schemas.cache_clear()


def count_job() -> Any:
    return importlib.import_module("jobs.commands.count")


def _shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_a_new_job_is_one_file(toy_command: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _shard(tmp_path / "s-0.tar", {"a.jpg": b"x" * 10, "a.txt": b"y" * 3, "b.jpg": b"z" * 20})
    _shard(tmp_path / "s-1.tar", {"c.jpg": b"w" * 7})
    out = tmp_path / "out"
    argv = ["count", "--input", str(tmp_path / "s-{0..1}.tar"), "--output", str(out), "--executor", "local",
            "--min-bytes", "5", "--no-progress"]

    with pytest.raises(SystemExit) as info:  # listed by `rdeic --help` without being imported
        main(["--help"])
    assert info.value.code == 0 and "count the samples and bytes" in capsys.readouterr().out

    assert main(argv) == 0
    assert "counted 3 samples, 37 bytes in 2 shards" in capsys.readouterr().out
    assert json.loads((out / "counts" / "s-0.json").read_text()) == {"samples": 2, "bytes": 30}
    saved = yaml.safe_load((out / "job.yaml").read_text())["count"]  # the resolved options, rerunnable
    assert saved["input"] == [str(tmp_path / "s-{0..1}.tar")] and saved["min_bytes"] == 5
    assert "break_lease" not in saved

    assert main(["count", "--config", str(out / "job.yaml")]) == 0  # resumes: both shards were done
    summary = json.loads((out / "_manifest" / "summary.json").read_text())
    assert summary["shards"] == {"total": 2, "done_before": 2, "done_this_run": 0, "failed": 0, "damaged": 0,
                                 "retried": 0}
    capsys.readouterr()

    # the spec schema and its messages come from the same options
    assert main(["count", "--config", str(_spec(tmp_path, "count: {min_bytes: -1}"))]) == 2
    assert "count.min_bytes: expected int >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([*argv[:-3], "--min-bytes", "-1"])
    assert info.value.code == 2 and "argument --min-bytes: expected an integer >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(count_job().CountJob.config_error, match="--min-bytes must be >= 0, got -1"):
        count_job().CountJob(inputs=("a.tar",), output="o", min_bytes=-1)
    # the guard: one output holds one set of settings
    assert main([*argv[:-3], "--min-bytes", "1"]) == 2
    assert "it was written with other settings (min_bytes: 5 -> 1)" in capsys.readouterr().err
    assert main(["count", "--output", str(out), "--print-config"]) == 2  # --input is required
    assert "the following arguments are required: --input" in capsys.readouterr().err


def _spec(root: Path, text: str) -> Path:
    path = root / "spec.yaml"
    path.write_text(text)
    return path
