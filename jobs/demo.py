"""`make demo`: the archive job end to end on the embedded defaults.

1. builds WebDataset shards from the real test photos (data/photos/small),
2. starts an embedded S3 endpoint (moto's server on 127.0.0.1) and uploads the shards,
3. archives them with the Ray executor (a local Ray; one CPU actor per core),
4. decodes a few archived bitstreams back as a spot check, and
5. prints where the archive is and its summary (images, bytes, mean bpp, throughput).

The embedded S3 lives only as long as the demo, so the archive is also copied to
outputs/demo/archive/ for inspection (plain pyarrow/pandas/DuckDB read it).
The model is the shipped `mini` when present, else the `tiny` architecture with random
weights (the pipeline is real; the pictures are not).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUCKET = "rdeic-demo"


def default_model(out: Path) -> tuple[str, str]:
    """(model argument for the job, description)."""
    from rdeic_core.codec import resolve_model_path

    try:
        return str(resolve_model_path("mini")), "mini"
    except FileNotFoundError:
        from rdeic_core import RDEICCodec

        path = out / "model-tiny-random"
        if not (path / "config.json").exists():
            RDEICCodec.from_config("tiny", seed=0).save_pretrained(path)
        return str(path), "tiny (random weights: no trained `mini` model is shipped yet)"


def build_shards(photos: list[Path], per_shard: int) -> list[bytes]:
    """WebDataset tars (key.png + key.json), written with webdataset's own TarWriter."""
    import webdataset as wds

    shards = []
    for start in range(0, len(photos), per_shard):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for p in photos[start:start + per_shard]:
                key = p.stem.replace(".", "_")
                sink.write({"__key__": key, "png": p.read_bytes(), "json": {"source": p.name}})
        shards.append(buf.getvalue())
    return shards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=REPO / "data" / "photos" / "small")
    ap.add_argument("--per-shard", type=int, default=9)
    ap.add_argument("--num-actors", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "demo")
    args = ap.parse_args(argv)

    photos = sorted(args.photos.glob("*.png"))
    if not photos:
        print(f"no photos in {args.photos}; run `make photos` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray for the demo
    model, model_desc = default_model(args.out)

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.archive import ArchiveJob, format_summary, run_archive
    from jobs.local_s3 import local_s3
    from rdeic_core import RDEICCodec

    with local_s3() as s3:
        fs = s3.make_bucket(BUCKET)
        shards = build_shards(photos, args.per_shard)
        for i, data in enumerate(shards):
            fs.pipe(f"{BUCKET}/shards/demo-{i:06d}.tar", data)
        pattern = f"s3://{BUCKET}/shards/demo-{{000000..{len(shards) - 1:06d}}}.tar"
        print(f"embedded S3 at {s3.endpoint}: {len(photos)} real photos in {len(shards)} shards -> {pattern}")
        print(f"model: {model_desc}")

        job = ArchiveJob(inputs=(pattern,), output=f"s3://{BUCKET}/archive", model=model, executor="ray",
                         num_actors=args.num_actors, storage_options=s3.storage_options, progress=True)
        t0 = time.perf_counter()
        outcome = run_archive(job)
        seconds = time.perf_counter() - t0
        print(format_summary(outcome.summary))

        local = args.out / "archive"
        shutil.rmtree(local, ignore_errors=True)
        fs.get(f"{BUCKET}/archive", str(local), recursive=True)
        files = sorted(local.rglob("*.parquet"))
        table = pq.ParquetDataset([str(f) for f in files]).read()
        ok = table.filter(pc.equal(table["status"], "ok"))
        nbytes = sum(len(b) for b in ok["bitstream"].to_pylist())
        pixels = sum(h * w for h, w in zip(ok["height"].to_pylist(), ok["width"].to_pylist()))
        print(f"archive: s3://{BUCKET}/archive (embedded, gone after the demo); copy in {local}")
        print(f"  {table.num_rows} rows ({ok.num_rows} ok), {nbytes} bitstream bytes for "
              f"{pixels / 1e6:.2f} Mpixel -> mean {8 * nbytes / max(pixels, 1):.4f} bpp; "
              f"{table.num_rows / seconds:.2f} images/s end to end")

        codec = RDEICCodec.from_pretrained(model)
        first = ok.slice(0, 2)
        recon = codec.decode(first["bitstream"].to_pylist())
        for key, img in zip(first["key"].to_pylist(), recon):
            print(f"  spot check: decoded {key} -> {img.shape[1]}x{img.shape[0]} uint8")
        (args.out / "summary.json").write_text(json.dumps(outcome.summary, indent=2, default=str) + "\n")
    return int(outcome.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
