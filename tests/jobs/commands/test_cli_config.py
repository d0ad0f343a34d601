"""Job specs: validation messages name the field; precedence CLI > YAML > environment > defaults;
the example specs match the real parsers and docs/jobs.md."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from jobs import config as cfg
from jobs.cli import build_parser, main, resolve_args
from pipeline.batching import DEFAULT_BATCH_SIZE
from tests.jobs.commands.conftest import REPO_ROOT, write_spec


def _error(text: str) -> str:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse_spec(yaml.safe_load(text))
    return str(info.value)


@pytest.mark.parametrize("text, message", [
    ("archive: {num_actors: x}", "archive.num_actors: expected int >= 1, got 'x'"),
    ("archive: {num_actors: 0}", "archive.num_actors: expected int >= 1, got 0"),
    ("archive: {num_actors: true}", "archive.num_actors: expected int >= 1, got True"),
    ("archive: {batch_size: 2.5}", "archive.batch_size: expected int >= 1, got 2.5"),
    ("archive: {executor: slurm}", "archive.executor: expected one of 'ray', 'local', got 'slurm'"),
    ("archive: {progress: 'yes'}", "archive.progress: expected bool, got 'yes'"),
    ("archive: {input: []}", "archive.input: expected non-empty list of str, got []"),
    ("archive: {input: [s3://a, 3]}", "archive.input[1]: expected str, got 3"),
    ("archive: {storage_options: [1]}", "archive.storage_options: expected mapping, got [1]"),
    ("archive: {max_shard_retries: -1}", "archive.max_shard_retries: expected int >= 0, got -1"),
    ("restore: {format: zip}", "restore.format: expected one of 'wds', 'folder', got 'zip'"),
    ("restore: {detail_scale: -0.5}", "restore.detail_scale: expected float >= 0, got -0.5"),
    ("submit: {pip: 1}\narchive: {}", "submit.pip: expected bool, got 1"),
    ("submit: {entrypoint_num_gpus: -1}\narchive: {}", "submit.entrypoint_num_gpus: expected float >= 0, got -1"),
    ("submit: {pass_env: ['A B']}\narchive: {}", "submit.pass_env: 'A B' is not an environment variable name"),
])
def test_bad_values_are_errors_naming_the_field(text: str, message: str) -> None:
    assert _error(text) == message


def test_unknown_keys_sections_and_shapes_are_errors() -> None:
    assert _error("archive: {num_actor: 2}").startswith("archive.num_actor: unknown setting; expected one of ")
    assert _error("archive: {}\nsubmit: {adress: x}").startswith("submit.adress: unknown setting")
    assert _error("archive: {}\nrestor: {}").startswith("restor: unknown section")
    assert "exactly one job section" in _error("archive: {}\nrestore: {}")
    assert "exactly one job section" in _error("submit: {}")
    assert _error("archive: [1, 2]") == "archive: expected a mapping of settings, got [1, 2]"
    assert "expected a mapping" in _error("- archive")


def test_secrets_are_refused_in_spec_env() -> None:
    message = _error("archive: {}\nsubmit: {env: {AWS_SECRET_ACCESS_KEY: abc}}")
    assert message.startswith("submit.env.AWS_SECRET_ACCESS_KEY: looks like a secret")
    assert "abc" not in message
    spec = cfg.parse_spec(yaml.safe_load("archive: {}\nsubmit: {env: {OMP_NUM_THREADS: '4'}}"))
    assert spec.submit.env == {"OMP_NUM_THREADS": "4"}


def test_null_means_not_given_and_a_single_input_string_is_a_list() -> None:
    spec = cfg.parse_spec({"archive": {"input": "s3://b/x.tar", "num_actors": None, "batch_size": 3}})
    assert cfg.given(spec.job) == {"input": ["s3://b/x.tar"], "batch_size": 3}


def test_load_spec_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read spec"):
        cfg.load_spec(tmp_path / "missing.yaml")
    bad = write_spec(tmp_path / "bad.yaml", "archive: {input: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load_spec(bad)
    restore = write_spec(tmp_path / "r.yaml", "restore: {archive: x}\n")
    with pytest.raises(cfg.ConfigError, match="is a 'restore' spec, not 'archive'"):
        cfg.load_spec(restore, expect_kind="archive")


# ------------------------------------------------------------------------------------ precedence
def _resolved(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    return yaml.safe_load(capsys.readouterr().out)["archive"]


def test_precedence_cli_over_yaml_over_environment_over_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "a.yaml", "archive:\n  input: [/data/a.tar, /data/b.tar]\n  output: /out/yaml\n"
                                           "  model: yaml-model\n  batch_size: 3\n  progress: true\n")
    monkeypatch.setenv("RDEIC_MODEL", "env-model")

    # defaults < environment: no spec, the env var is --model's default
    r = _resolved(capsys, "archive", "--input", "x.tar", "--output", "/o", "--print-config")
    assert r["model"] == "env-model" and r["batch_size"] == DEFAULT_BATCH_SIZE and r["executor"] == "ray"

    # environment < YAML < CLI
    r = _resolved(capsys, "archive", "--config", str(spec), "--print-config")
    assert (r["model"], r["batch_size"], r["output"], r["progress"]) == ("yaml-model", 3, "/out/yaml", True)
    assert r["input"] == ["/data/a.tar", "/data/b.tar"] and r["executor"] == "ray"  # unset in YAML: default
    r = _resolved(capsys, "archive", "--config", str(spec), "--model", "cli-model", "--batch-size", "9",
                  "--input", "/cli.tar", "--no-progress", "--print-config")
    assert (r["model"], r["batch_size"], r["output"], r["progress"]) == ("cli-model", 9, "/out/yaml", False)
    assert r["input"] == ["/cli.tar"]  # a repeatable flag replaces the YAML list, it does not extend it

    # a flag given with its default value still wins over the spec
    r = _resolved(capsys, "archive", "--config", str(spec), "--batch-size", str(DEFAULT_BATCH_SIZE), "--print-config")
    assert r["batch_size"] == DEFAULT_BATCH_SIZE


def test_required_flags_may_come_from_the_spec_but_not_from_nowhere(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    only_output = write_spec(tmp_path / "o.yaml", "archive: {output: /o}\n")
    assert main(["archive", "--config", str(only_output), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "required: --input" in err and "archive.input in --config" in err and "--output" not in err
    assert main(["archive", "--output", "/o", "--print-config"]) == 2
    assert "--input" in capsys.readouterr().err


def test_a_bad_spec_stops_the_command_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "a.yaml", "archive:\n  input: [a.tar]\n  output: /o\n  num_actors: x\n")
    assert main(["archive", "--config", str(spec)]) == 2
    assert capsys.readouterr().err.strip() == "rdeic archive: error: archive.num_actors: expected int >= 1, got 'x'"


def test_explicit_dests_sees_only_typed_flags() -> None:
    parser = build_parser("archive")
    sub = next(a for a in parser._actions if a.dest == "command").choices["archive"]
    given = cfg.explicit_dests(sub, ["--input", "a", "--no-progress", "--batch-size=4"])
    assert given == {"input", "progress", "batch_size"}
    assert sub.get_default("batch_size") == DEFAULT_BATCH_SIZE  # defaults restored afterwards


# ------------------------------------------------------------------------------------ examples + docs
@pytest.mark.parametrize("kind", cfg.JOB_KINDS)
def test_example_specs_are_valid(kind: str) -> None:
    spec = cfg.load_spec(REPO_ROOT / "jobs" / f"{kind}.yaml", expect_kind=kind)
    values = spec.job_values()
    assert values["output"].startswith("s3://") and values["model"].startswith("/models/")
    text = (REPO_ROOT / "jobs" / f"{kind}.yaml").read_text()
    assert not re.search(r"(?i)(secret|aws_access_key_id)\s*:", text)  # credentials never live in a spec


def _options(kind: str) -> set[str]:
    parser = build_parser(kind)
    sub = next(a for a in parser._actions if a.dest == "command").choices[kind]
    return {a.dest for a in sub._actions if a.option_strings}


@pytest.mark.parametrize("kind", cfg.JOB_KINDS)
def test_schema_fields_are_the_commands_long_flags(kind: str) -> None:
    """Keys = flags with '_': every schema field is an option of the real command and vice versa
    (except the options cli.py adds and --help)."""
    try:
        importlib.import_module(f"jobs.commands.{kind}")
    except ModuleNotFoundError as exc:
        if exc.name == f"jobs.commands.{kind}":
            pytest.skip(f"jobs/commands/{kind}.py is not in this checkout yet")
        raise
    fields = {f.name for f in dataclasses.fields(cfg.SCHEMAS[kind])}
    options = _options(kind) - {"help", "config", "print_config"}
    assert fields == options, f"schema-only: {sorted(fields - options)}, flag-only: {sorted(options - fields)}"


def test_docs_reference_every_field_and_the_precedence() -> None:
    doc = (REPO_ROOT / "docs" / "jobs.md").read_text()
    assert "**Command-line flags > job YAML > environment > defaults.**" in doc
    for schema in (cfg.ArchiveSpec, cfg.SubmitSpec, cfg.RestoreSpec, cfg.AuditSpec):
        for f in dataclasses.fields(schema):
            assert f"`{f.name}`" in doc, f"docs/jobs.md does not describe {schema.__name__}.{f.name}"


def test_spec_strings_go_through_the_flags_own_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "a.yaml", "audit:\n  archive: s3://b/arc\n  source: s3://b/src.tar\n"
                                           "  output: s3://b/audit\n  perceptual: 'fid, LPIPS'\n  fraction: 0.25\n")
    from_spec, status = resolve_args(["audit", "--config", str(spec)])
    assert status is None and from_spec is not None
    from_flags, _ = resolve_args(["audit", "--archive", "s3://b/arc", "--source", "s3://b/src.tar", "--output",
                                  "s3://b/audit", "--perceptual", "fid, LPIPS", "--fraction", "0.25"])
    assert from_flags is not None
    for dest in ("archive", "source", "output", "perceptual", "fraction", "seed", "model"):
        assert getattr(from_spec, dest) == getattr(from_flags, dest), dest
    assert from_spec.perceptual == ("fid", "lpips")
    # the resolved config (what --print-config and job.yaml hold) loads back as a valid spec
    assert main(["audit", "--config", str(spec), "--print-config"]) == 0
    resolved = write_spec(tmp_path / "resolved.yaml", capsys.readouterr().out)
    again = cfg.load_spec(resolved, expect_kind="audit").job_values()
    assert again["perceptual"] == "fid,lpips" and again["source"] == ["s3://b/src.tar"]

    bad = write_spec(tmp_path / "bad.yaml", "audit: {fraction: 1.5}\n")
    assert main(["audit", "--config", str(bad)]) == 2
    assert "audit.fraction: expected float >= 0 and <= 1, got 1.5" in capsys.readouterr().err
    bad = write_spec(tmp_path / "bad2.yaml", "audit: {perceptual: lpipz}\n")
    assert main(["audit", "--config", str(bad), "--archive", "a", "--source", "b", "--output", "c"]) == 2
    assert "audit.perceptual: unknown perceptual metric(s) ['lpipz']" in capsys.readouterr().err
