"""The archive driver at scale (issue 13, part C): CPU per shard, memory, and time to resume.

    python -m bench.driver_scale [--shards 20000] [--actors 4] [--write-docs]

What is real: the driver (``jobs.commands.archive.run_archive`` with the Ray executor), Ray (a local
cluster started by this script), the shards (one tiny tar per shard, one 8x8 PNG inside, read by
the real streaming reader), the Parquet files and the done markers, all in moto
(``demo/local_s3.py``, run in a child process so its request handling is not counted as driver
CPU). What is not: the codec. Workers load :class:`StubFactory`, whose encoder returns 16 bytes
per image, so a shard costs the workers only its I/O and the driver is the part under load.

Measured:

* **driver CPU per shard**: user + system CPU of the driver process (every thread: Ray's core
  worker, gRPC, s3fs's event loop included) while ``executor.run`` hands out the shards and
  collects their results, divided by the number of shards;
* **driver memory**: the driver's RSS sampled every 0.25 s with the number of finished shards,
  and the slope of RSS over finished shards (a least-squares fit over the second half of the run);
* **resume**: on the finished prefix, listing the done markers and computing the pending set
  (``Manifest.done_shards`` plus the set difference over the expanded input list), alone and
  as part of a whole rerun of ``run_archive`` (which also reads every marker for the summary).

Writes docs/benchmarks-driver.json with ``--write-docs`` (``bench.run`` renders it into
docs/benchmarks.md); prints the same JSON either way.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks-driver.json"
SRC_BUCKET, OUT_BUCKET = "src", "arch"


# ------------------------------------------------------------------------------- the stub codec
class StubEncoder:
    """16 bytes per image: the image's shape and a digest of its first row (never empty)."""

    fingerprint = hashlib.sha256(b"driver-scale stub codec").digest()
    device = "cpu"

    def encode(self, images: Any) -> list[bytes]:
        return [hashlib.blake2b(img[:1].tobytes(), digest_size=12).digest()
                + img.shape[0].to_bytes(2, "big") + img.shape[1].to_bytes(2, "big") for img in images]


@dataclass(frozen=True)
class StubFactory:
    """An encoder factory for :class:`StubEncoder` (pickled to the workers)."""

    def identity(self) -> Any:
        from pipeline.encoder import CodecIdentity

        fp = StubEncoder.fingerprint.hex()
        return CodecIdentity(name="stub", fingerprint=fp, entropy_table_digest=fp, codec_version="stub",
                             bitstream_version="stub")

    def load(self, device: str = "auto") -> StubEncoder:
        return StubEncoder()


