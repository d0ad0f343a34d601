"""A whole Ray node lost mid-job: the archive still finishes, every key exactly once.

A two-node Ray cluster runs on this machine (``tests/pipeline/faults/two_node_cluster.py``: Ray's own
``ray.cluster_utils.Cluster``, head + worker, each with its own raylet and object store). The
archive driver runs as a separate process attached to the head. As soon as the actor on the
worker node has finished its first shard (so it is in the middle of its next one), every process
of the worker node is SIGKILLed.

* ``test_archive_survives_a_lost_node``: ``rdeic archive`` with two actors, which the executor
  spreads over both nodes. The shard in flight on the lost node fails as "worker died", goes
  back to the queue and is redone from scratch (its marker says attempt 2); the job ends with exit
  status 0, and ``verify_archive`` finds every source key exactly once (0 missing, 0 duplicated,
  0 unexpected) with every source hash matching. Ray restarts the lost actor on the head (which has
  a free CPU) once the node is declared dead; if it is back before the last shard it takes shards
  again, and it must be on the head.
* ``test_no_room_to_restart_fails_the_rest_then_a_rerun_completes``: the head has no CPU for a
  worker actor, so the lost node's actor cannot come back. The driver waits ``restart_timeout_s``
  for it (not forever), records the remaining shards under ``_manifest/failed/`` (exit status 1);
  once a node joins again, rerunning the same command completes the archive, every key once.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.commands.verify import verify_archive
from tests.pipeline.conftest import TEST_MAX_PIXELS, build_shard_specs

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[3]
BUCKET = "lostnode"
RESTART_TIMEOUT_S = 5.0

# The driver of the second test: run_archive with a Ray executor that waits only briefly for a restart.
SHORT_RESTART_DRIVER = """
import json, sys
from jobs.commands.archive import ArchiveJob, run_archive
from jobs.logs import StructuredProgress, configure_logging
from pipeline.executors.ray import RayExecutor
configure_logging("INFO", "json")
job, executor = json.loads(sys.argv[1]), json.loads(sys.argv[2])
outcome = run_archive(ArchiveJob(**{**job, "inputs": tuple(job["inputs"])}), progress=StructuredProgress(),
                      executor=RayExecutor(**executor))
