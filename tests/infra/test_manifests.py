"""infra/: the Dockerfile, its entrypoint script, the KubeRay manifests and the cluster launcher config,
checked statically against the code (console script, subcommands, specs, Ray and project versions)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli import SUBCOMMANDS, resolve_args
from jobs.commands.submit import read_constraints
from jobs.config import parse_spec
from tests.jobs.commands.conftest import REPO_ROOT

INFRA = REPO_ROOT / "infra"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
IMAGE = f"ghcr.io/rdeic/rdeic-archive:{PYPROJECT['project']['version']}"
RAY_VERSION = read_constraints(REPO_ROOT / "constraints.txt")["ray"].split("==")[1]


# ------------------------------------------------------------------------------------ Dockerfile
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        current = f"{current} {line[:-1].strip()}" if line.endswith("\\") else f"{current} {line}"
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    assert not current, "dangling line continuation"
    return out


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return dockerfile_instructions((INFRA / "Dockerfile").read_text())


def test_dockerfile_parser_joins_continuations() -> None:
    parsed = dockerfile_instructions("# c\nFROM a\nRUN x \\\n  # inner\n  && y\nENV A=1 \\\n    B=2\n")
    assert parsed == [("FROM", "a"), ("RUN", "x && y"), ("ENV", "A=1 B=2")]


def test_dockerfile_installs_the_project_with_its_pins(docker: list[tuple[str, str]]) -> None:
    keywords = [k for k, _ in docker]
    assert set(keywords) <= {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "ENTRYPOINT", "CMD", "ARG", "LABEL"}
    assert keywords[0] == "FROM" and keywords.count("FROM") == 1
    base = docker[0][1]
    requires = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12"
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base) and "3.11" in requires
    copies = [a for k, a in docker if k == "COPY"]
    runs = [a for k, a in docker if k == "RUN"]
    install = next(r for r in runs if "pip install" in r)
    assert "-c constraints.txt" in install and '".[pipeline,metrics]"' in install
    # everything the install needs is copied before it: the packaging files and every package
    before = [a for k, a in docker[: docker.index(("RUN", install))] if k == "COPY"]
    copied = " ".join(before)
    assert "pyproject.toml" in copied and "constraints.txt" in copied
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        if "." not in package:
            assert f"{package}/" in copied, f"{package} is not copied before pip install"
    assert any("infra/docker-entrypoint.sh" in c for c in copies)
    assert ("USER", "ray") in docker and ("WORKDIR", "/app") in docker


def test_dockerfile_entrypoint_is_the_rdeic_console_script(docker: list[tuple[str, str]]) -> None:
    entrypoint = json.loads(next(a for k, a in docker if k == "ENTRYPOINT"))  # exec form
    cmd = json.loads(next(a for k, a in docker if k == "CMD"))
    assert entrypoint[-1] == "/usr/local/bin/rdeic-entrypoint" and cmd == ["--help"]
    copy = next(a for k, a in docker if k == "COPY" and "docker-entrypoint.sh" in a)
    assert copy.split()[-1] == entrypoint[-1]
    script = (INFRA / "docker-entrypoint.sh").read_text()
    assert "exec rdeic \"$@\"" in script
    assert PYPROJECT["project"]["scripts"]["rdeic"] == "jobs.cli:main"
    assert os.access(INFRA / "docker-entrypoint.sh", os.X_OK)


def _entrypoint(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", str(INFRA / "docker-entrypoint.sh"), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_entrypoint_script_runs_rdeic_and_passes_shells_through() -> None:
    """What `docker run IMAGE ...` executes, run here with the venv's `rdeic` on PATH."""
    default = _entrypoint("--help")  # the image's CMD
    assert default.returncode == 0 and "usage: rdeic" in default.stdout and "archive" in default.stdout
    sub = _entrypoint("status", "--help")
    assert sub.returncode == 0 and "usage: rdeic status" in sub.stdout
    shell = _entrypoint("bash", "-c", "echo passed-through")  # the Ray cluster launcher's `docker run ... bash`
    assert shell.returncode == 0 and shell.stdout.strip() == "passed-through"
    bad = _entrypoint("no-such-command")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# ------------------------------------------------------------------------------------ KubeRay
