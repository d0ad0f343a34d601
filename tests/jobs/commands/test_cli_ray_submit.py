"""`rdeic submit` / `rdeic job` against a real Ray cluster: `ray start --head` on loopback, started by
this module with its own HOME/RAY_TMPDIR/ports and token authentication on.

The cluster shares this venv (the job runs `python -m jobs.cli archive --config ...` from an uploaded
working dir holding only the spec), so `--no-pip`. Fake S3 credentials go into the job's runtime env
and must appear in none of the submit command's output or the job's logs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.jobs.commands.conftest import REPO_ROOT, TEST_MAX_PIXELS, Shards, write_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEID7QZ3",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-0c4f9e2a7b/9x+Q",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEFAKEsession77",
}
VENV_BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(leader: int) -> list[int]:
    """Processes of the session `ray start` leads (its raylet, GCS, dashboard, workers, job drivers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == leader:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


@dataclass(frozen=True)
class RayHead:
    address: str
    token: str
    root: Path

    def client_env(self, **extra: str) -> dict[str, str]:
        """A submitter's environment: no Ray variables of this machine, a HOME without a token file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        home = self.root / "client-home"
        home.mkdir(exist_ok=True)
        env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO_ROOT),
                   RDEIC_LOG_FORMAT="text")
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # short paths: Ray's unix sockets live under RAY_TMPDIR and must stay under ~100 characters
    root = Path(tempfile.mkdtemp(prefix="rdeic-ray-", dir="/tmp"))
    (root / "home").mkdir()
    (root / "tmp").mkdir()
    token = secrets.token_hex(16)
    (root / "token").write_text(token)
    gcs, dash, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(root / "home"), RAY_TMPDIR=str(root / "tmp"), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(root / "token"), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO_ROOT),
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--include-dashboard=true",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
           f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]
    log = (root / "ray-start.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{(root / 'ray-start.log').read_text()[-3000:]}")
            try:
                r = requests.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray dashboard not up after 120 s:\n{(root / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
        # token auth really is on: without the token the dashboard refuses
        assert requests.get(f"{address}/api/version", timeout=5).status_code == 401
        yield RayHead(address, token, root)
    finally:
        pids = _session_pids(proc.pid)
        for pid in pids:
            with _ignore_gone():
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.25)
        for pid in pids:
            with _ignore_gone():
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


class _ignore_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type in (ProcessLookupError, PermissionError)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _rdeic(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_submit_an_archive_job_stream_its_logs_and_keep_secrets_out(ray_head: RayHead, cli_shards: Shards,
                                                                   tiny_model_dir: Path, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    out = tmp_path / "out"
    spec = write_spec(wd / "archive.yaml", f"""\
archive:
  input: {cli_shards.pattern}
  output: {out}
  model: {tiny_model_dir}
  executor: ray
  num_actors: 1
  batch_size: 4
  max_pixels: {TEST_MAX_PIXELS}
submit:
  address: {ray_head.address}
  pip: false
  metadata: {{purpose: loopback-test}}
""")
    env = ray_head.client_env(RAY_AUTH_TOKEN=ray_head.token, **FAKE_AWS)
    run = _rdeic(env, "submit", str(spec), "--working-dir", str(wd), "--", "--no-progress")
    assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    job_id = run.stdout.strip().splitlines()[-1]
    assert job_id.startswith("rdeic-archive-")
    assert f"submitted archive job {job_id} to {ray_head.address}" in run.stderr
    assert f"job {job_id}: SUCCEEDED" in run.stderr

    # the driver's logs were streamed: the job's per-shard JSON events and its summary
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"ts"')]
    done = sorted(e["shard"] for e in events if e.get("event") == "shard_done")
    assert done == sorted(s.name for s in cli_shards.specs)
    assert "3/3 shards done (3 this run, 0 before)" in run.stdout
    assert sorted(p.stem for p in (out / "_manifest/done").glob("*.json")) == done

    # the credentials reached the job's runtime env, but no output shows them
    from jobs.commands.submit import make_client

    info = make_client(ray_head.address, {"RAY_AUTH_TOKEN": ray_head.token}).get_job_info(job_id)
    for name, value in FAKE_AWS.items():
        assert info.runtime_env["env_vars"][name] == value
    assert info.metadata["purpose"] == "loopback-test" and info.metadata["rdeic.kind"] == "archive"
    status = _rdeic(ray_head.client_env(RAY_AUTH_TOKEN_PATH=str(ray_head.root / "token")), "job", "status", job_id,
                    "--address", ray_head.address, "--json")
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["status"] == "SUCCEEDED" and "AWS_SECRET_ACCESS_KEY" in summary["env_var_names"]
    logs = _rdeic(ray_head.client_env(RAY_AUTH_TOKEN=ray_head.token), "job", "logs", job_id,
                  "--address", ray_head.address)
    assert logs.returncode == 0 and '"event": "shard_done"' in logs.stdout
    for value in (*FAKE_AWS.values(), ray_head.token):
        for where, text in (("submit stdout", run.stdout), ("submit stderr", run.stderr),
                            ("job status", status.stdout), ("job logs", logs.stdout)):
            assert value not in text, f"secret leaked into {where}"

    # progress from the output location alone
    st = _rdeic(ray_head.client_env(), "status", str(out), "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "complete"


def test_missing_or_wrong_token_is_refused(ray_head: RayHead, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "a.yaml", "archive: {input: [x.tar], output: /tmp/none}\nsubmit: {pip: false}\n")
    for extra in ({}, {"RAY_AUTH_TOKEN": "not-the-token"}):
        run = _rdeic(ray_head.client_env(**extra), "submit", str(spec), "--working-dir", str(tmp_path),
                     "--address", ray_head.address, timeout=120)
        assert run.returncode == 3, run.stderr
        assert "token authentication" in run.stderr and "RAY_AUTH_TOKEN" in run.stderr
        assert ray_head.token not in run.stderr + run.stdout


def test_stop_a_running_job(ray_head: RayHead) -> None:
    from jobs.commands.submit import make_client

    client = make_client(ray_head.address, {"RAY_AUTH_TOKEN": ray_head.token})
    job_id = client.submit_job(entrypoint=f"{sys.executable} -c \"import time; print('working', flush=True); "
                                          f"time.sleep(600)\"")
    deadline = time.monotonic() + 120
    while str(client.get_job_status(job_id)).rsplit(".", 1)[-1] != "RUNNING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    env = ray_head.client_env(RAY_AUTH_TOKEN=ray_head.token)
    running = _rdeic(env, "job", "status", job_id, "--address", ray_head.address)
    assert running.returncode == 0 and f"job {job_id}: RUNNING" in running.stdout

    stop = _rdeic(env, "job", "stop", job_id, "--address", ray_head.address, "--wait", "60", timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == f"job {job_id}: STOPPED"
    after = _rdeic(env, "job", "status", job_id, "--address", ray_head.address, "--json")
    assert after.returncode == 1 and json.loads(after.stdout)["status"] == "STOPPED"
    listed = _rdeic(env, "job", "list", "--address", ray_head.address, "--json")
    assert any(j["job_id"] == job_id and j["status"] == "STOPPED" for j in json.loads(listed.stdout))


def test_job_logs_are_redacted_even_when_the_job_prints_a_secret(ray_head: RayHead) -> None:
    from jobs.commands.submit import make_client, wait_terminal

    client = make_client(ray_head.address, {"RAY_AUTH_TOKEN": ray_head.token})
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} -c \"import os; print('key is', os.environ['AWS_SECRET_ACCESS_KEY'])\"",
        runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": FAKE_AWS["AWS_SECRET_ACCESS_KEY"]}})
    assert wait_terminal(client, ray_head.address, job_id, timeout_s=120) == "SUCCEEDED"
    assert FAKE_AWS["AWS_SECRET_ACCESS_KEY"] in client.get_job_logs(job_id)  # the raw log has it
    for follow in ([], ["--follow"]):
        logs = _rdeic(ray_head.client_env(RAY_AUTH_TOKEN=ray_head.token, **FAKE_AWS), "job", "logs", job_id,
                      "--address", ray_head.address, *follow)
        assert logs.returncode == 0, logs.stderr
        assert "key is ***" in logs.stdout and FAKE_AWS["AWS_SECRET_ACCESS_KEY"] not in logs.stdout