print(json.dumps({"event": "outcome", "exit_code": outcome.exit_code, "shards": outcome.summary["shards"]}))
sys.exit(outcome.exit_code)
"""


class Process:
    """A child process whose output is read line by line in a thread (so waiting on it can time out)."""

    def __init__(self, cmd: list[str], env: dict[str, str], stdin: bool = False) -> None:
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT if not stdin else subprocess.DEVNULL,
                                     stdin=subprocess.PIPE if stdin else None)
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def line(self, timeout: float) -> str | None:
        """The next line, or None at the end of the output; AssertionError after ``timeout`` s."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output for {timeout:.0f}s; so far:\n" + "\n".join(self.seen[-40:])) from None
        if line is not None:
            self.seen.append(line)
        return line

    def send(self, command: str, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.line(timeout)
        assert line is not None, f"{command}: the process ended"
        return json.loads(line)

    def finish(self, timeout: float = 180) -> int:
        while self.line(timeout) is not None:
            pass
        return self.proc.wait(timeout=30)

    def events(self) -> list[dict[str, Any]]:
        return [e for e in map(_json, self.seen) if e]

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # Ray's reaper ends a node's processes when their parent dies
            self.proc.wait()


def _json(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


@pytest.fixture
def env(s3_server) -> dict[str, str]:
    return os.environ | {"AWS_ENDPOINT_URL": s3_server.endpoint, "RAY_AUTH_MODE": "disabled",
                         "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture
def two_nodes(env: dict[str, str]) -> Iterator[Callable[..., tuple[Process, dict[str, str]]]]:
    """``two_nodes(head_cpus=2)`` -> (the cluster's process, {"address", "head", "worker"}).

    The cluster gets a Ray temp dir of its own (see two_node_cluster.py), removed afterwards.
    """
    started: list[tuple[Process, str]] = []

    def start(head_cpus: int = 2) -> tuple[Process, dict[str, str]]:
        tmp = tempfile.mkdtemp(prefix="rdeic-ray-")
        proc = Process([sys.executable, "-m", "tests.pipeline.faults.two_node_cluster", "--head-cpus", str(head_cpus)],
                       env | {"RAY_TMPDIR": tmp}, stdin=True)
        started.append((proc, tmp))
        info = _json(proc.line(timeout=120) or "")
        assert info.get("address"), "the two-node cluster did not start"
        return proc, info

    yield start
    for proc, tmp in started:
        proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _shards(s3_server, prefix: str, n: int, small_photo_paths: list[Path]) -> tuple[str, set[str]]:
    specs = build_shard_specs(small_photo_paths, n_shards=n, photos_per_shard=2)
    fs = s3_server.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    for spec in specs:
        fs.pipe(f"{BUCKET}/{prefix}/src/{spec.name}.tar", spec.tar_bytes())
    return (f"s3://{BUCKET}/{prefix}/src/shard-{{000000..{n - 1:06d}}}.tar",
            {f"{s.name}/{k}" for s in specs for k in s.expect})


def _cli(sources: str, out: str, model: Path, address: str, actors: int) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "--log-level", "INFO", "--log-format", "json", "archive",
            "--input", sources, "--output", out, "--model", str(model), "--executor", "ray",
            "--num-actors", str(actors), "--ray-address", address, "--max-pixels", str(TEST_MAX_PIXELS),
            "--batch-size", "1", "--no-progress"]


def _kill_worker_node_mid_shard(driver: Process, cluster: Process, nodes: dict[str, str],
                                actors: int) -> str:
    """Wait until the actors are ready (on the nodes expected) and the worker node's actor has
    finished a shard, then lose the worker node. Returns the victim actor's name."""
    ready: dict[str, str] = {}
    victim = None
    while True:
        line = driver.line(timeout=180)
        assert line is not None, "the driver ended before the node could be killed:\n" + "\n".join(driver.seen)
        event = _json(line)
        if event.get("event") == "worker_ready":
            ready[event["worker"]] = event["node"]
            if len(ready) == actors:
                want = {nodes["head"], nodes["worker"]} if actors > 1 else {nodes["worker"]}
                assert set(ready.values()) == want, (ready, nodes)  # spread over both nodes
                victim = next(w for w, n in ready.items() if n == nodes["worker"])
        elif event.get("event") == "shard_done" and victim and event["worker"] == victim:
            break  # the victim has just been handed its next shard
    assert cluster.send("kill-worker")["killed"] == nodes["worker"]
    return victim


def _check_exactly_once(s3_server, out: str, sources: str, expected: set[str]) -> None:
    report = verify_archive(out, [sources], s3_server.storage_options)
    assert report.clean, report.problems
    assert report.count("missing") == report.count("duplicate") == report.count("unexpected") == 0
    assert report.source_keys == report.archive_rows == len(expected)
    assert report.hashes_checked == report.hashes_matched > 0
    assert report.shards_not_done == [] and report.leftover_files == []


def test_archive_survives_a_lost_node(s3_server, env, two_nodes, small_photo_paths,
                                      tiny_model_dir) -> None:
    t0 = time.monotonic()
    n = 8
    cluster, nodes = two_nodes(head_cpus=2)
    sources, expected = _shards(s3_server, "survive", n, small_photo_paths)
    out = f"s3://{BUCKET}/survive/out"
    driver = Process(_cli(sources, out, tiny_model_dir, nodes["address"], actors=2), env)
    try:
        victim = _kill_worker_node_mid_shard(driver, cluster, nodes, actors=2)
        t_killed = time.monotonic()
        assert driver.finish() == 0, "\n".join(driver.seen[-60:])
    finally:
        driver.stop()
    t_done = time.monotonic()

    events = driver.events()
    died = [e for e in events if e.get("event") == "shard_failed" and f"worker {victim} died" in e.get("error", "")]
    assert len(died) == 1 and died[0]["will_retry"], [e for e in events if e.get("event") == "shard_failed"]
    lost_shard = died[0]["shard"]
    done = {e["shard"]: e for e in events if e.get("event") == "shard_done"}
    assert sorted(done) == [f"shard-{i:06d}" for i in range(n)]
    assert done[lost_shard]["attempt"] == 2, done[lost_shard]  # redone from scratch after the loss
    back = [e for e in events if e.get("event") == "worker_back"]
    for e in back:  # an actor that came back was restarted on the surviving node
        assert e["worker"] == victim and e["node"] == nodes["head"], e
    assert any(f"{n}/{n} shards done ({n} this run, 0 before), 0 failed" in line for line in driver.seen)

    fs = s3_server.filesystem()
    markers = {p.rsplit("/", 1)[-1][:-5]: json.loads(fs.cat(p)) for p in fs.ls(f"{BUCKET}/survive/out/_manifest/done")}
    assert sorted(markers) == sorted(done) and markers[lost_shard]["attempt"] == 2
    assert not fs.exists(f"{BUCKET}/survive/out/_manifest/failed")
    _check_exactly_once(s3_server, out, sources, expected)
    print(f"\nlost node: killed {t_killed - t0:.1f}s into the test, job done {t_done - t_killed:.1f}s later, "
          f"{lost_shard} redone, lost actor back on the head before the end: {bool(back)}")


def test_no_room_to_restart_fails_the_rest_then_a_rerun_completes(s3_server, env, two_nodes,
                                                                   small_photo_paths, tiny_model_dir) -> None:
    n = 6
    cluster, nodes = two_nodes(head_cpus=0)  # the only CPU is on the worker node
    sources, expected = _shards(s3_server, "noroom", n, small_photo_paths)
    out = f"s3://{BUCKET}/noroom/out"
    job = {"inputs": [sources], "output": out, "model": str(tiny_model_dir), "executor": "ray",
           "storage_options": s3_server.storage_options, "max_pixels": TEST_MAX_PIXELS, "batch_size": 1}
    executor = {"num_actors": 1, "address": nodes["address"], "restart_timeout_s": RESTART_TIMEOUT_S}
    driver = Process([sys.executable, "-c", SHORT_RESTART_DRIVER, json.dumps(job), json.dumps(executor)], env)
    try:
        victim = _kill_worker_node_mid_shard(driver, cluster, nodes, actors=1)
        t_killed = time.monotonic()
        assert driver.finish() == 1, "\n".join(driver.seen[-60:])
    finally:
        driver.stop()
    waited = time.monotonic() - t_killed
    events = driver.events()
    assert [e["worker"] for e in events if e.get("event") == "worker_given_up"] == [victim]
    assert [e for e in events if e.get("event") == "shard_failed" and f"worker {victim} died" in e["error"]]
    outcome = next(e for e in events if e.get("event") == "outcome")
    done_first = outcome["shards"]["done_this_run"]
    assert 1 <= done_first < n and outcome["shards"]["failed"] == n - done_first, outcome
    assert RESTART_TIMEOUT_S <= waited < RESTART_TIMEOUT_S + 60

    fs = s3_server.filesystem()
    failed = fs.ls(f"{BUCKET}/noroom/out/_manifest/failed")
    assert len(failed) == n - done_first
    assert all("no worker actor left" in json.loads(fs.cat(p))["error"] for p in failed)

    # the cluster grows back; the same command does the rest
    assert cluster.send("add-worker")["added"]
    rerun = subprocess.run(_cli(sources, out, tiny_model_dir, nodes["address"], actors=1), cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{n}/{n} shards done ({n - done_first} this run, {done_first} before), 0 failed" in rerun.stdout, \
        rerun.stdout
    assert not fs.exists(f"{BUCKET}/noroom/out/_manifest/failed") or not fs.ls(f"{BUCKET}/noroom/out/_manifest/failed")
    _check_exactly_once(s3_server, out, sources, expected)