def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / "kuberay" / name).read_text()) if d]


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_container = _containers(head["template"])[0]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"]["limits"]]
    assert len(gpu_groups) == 1, "exactly one GPU worker group"
    group = gpu_groups[0]
    assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    limits = _containers(group["template"])[0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1  # one shard actor per GPU per pod
    tolerations = group["template"]["spec"].get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    for template in (head["template"], group["template"]):
        for c in _containers(template):
            assert c["image"] == IMAGE
            assert "command" not in c and "args" not in c  # KubeRay provides `ray start`
            env_text = json.dumps(c.get("env", [])) + json.dumps(c.get("envFrom", []))
            assert not re.search(r"(?i)\"value\": \"[^\"]*(secret|AKIA)", env_text)  # no literal credentials
            assert {"secretRef": {"name": "rdeic-s3", "optional": True}} in c["envFrom"]
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts
        names = {v["name"] for v in template["spec"]["volumes"]}
        assert {m["name"] for c in _containers(template) for m in c["volumeMounts"]} <= names


def test_raycluster_manifest() -> None:
    (cluster,) = _docs("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_manifest_runs_the_cli_on_its_own_spec() -> None:
    docs = {d["kind"]: d for d in _docs("rayjob.yaml")}
    assert set(docs) == {"ConfigMap", "RayJob"}
    job, config_map = docs["RayJob"], docs["ConfigMap"]
    assert job["apiVersion"] == "ray.io/v1" and config_map["apiVersion"] == "v1"
    spec = job["spec"]
    for key in ("entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes", "submissionMode"):
        assert key in spec, key
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    _check_cluster_spec(spec["rayClusterSpec"])

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "rdeic" and argv[0] in PYPROJECT["project"]["scripts"] and argv[1] in SUBCOMMANDS
    config_path = argv[argv.index("--config") + 1]
    # the --config file is the ConfigMap, mounted in the head pod (where the driver runs)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    volume = next(v for v in head["spec"]["volumes"] if v.get("configMap", {}).get("name") ==
                  config_map["metadata"]["name"])
    mount = next(m for m in _containers(head)[0]["volumeMounts"] if m["name"] == volume["name"])
    directory, filename = config_path.rsplit("/", 1)
    assert directory == mount["mountPath"] and filename in config_map["data"]
    job_spec = parse_spec(yaml.safe_load(config_map["data"][filename]))
    assert job_spec.kind == argv[1]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RDEIC_LOG_FORMAT"] == "json"
    assert not any(re.search("(?i)secret|token|password", k) for k in runtime_env["env_vars"])


def test_rayjob_entrypoint_parses_like_the_cli_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = {d["kind"]: d for d in _docs("rayjob.yaml")}
    argv = shlex.split(docs["RayJob"]["spec"]["entrypoint"])
    config_path = argv[argv.index("--config") + 1]
    local = tmp_path / config_path.lstrip("/")
    local.parent.mkdir(parents=True)
    local.write_text(docs["ConfigMap"]["data"][Path(config_path).name])
    argv[argv.index("--config") + 1] = str(local)
    args, status = resolve_args(argv[1:])
    assert status is None and args is not None
    assert args.output.startswith("s3://") and args.executor == "ray" and args.model.startswith("/models/")


# ------------------------------------------------------------------------------------ cluster launcher
@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "cluster" / "aws-gpu.yaml").read_text())


def test_cluster_launcher_config_passes_rays_own_validation(launcher: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(json.loads(json.dumps(launcher))))  # Ray's JSON schema + its checks
    broken = json.loads(json.dumps(launcher))
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(Exception, match="not of type 'integer'"):
        validate_config(prepare_config(broken))


def test_cluster_launcher_has_a_gpu_node_type_running_the_image(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] <= launcher["max_workers"] for t in gpu)
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    docker = launcher["docker"]
    assert docker["image"] == IMAGE
    assert "--gpus all" in docker["worker_run_options"]
    assert "-e RAY_AUTH_MODE=token" in docker["run_options"]
    token_target = next(k for k, v in launcher["file_mounts"].items() if v.endswith(".ray/auth_token"))
    assert f"-e RAY_AUTH_TOKEN_PATH={token_target}" in docker["run_options"]
    assert any("ray start --head" in c for c in launcher["head_start_ray_commands"])


def test_readme_covers_every_file() -> None:
    readme = (INFRA / "README.md").read_text()
    for path in ("Dockerfile", "docker-entrypoint.sh", "kuberay/rayjob.yaml", "kuberay/raycluster.yaml",
                 "cluster/aws-gpu.yaml"):
        assert f"`{path}`" in readme
        assert (INFRA / path).is_file()
    assert IMAGE in readme and "python:3.11-slim" in readme