# ------------------------------------------------------------------------------- helpers
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _tiny_shard(i: int) -> bytes:
    """A WebDataset tar holding one 8x8 PNG (a different one per shard)."""
    import tarfile

    from PIL import Image

    img = Image.new("RGB", (8, 8), ((i * 7) % 256, (i * 13) % 256, (i // 256) % 256))
    png = io.BytesIO()
    img.save(png, "PNG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo(f"img{i:06d}.png")
        info.size, info.mtime = len(png.getvalue()), 1_700_000_000
        tf.addfile(info, io.BytesIO(png.getvalue()))
    return buf.getvalue()


def _start_moto() -> tuple[subprocess.Popen, str]:
    """moto (demo.local_s3) in a child process; returns (process, endpoint)."""
    code = ("import sys; from demo.local_s3 import local_s3\n"
            "with local_s3() as s3:\n"
            "    print(s3.endpoint, flush=True)\n"
            "    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None  # stdout=PIPE
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith("http"):
        proc.kill()
        raise RuntimeError("moto did not start")
    return proc, endpoint


def _generate(fs: Any, n: int, threads: int) -> float:
    """Put n tiny shards into moto from a thread pool; returns seconds."""
    t0 = time.perf_counter()

    def put(i: int) -> None:
        fs.pipe_file(f"{SRC_BUCKET}/shards/{i:06d}.tar", _tiny_shard(i))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(n)))
    return time.perf_counter() - t0


class Sampler:
    """Samples (seconds, RSS, driver CPU, finished shards) every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.done = interval, 0
        self.samples: list[tuple[float, int, float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter() - self._t0, _rss_bytes(), _cpu_s(), self.done))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


# ------------------------------------------------------------------------------- the benchmark
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=20_000)
    ap.add_argument("--actors", type=int, default=4, help="CPU worker actors (0.5 CPU each)")
    ap.add_argument("--gen-threads", type=int, default=32, help="threads putting the shards into moto")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the driver's run into this .prof file")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace the driver's allocations during the run and print what holds the most (slow)")
    ap.add_argument("--write-docs", action="store_true", help=f"write {RESULTS.relative_to(REPO)}")
    ap.add_argument("--label", default="", help="free text stored with the figures (e.g. 'before the fix')")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    import ray
    import s3fs

    import jobs.commands.archive as archive_mod
    from jobs.commands.archive import ArchiveJob, run_archive
    from pipeline.executors.ray import RayExecutor
    from pipeline.manifest import Manifest, OutputLocation
    from pipeline.progress import TqdmProgress
    from pipeline.shards import expand_inputs

    moto, endpoint = _start_moto()
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    result: dict[str, Any] = {"shards": args.shards, "actors": args.actors, "label": args.label}
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
        fs.mkdir(SRC_BUCKET)
        fs.mkdir(OUT_BUCKET)
        result["generate_s"] = round(_generate(fs, args.shards, args.gen_threads), 1)
        print(f"generated {args.shards} shards in {result['generate_s']} s", flush=True)

        pattern = f"s3://{SRC_BUCKET}/shards/{{000000..{args.shards - 1:06d}}}.tar"
        output = f"s3://{OUT_BUCKET}/out"
        job = ArchiveJob(inputs=(pattern,), output=output, model="stub", executor="ray", num_actors=args.actors,
                         storage_options=options, progress=False)
        # the stub codec, for this benchmark only (never restored: the process ends with the benchmark)
        mock.patch.object(archive_mod, "RDEICEncoderFactory", lambda *a, **k: StubFactory()).start()

        ray.init(num_cpus=max(2, args.actors // 2), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        sampler = Sampler()

        class CountingSink(TqdmProgress):  # what `rdeic archive --no-progress` uses, plus a counter
            def shard_done(self, stats: Any) -> None:
                sampler.done += 1
                super().shard_done(stats)

        measured: dict[str, float] = {}

        class MeasuredRay(RayExecutor):
            def run(self, plan: Any, progress: Any) -> Any:
                profiler = cProfile.Profile() if args.profile else None
                measured["shards"] = len(plan.shards)
                if args.tracemalloc:
                    import tracemalloc

                    tracemalloc.start(8)
                c0, w0, r0 = _cpu_s(), time.perf_counter(), _rss_bytes()
                if profiler:
                    profiler.enable()
                try:
                    out = super().run(plan, progress)
                    if args.tracemalloc:  # what the run still holds once every shard is finished
                        snap = tracemalloc.take_snapshot()
                        tracemalloc.stop()
                        held = sum(st.size for st in snap.statistics("filename")) / 2**20
                        print(f"traced memory held after the run: {held:.1f} MiB")
                        for st in snap.statistics("traceback")[:8]:
                            print(f"  {st.size / 2**20:7.2f} MiB {st.count:8d} blocks", *st.traceback.format()[-4:],
                                  sep="\n    ")
                    return out
                finally:
                    if profiler:
                        profiler.disable()
                        profiler.dump_stats(args.profile)
                    measured.update(cpu_s=_cpu_s() - c0, wall_s=time.perf_counter() - w0, rss_start=r0)

        executor = MeasuredRay(num_actors=args.actors, use_gpus=False, cpu_actor_cpus=0.5)
        c0, w0 = _cpu_s(), time.perf_counter()
        with sampler:
            outcome = run_archive(job, progress=CountingSink(disable=True), executor=executor)
        run_cpu, run_wall = _cpu_s() - c0, time.perf_counter() - w0
        if outcome.exit_code != 0 or outcome.summary["shards"]["done_this_run"] != args.shards:
            raise SystemExit(f"the run did not finish every shard: {outcome.summary['shards']}; first failure: "
                             f"{(outcome.summary['failed_shards'] or [None])[0]}")

        n = measured["shards"]
        samples = sampler.samples
        second_half = [(d, rss) for _, rss, _, d in samples if d >= n // 2]
        result["run"] = {
            "wall_s": round(run_wall, 1),
            "driver_cpu_s": round(run_cpu, 1),
            "executor_wall_s": round(measured["wall_s"], 1),
            "executor_cpu_s": round(measured["cpu_s"], 1),
            "driver_cpu_ms_per_shard": round(1000 * measured["cpu_s"] / n, 3),
            "driver_cpu_ms_per_shard_whole_run": round(1000 * run_cpu / n, 3),
            "shards_per_s": round(n / measured["wall_s"], 1),
            "rss_at_start_mib": round(measured["rss_start"] / 2**20, 1),
            "rss_peak_mib": round(max(rss for _, rss, _, _ in samples) / 2**20, 1),
            "rss_end_mib": round(samples[-1][1] / 2**20, 1),
            "rss_bytes_per_finished_shard": round(_slope(second_half), 1),
        }
        # CPU per shard in each tenth of the run: flat if the per-shard cost does not grow with finished shards
        tenths = []
        for k in range(10):
            lo, hi = n * k // 10, n * (k + 1) // 10
            window = [(c, d) for _, _, c, d in samples if lo <= d <= hi]
            if len(window) >= 2 and window[-1][1] > window[0][1]:
                tenths.append(round(1000 * (window[-1][0] - window[0][0]) / (window[-1][1] - window[0][1]), 3))
        result["run"]["driver_cpu_ms_per_shard_by_tenth"] = tenths
        step = max(1, len(samples) // 40)
        result["run"]["rss_samples"] = [{"t": round(t, 1), "finished": d, "rss_mib": round(rss / 2**20, 1)}
                                        for t, rss, _, d in samples[::step]]
        print(json.dumps(result["run"], indent=1), flush=True)

        # ---------------------------------------------------------------- resume
        out = OutputLocation(output, options)
        listing = []
        for _ in range(3):
            t = time.perf_counter()
            shards = expand_inputs((pattern,), options)
            done = Manifest(out).done_shards()
            pending = [s for s in shards if s.shard_id not in done]
            listing.append(time.perf_counter() - t)
            assert len(done) == args.shards and not pending
        t, c = time.perf_counter(), _cpu_s()
        rerun = run_archive(job, progress=TqdmProgress(disable=True), executor=RayExecutor(num_actors=args.actors))
        rerun_s, rerun_cpu = time.perf_counter() - t, _cpu_s() - c
        assert rerun.exit_code == 0 and rerun.summary["shards"]["done_before"] == args.shards
        t = time.perf_counter()
        stats = Manifest(out).read_done()
        read_done_s = time.perf_counter() - t
        assert len(stats) == args.shards
        result["resume"] = {
            "list_and_pending_s": [round(v, 2) for v in listing],
            "list_and_pending_s_median": round(statistics.median(listing), 2),
            "rerun_all_done_s": round(rerun_s, 1),
            "rerun_all_done_driver_cpu_s": round(rerun_cpu, 1),
            "read_all_markers_s": round(read_done_s, 1),
        }
        print(json.dumps(result["resume"], indent=1), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        assert moto.stdin is not None  # stdin=PIPE
        moto.stdin.close()
        moto.wait(timeout=30)
    if args.profile:
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(25)
    result["meta"] = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "ray": ray.__version__,
        "command": "python -m bench.driver_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "run"} | {"run": {
        k: v for k, v in result["run"].items() if k != "rss_samples"}}))
    if args.write_docs:
        if RESULTS.exists():  # the recorded before/after comparison is not measured by this run: keep it
            old = json.loads(RESULTS.read_text())
            if "before_after" in old:
                result["before_after"] = old["before_after"]
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print("wrote", RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
