"""Two writers on one output prefix: the output lease (``pipeline.lease``, ``<output>/_lease.json``).

Real archive jobs (local executor, the tiny codec with random weights) on real-photo shards, in
moto (conditional PUTs) and on local paths (``flock``): two jobs started at once, one is refused
with exit status 75 naming the holder, and ``rdeic verify`` finds every key exactly once; a stale
lease (expired, or of a process that is gone) is taken over; ``--break-lease`` works; a job whose
lease is taken from it stops before its next write. Below them, the lease protocol itself: one
winner among simultaneous acquirers on each kind of store, the heartbeat, a lost acknowledgement,
a store that ignores conditional headers, and acquisition through a flaky store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jobs.cli import main
from jobs.commands.archive import ArchiveJob, run_archive
from jobs.commands.verify import verify_archive
from jobs.exits import EXIT_LEASE
from pipeline import lease as lease_mod
from pipeline.executors.local import LocalExecutor
from pipeline.lease import (
    LeaseHeldError,
    LeaseLostError,
    LocalLockedStore,
    OutputLease,
    ReadBackStore,
    S3ConditionalStore,
    make_store,
    read_lease,
)
from pipeline.manifest import OutputLocation
from pipeline.progress import NullProgress
from tests.pipeline.conftest import TEST_MAX_PIXELS, ShardSpec, build_shard_specs
from tests.pipeline.faults.flaky_proxy import FlakyS3Proxy

BUCKET = "two-writers"


@pytest.fixture(scope="module")
def specs(small_photo_paths) -> list[ShardSpec]:
    return build_shard_specs(small_photo_paths, n_shards=3, photos_per_shard=2)


def _local_inputs(root: Path, specs: list[ShardSpec]) -> str:
    (root / "in").mkdir(parents=True, exist_ok=True)
    for spec in specs:
        (root / "in" / f"{spec.name}.tar").write_bytes(spec.tar_bytes())
    return str(root / "in" / f"shard-{{000000..{len(specs) - 1:06d}}}.tar")


def _argv(pattern: str, out: str, model: Path, *extra: str) -> list[str]:
    return ["archive", "--input", pattern, "--output", out, "--model", str(model), "--executor", "local",
            "--max-pixels", str(TEST_MAX_PIXELS), "--batch-size", "4", "--no-progress", *extra]


class _GatedExecutor:
    """The local executor, started only once ``go`` is set: the job holds the lease meanwhile."""

    def __init__(self, go: threading.Event) -> None:
        self.go = go

    def run(self, plan, progress):
        assert self.go.wait(120), "the test never opened the gate"
        return LocalExecutor(device="cpu").run(plan, progress)


def _foreign_lease(out: OutputLocation, expires_in: float, **fields: Any) -> dict[str, Any]:
    """A lease record of a job on another machine, written straight into the output."""
    now = time.time()
    record = {"lease_format": 1, "owner": "archive:deadbeef@other-host:4242", "token": "f" * 32, "job": "archive",
              "run_id": "deadbeef", "host": "other-host", "pid": 4242, "boot_id": "another-boot", "pid_ns": 1,
              "started": lease_mod._iso(now - 600), "heartbeat": lease_mod._iso(now - 5),
              "expires": lease_mod._iso(now + expires_in), "expires_unix": now + expires_in, "ttl_s": 60.0,
              "heartbeat_s": 10.0, "renewals": 59, "mode": "conditional-put", "released": None, "took_over": None}
    record.update(fields)
    out.fs.makedirs(out.root, exist_ok=True)
    out.fs.pipe_file(out.lease_path(), (json.dumps(record) + "\n").encode())
    return record


# ------------------------------------------------------------------------------------ whole jobs
@pytest.mark.s3
def test_two_archive_jobs_at_once_one_is_refused_and_every_key_is_archived_once(
        s3_server, specs, tiny_model_dir, capsys: pytest.CaptureFixture[str]) -> None:
    fs = s3_server.make_bucket(BUCKET)
    for spec in specs:
        fs.pipe(f"{BUCKET}/src/{spec.name}.tar", spec.tar_bytes())
    sources = f"s3://{BUCKET}/src/shard-{{000000..000002}}.tar"
    out_url = f"s3://{BUCKET}/out"
    job = ArchiveJob(inputs=(sources,), output=out_url, model=str(tiny_model_dir), executor="local",
                     storage_options=s3_server.storage_options, max_pixels=TEST_MAX_PIXELS, batch_size=4)
    go, start = threading.Event(), threading.Barrier(2)
    results: dict[str, Any] = {}
    refused = threading.Event()

    def run(name: str) -> None:
        start.wait()
        try:
            results[name] = run_archive(job, executor=_GatedExecutor(go))
        except LeaseHeldError as exc:
            results[name] = exc
            refused.set()

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    assert refused.wait(120), "neither job was refused"
    holder = read_lease(OutputLocation(out_url, s3_server.storage_options))
    assert holder is not None and holder["free_because"] is None and holder["mode"] == "conditional-put"

    # a third job from the command line, while the winner still holds the prefix: exit status 75
    capsys.readouterr()
    argv = ["archive", "--input", sources, "--output", out_url, "--model", str(tiny_model_dir), "--executor", "local",
            "--storage-options", json.dumps(s3_server.storage_options), "--max-pixels", str(TEST_MAX_PIXELS),
            "--no-progress"]
    assert main(argv) == EXIT_LEASE
    err = capsys.readouterr().err
    assert "another job holds its lease" in err and holder["owner"] in err and holder["expires"] in err
    assert "--break-lease" in err

    go.set()
    for t in threads:
        t.join(180)
    outcomes = sorted(results.values(), key=lambda r: isinstance(r, LeaseHeldError))
    assert len(outcomes) == 2 and isinstance(outcomes[1], LeaseHeldError), results
    winner = outcomes[0]
    assert winner.exit_code == 0 and winner.summary["shards"]["done_this_run"] == 3
    assert holder["run_id"] == winner.summary["run_id"] and holder["run_id"] in str(outcomes[1])

    report = verify_archive(out_url, sources, s3_server.storage_options)
    assert report.clean, report.problems
    assert report.count("missing") == 0 and report.count("duplicate") == 0
    assert report.archive_rows == report.source_keys == sum(len(s.expect) for s in specs)
    after = read_lease(OutputLocation(out_url, s3_server.storage_options))
    assert after is not None and after["released"] and after["free_because"] == "released"

    assert main(argv) == 0  # the lease was released: the next run goes ahead (and has nothing to do)
    assert "(0 this run, 3 before)" in capsys.readouterr().out


def test_an_expired_lease_of_a_dead_job_is_taken_over(tmp_path: Path, specs, tiny_model_dir,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pattern, out = _local_inputs(tmp_path, specs[:1]), tmp_path / "out"
    stale = _foreign_lease(OutputLocation(str(out)), expires_in=-30)
    assert main(_argv(pattern, str(out), tiny_model_dir)) == 0
    text = capsys.readouterr().out
    assert f"took over the output's lease from {stale['owner']} (expired)" in text
    summary = json.loads((out / "_manifest" / "summary.json").read_text())
    assert summary["lease"]["took_over"]["why"] == "expired" and summary["lease"]["mode"] == "local-lock"
    assert summary["lease"]["took_over"]["run_id"] == "deadbeef"


def test_the_lease_of_a_process_gone_from_this_machine_is_taken_over(
        tmp_path: Path, specs, tiny_model_dir, capsys: pytest.CaptureFixture[str]) -> None:
    """A driver killed with SIGKILL leaves an unexpired lease; on the same machine the rerun sees its
    process is gone and goes ahead at once (tests/jobs/test_archive_e2e.py relies on it)."""
    pattern, out = _local_inputs(tmp_path, specs[:1]), tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lease(OutputLocation(str(out)), expires_in=3600, pid=dead.pid, **lease_mod._node())
    assert main(_argv(pattern, str(out), tiny_model_dir)) == 0
    assert "(holder process gone)" in capsys.readouterr().out


def test_a_live_lease_is_only_broken_with_break_lease(tmp_path: Path, specs, tiny_model_dir,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pattern, out = _local_inputs(tmp_path, specs[:1]), tmp_path / "out"
    live = _foreign_lease(OutputLocation(str(out)), expires_in=3600)
    assert main(_argv(pattern, str(out), tiny_model_dir)) == EXIT_LEASE
    err = capsys.readouterr().err
    assert live["owner"] in err and "other-host" in err and live["expires"] in err and "--break-lease" in err
    assert not (out / "run.json").exists() and not (out / "job.yaml").exists(), "a refused job writes nothing"
    assert json.loads((out / "_lease.json").read_text())["token"] == live["token"]

    assert main(_argv(pattern, str(out), tiny_model_dir, "--break-lease")) == 0
    assert "(broken (--break-lease))" in capsys.readouterr().out
    assert "break_lease" not in (out / "job.yaml").read_text(), "a saved spec must never break a lease"
    record = json.loads((out / "_lease.json").read_text())
    assert record["released"] and record["took_over"]["owner"] == live["owner"]


class _Intruder(NullProgress):
    """After the first shard is done, another job breaks the lease (as `--break-lease` would)."""

    def __init__(self, out: OutputLocation) -> None:
        self.out, self.lease = out, None

    def shard_done(self, stats) -> None:
        if self.lease is None:
            self.lease = OutputLease(OutputLocation(self.out.url), "archive", "intruder", break_lease=True)
            self.lease.acquire()


def test_a_job_whose_lease_is_taken_stops_before_its_next_write(tmp_path: Path, specs,
                                                                tiny_model_dir) -> None:
    pattern, out = _local_inputs(tmp_path, specs), tmp_path / "out"
    job = ArchiveJob(inputs=(pattern,), output=str(out), model=str(tiny_model_dir), executor="local",
                     max_pixels=TEST_MAX_PIXELS, batch_size=4, device="cpu")
    sink = _Intruder(OutputLocation(str(out)))
    with pytest.raises(LeaseLostError, match="no longer holds its lease.*intruder"):
        run_archive(job, progress=sink)
    assert [p.name for p in (out / "_manifest" / "done").glob("*.json")] == ["shard-000000.json"]
    assert [p.name for p in (out / "archive").glob("*.parquet")] == ["shard-000000.parquet"]
    assert not (out / "_manifest" / "summary.json").exists()
    record = json.loads((out / "_lease.json").read_text())
    assert record["run_id"] == "intruder" and not record["released"], "the loser left the new holder's lease alone"


# ------------------------------------------------------------------------------------ the protocol
def _race(make: Any, n: int = 6) -> tuple[list[OutputLease], list[BaseException]]:
    barrier = threading.Barrier(n)
    won: list[OutputLease] = []
    lost: list[BaseException] = []

    def one(i: int) -> None:
        lease = make(i)
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except BaseException as exc:  # noqa: BLE001 - every loser's error is what the test looks at
            lost.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, lost


@pytest.mark.parametrize("mode", ["conditional-put", "local-lock", "read-back"])
def test_one_winner_among_simultaneous_acquirers(mode: str, tmp_path: Path, s3_server) -> None:
    if mode == "conditional-put":
        s3_server.make_bucket("lease-race")
        url, options = "s3://lease-race/out", s3_server.storage_options
    else:
        url, options = str(tmp_path / "out"), {}

    def make(i: int) -> OutputLease:
        out = OutputLocation(url, options)
        store = ReadBackStore(out.fs, out.lease_path(), settle_s=0.5) if mode == "read-back" else None
        return OutputLease(out, "archive", f"run{i}", store=store)

    won, lost = _race(make)
    assert len(won) == 1 and len(lost) == 5, lost
    assert all(isinstance(e, LeaseHeldError) and won[0].owner in str(e) for e in lost), lost
    assert won[0].store.mode == mode
    record = read_lease(OutputLocation(url, options))
    assert record["token"] == won[0].token


def test_the_heartbeat_keeps_a_lease_past_its_ttl_and_release_frees_it(tmp_path: Path) -> None:
    out = OutputLocation(str(tmp_path / "out"))
    with OutputLease(out, "archive", "keeper", ttl_s=0.8, heartbeat_s=0.15) as held:
        time.sleep(1.5)  # almost twice the TTL: only the heartbeat keeps it
        with pytest.raises(LeaseHeldError, match="keeper"):
            OutputLease(OutputLocation(out.url), "archive", "late").acquire()
        out.check_lease()
        assert held.describe()["renewals"] >= 4
    late = OutputLease(OutputLocation(out.url), "archive", "late")
    late.acquire()
    assert late.took_over["why"] == "released" and late.took_over["run_id"] == "keeper"


def test_a_renewal_that_finds_another_holder_marks_the_lease_lost(tmp_path: Path) -> None:
    out = OutputLocation(str(tmp_path / "out"))
    first = OutputLease(out, "archive", "first", ttl_s=60, heartbeat_s=10)
    first.acquire()
    out.lease = first.ref
    OutputLease(OutputLocation(out.url), "archive", "second", break_lease=True).acquire()
    assert first.renew() is False and first.lost["run_id"] == "second"
    with pytest.raises(LeaseLostError, match="second"):
        first.raise_if_lost()
    with pytest.raises(LeaseLostError, match="second"):
        out.check_lease()
    first.release()  # must not touch the new holder's record
    assert read_lease(out)["run_id"] == "second" and not read_lease(out)["released"]


class _LostAnswers:
    """A store that executes each write but answers as if the retried request failed its condition
    (the first PUT done, its answer lost, botocore's retry refused with 412)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.mode = inner, inner.mode

    def read(self):
        return self.inner.read()

    def create(self, data: bytes, verify: bool = True) -> None:
        self.inner.create(data, verify)

    def replace(self, data: bytes, version: str, verify: bool = True) -> None:
        self.inner.replace(data, version, verify)


def test_a_lost_acknowledgement_is_recognised_as_our_own_write(tmp_path: Path) -> None:
    out = OutputLocation(str(tmp_path / "out"))
    lease = OutputLease(out, "archive", "mine", store=_LostAnswers(LocalLockedStore(out.lease_path())))
    lease.acquire()
    assert lease.renew() and read_lease(out)["renewals"] == 1 and read_lease(out)["token"] == lease.token
    lease.release()
    assert read_lease(out)["released"]


@pytest.mark.s3
def test_a_store_that_ignores_conditional_headers_falls_back_to_read_back(s3_server,
                                                                          monkeypatch) -> None:
    s3_server.make_bucket("no-cas")
    out = OutputLocation("s3://no-cas/out", s3_server.storage_options)
    assert isinstance(make_store(out), S3ConditionalStore)  # moto honours If-None-Match / If-Match

    real_put = S3ConditionalStore._put

    def ignoring(self, data, key=None, **condition):  # the store drops the headers
        return real_put(self, data, key=key)

    monkeypatch.setattr(S3ConditionalStore, "_put", ignoring)
    store = make_store(out, settle_s=0.1)
    assert isinstance(store, ReadBackStore)
    out.fs.invalidate_cache()
    assert out.fs.find("no-cas") == [], "the probes clean up after themselves"


@pytest.mark.s3
def test_the_lease_is_taken_kept_and_released_through_a_flaky_store(s3_server) -> None:
    s3_server.make_bucket("flaky-lease")
    with FlakyS3Proxy(s3_server.endpoint, rate=0.2, seed=11) as proxy:
        # resets on the lease's PUTs: half of them after moto executed the PUT (the answer lost)
        proxy.force(["reset", "reset", "internal", "reset", "slowdown", "reset"], method="PUT",
                    match=lambda r: r.path.endswith("/out/_lease.json"))
        out = OutputLocation("s3://flaky-lease/out", proxy.storage_options)
        with OutputLease(out, "archive", "flaky", ttl_s=30, heartbeat_s=0.2) as held:
            time.sleep(2.0)
            out.check_lease()
            with pytest.raises(LeaseHeldError):
                OutputLease(OutputLocation(out.url, proxy.storage_options), "archive", "other").acquire()
        assert held.lost is None and held.describe()["renewals"] >= 1
        assert proxy.pending_forced() == 0 and proxy.counts["reset"] >= 4
        # with this seed one reset comes after moto executed a PUT: recognised by reading the record back
        assert held.describe()["recovered_writes"] >= 1
    record = read_lease(OutputLocation("s3://flaky-lease/out", s3_server.storage_options))
    assert record["token"] == held.token and record["released"]


def test_what_workers_carry_survives_pickling(tmp_path: Path) -> None:
    """Ray ships the output location (with the lease reference) to every actor, and a lost lease back."""
    import pickle

    from pipeline.executors.errors import FatalShardError

    out = OutputLocation(str(tmp_path / "out"))
    with OutputLease(out, "archive", "pickled") as held:
        copy = pickle.loads(pickle.dumps(out))
        assert copy.lease == held.ref
        copy.check_lease()
    with pytest.raises(LeaseLostError, match="released"):
        copy.check_lease()  # the job ended: its workers must not write any more
    error = pickle.loads(pickle.dumps(LeaseLostError("lost to someone")))
    assert isinstance(error, FatalShardError) and str(error) == "lost to someone"
