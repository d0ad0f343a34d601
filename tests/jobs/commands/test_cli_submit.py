"""`rdeic submit` without a cluster: runtime_env construction (working dir, pinned pip, env vars from the
environment only), entrypoint = the local command line, address and token resolution."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from jobs.cli import main, resolve_args
from jobs.commands import submit as sb
from jobs.config import DEFAULT_PASS_ENV, ConfigError, load_spec
from tests.jobs.commands.conftest import REPO_ROOT, write_spec

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000",
    "AWS_SECRET_ACCESS_KEY": "fake/secret+value/123456",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEFAKE",
    "AWS_ENDPOINT_URL": "http://minio:9000",
    "AWS_DEFAULT_REGION": "eu-west-1",
    "EXTRA_NAME": "extra-value",
    "UNRELATED": "not-passed",
}


def _spec(tmp_path: Path, submit: str = "", name: str = "a.yaml") -> Path:
    return write_spec(tmp_path / name, f"archive:\n  input: [s3://b/x.tar]\n  output: s3://b/out\n"
                                       f"submit:\n  pip: false\n{submit}")


def test_env_vars_come_from_the_environment_only(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, "  pass_env: [EXTRA_NAME, NOT_SET]\n  env: {OMP_NUM_THREADS: '2'}\n"))
    sub = sb.build_submission(spec, FAKE_ENV, working_dir=str(tmp_path))
    env = sub.runtime_env["env_vars"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "EXTRA_NAME"):
        assert env[name] == FAKE_ENV[name]
    assert "UNRELATED" not in env and "NOT_SET" not in env and "AWS_REGION" not in env
    assert env["OMP_NUM_THREADS"] == "2" and env["RDEIC_LOG_FORMAT"] == "json"
    assert sub.runtime_env["worker_process_setup_hook"] == "jobs.logs.setup_worker_logging"
    described = sub.describe()
    for value in FAKE_ENV.values():
        assert value not in described  # names only
    assert "AWS_SECRET_ACCESS_KEY" in described
    assert set(DEFAULT_PASS_ENV) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                     "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}


def test_entrypoint_is_the_local_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(_spec(tmp_path))
    sub = sb.build_submission(spec, {}, working_dir=str(tmp_path), extra_args=["--num-actors", "8"],
                              submission_id="rdeic-test-1", num_gpus=0.5)
    argv = shlex.split(sub.entrypoint)
    assert argv[:3] == ["python", "-m", "jobs.cli"]
    monkeypatch.chdir(tmp_path)  # the job runs in its uploaded working dir
    args, status = resolve_args(argv[3:])  # exactly what the cluster will run with
    assert status is None and args is not None
    assert (args.command, args.config, args.num_actors) == ("archive", "a.yaml", 8)
    assert (args.input, args.output) == (["s3://b/x.tar"], "s3://b/out")  # read from the spec there
    assert sub.submission_id == "rdeic-test-1" and sub.entrypoint_num_gpus == 0.5
    assert sub.metadata["rdeic.kind"] == "archive" and sub.metadata["rdeic.spec"] == "a.yaml"
    assert sub.runtime_env["working_dir"] == str(tmp_path.resolve())
    assert {".venv", "data", ".git", "*.ckpt"} <= set(sub.runtime_env["excludes"])
    assert "pip" not in sub.runtime_env


def test_the_spec_must_be_inside_the_uploaded_working_dir(tmp_path: Path) -> None:
    (tmp_path / "wd").mkdir()
    spec = load_spec(_spec(tmp_path))
    with pytest.raises(ConfigError, match="must be inside the uploaded working dir"):
        sb.build_submission(spec, {}, working_dir=str(tmp_path / "wd"))
    with pytest.raises(ConfigError, match="is not a directory"):
        sb.build_submission(spec, {}, working_dir=str(tmp_path / "nope"))
    # default: the project root, so a repo spec needs no options
    sub = sb.build_submission(load_spec(REPO_ROOT / "jobs" / "archive.yaml"), {}, pip=False)
    assert sub.runtime_env["working_dir"] == str(REPO_ROOT) and "--config jobs/archive.yaml" in sub.entrypoint


def test_image_mode_uploads_only_the_spec(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, name="my-run.yaml"))
    sub = sb.build_submission(spec, {}, working_dir="")
    upload = Path(sub.runtime_env["working_dir"])
    assert sorted(p.name for p in upload.iterdir()) == ["my-run.yaml"]
    assert (upload / "my-run.yaml").read_text() == spec.path.read_text()
    assert shlex.split(sub.entrypoint)[-2:] == ["--config", "my-run.yaml"] and "excludes" not in sub.runtime_env
    sub.cleanup()
    assert not upload.exists()


def test_pip_is_the_pinned_requirements_without_ray_or_test_tools(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path))
    sub = sb.build_submission(spec, {}, working_dir=str(tmp_path), pip=True)
    packages = sub.runtime_env["pip"]["packages"]
    pins = sb.read_constraints(REPO_ROOT / "constraints.txt")
    names = {p.split("==")[0].lower().replace("_", "-") for p in packages}
    assert all("==" in p for p in packages)
    assert all(pins[sb._canonical(p.split("==")[0])] == p for p in packages)  # exactly the constraints pins
    assert {"torch", "torchvision", "diffusers", "compressai", "pyarrow", "s3fs", "boto3", "webdataset",
            "pyyaml", "pytorch-msssim", "botocore", "numpy"} <= names
    assert "ray" not in names  # the cluster's Ray runs the job
    assert not names & {"pytest", "hypothesis", "moto", "duckdb", "pytest-timeout"}  # test extra only
    assert sb.build_submission(spec, {}, working_dir=str(tmp_path)).runtime_env.get("pip") is None  # spec: false


def test_address_precedence() -> None:
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "http://ray:8265"}
    assert sb.resolve_address("http://flag:8265/", "http://spec:8265", env) == "http://flag:8265"
    assert sb.resolve_address(None, "http://spec:8265", env) == "http://spec:8265"
    assert sb.resolve_address(None, None, env) == "http://api:8265"
    assert sb.resolve_address(None, None, {"RAY_ADDRESS": "head:8265"}) == "http://head:8265"
    assert sb.resolve_address(None, None, {"RAY_ADDRESS": "auto"}) == sb.DEFAULT_ADDRESS
    assert sb.resolve_address(None, None, {}) == "http://127.0.0.1:8265"


def test_token_lookup_follows_rays_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "token"
    path.write_text("from-path\n")
    assert sb.read_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}, home) == "from-env"
    assert sb.read_auth_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home) == "from-path"
    assert sb.read_auth_token({}, home) == "from-home"
    assert sb.read_auth_token({}, tmp_path / "nohome") is None
    with pytest.raises(sb.ClusterError, match="cannot be read"):
        sb.read_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_dry_run_shows_names_not_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in FAKE_ENV.items():
        monkeypatch.setenv(k, v)
    spec = _spec(tmp_path)
    assert main(["submit", str(spec), "--working-dir", str(tmp_path), "--dry-run", "--address", "http://h:1",
                 "--", "--batch-size", "2"]) == 0
    out = capsys.readouterr()
    assert "would submit archive job" in out.out and "to http://h:1" in out.out
    assert "--config a.yaml --batch-size 2" in out.out and "AWS_SECRET_ACCESS_KEY" in out.out
    for value in FAKE_ENV.values():
        assert value not in out.out + out.err


def test_unreachable_cluster_and_bad_spec_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _spec(tmp_path)
    assert main(["submit", str(spec), "--working-dir", str(tmp_path), "--address", f"http://127.0.0.1:{port}"]) == 3
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err
    bad = write_spec(tmp_path / "bad.yaml", "archive: {num_actors: x}\n")
    assert main(["submit", str(bad), "--working-dir", str(tmp_path)]) == 2
    assert "archive.num_actors: expected int >= 1, got 'x'" in capsys.readouterr().err
