"""Archive pipeline efficiency and scaling (issue 5), measured in one run.

    python -m bench.pipeline_bench [--images 48] [--per-shard 12] [--size 256]

* efficiency = archive throughput (S3 -> tar stream -> image decode -> encode ->
  Parquet on S3, local executor, per-shard wall time from the done markers)
  divided by bare ``codec.encode`` throughput on the same decoded images, batched
  the same way, in the same process;
* scaling = the same job with the Ray executor and 1 vs 2 CPU actors (end-to-end
  wall time of ``run_archive``, Ray start-up excluded by starting Ray first).

The embedded S3 is moto on loopback (demo/local_s3.py). Prints a JSON summary and
writes docs/benchmarks-pipeline.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _photos(n: int, size: int) -> list[bytes]:
    paths = sorted((REPO / "data" / "photos" / "full").glob("*.jpg"))
    out = []
    for i in range(n):
        im = Image.open(paths[i % len(paths)]).convert("RGB")
        im.thumbnail((size, size))
        if i >= len(paths):  # vary repeats so they are not byte-identical
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def _tars(jpegs: list[bytes], per_shard: int) -> list[bytes]:
    import webdataset as wds

    tars = []
    for s in range(0, len(jpegs), per_shard):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for i, data in enumerate(jpegs[s:s + per_shard]):
                sink.write({"__key__": f"img{s + i:06d}", "jpg": data})
        tars.append(buf.getvalue())
    return tars


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--per-shard", type=int, default=12)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from demo.local_s3 import local_s3
    from jobs.commands.archive import ArchiveJob, run_archive
    from pipeline.batching import DEFAULT_BATCH_SIZE
    from pipeline.executors.local import LocalExecutor
    from rdeic_core import RDEICCodec

    work = Path(tempfile.mkdtemp(prefix="rdeic-bench-"))
    model = work / "model"
    codec = RDEICCodec.from_config("tiny", seed=0)
    codec.save_pretrained(model)
    jpegs = _photos(args.images, args.size)
    decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs]

    codec.encode(decoded[:2])

    def bare_throughput() -> float:
        """Bare codec.encode on the decoded images, batched like the pipeline (batches of DEFAULT_BATCH_SIZE)."""
        t = time.perf_counter()
        for k in range(0, len(decoded), DEFAULT_BATCH_SIZE):
            codec.encode(decoded[k:k + DEFAULT_BATCH_SIZE])
        return len(decoded) / (time.perf_counter() - t)

    result: dict = {"images": args.images, "size": args.size, "per_shard": args.per_shard}
    with local_s3() as s3:
        fs = s3.make_bucket("bench")
        tars = _tars(jpegs, args.per_shard)
        for i, data in enumerate(tars):
            fs.pipe(f"bench/in/s-{i:06d}.tar", data)
        pattern = f"s3://bench/in/s-{{000000..{len(tars) - 1:06d}}}.tar"

        # paired runs (bare, then archive) so machine noise hits both sides of each ratio alike
        bare, archive, ratios, phases = [], [], [], []
        for r in range(args.repeats):
            bare.append(bare_throughput())
            job = ArchiveJob(inputs=(pattern,), output=f"s3://bench/out-local-{r}", model=str(model),
                             executor="local", storage_options=s3.storage_options, progress=False)
            run_archive(job, executor=LocalExecutor(device="cpu"))
            markers = [json.loads(fs.cat(p)) for p in fs.glob(f"bench/out-local-{r}/_manifest/done/*.json")]
            archive.append(sum(m["rows"] for m in markers) / sum(m["seconds"]["total"] for m in markers))
            ratios.append(archive[-1] / bare[-1])
            phases.append({k: round(sum(m["seconds"][k] for m in markers), 3) for k in markers[0]["seconds"]})
        result.update({
            "bare_encode_img_per_s": [round(v, 3) for v in bare],
            "archive_img_per_s": [round(v, 3) for v in archive],
            "efficiency_per_pair": [round(v, 3) for v in ratios],
            "efficiency_median": round(statistics.median(ratios), 3),
            "archive_phase_seconds": phases,
        })

        import ray

        from pipeline.executors.ray import RayExecutor

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            for actors in (1, 2):
                t = time.perf_counter()
                job = ArchiveJob(inputs=(pattern,), output=f"s3://bench/out-ray-{actors}", model=str(model),
                                 executor="ray", storage_options=s3.storage_options, progress=False)
                run_archive(job, executor=RayExecutor(num_actors=actors, use_gpus=False, cpu_actor_cpus=1.0))
                result[f"ray_{actors}_actor_img_per_s"] = round(args.images / (time.perf_counter() - t), 3)
        finally:
            ray.shutdown()
    result["ray_scaling_2_vs_1"] = round(result["ray_2_actor_img_per_s"] / result["ray_1_actor_img_per_s"], 3)
    print(json.dumps(result))
    (REPO / "docs" / "benchmarks-pipeline.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
