"""One codec benchmark case in its own process (so peak RSS belongs to that case).

    python -m bench.codec_bench --config tiny --size 256 --batch 1 --steps 2 5 [--repeats 3] [--fast]

Prints one JSON line per step count: encode/decode seconds per image (median
of the repeats, after a warm-up), peak RSS, the entropy coder's share of
encode time (rANS symbol coding + the encode-time verification decode), and
bits actually written vs the entropy model's estimate. Images are crops of
the real test photos (random weights do not care, but the statistics of y
do). ``--fast`` turns reproducible mode off (all threads).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


class _Timer:
    """Accumulates wall time spent in wrapped methods."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, cls: type, name: str) -> None:
        orig = getattr(cls, name)
        timer = self

        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                timer.seconds += time.perf_counter() - t

        setattr(cls, name, wrapped)


def _images(size: int, n: int) -> list[np.ndarray]:
    paths = sorted((REPO / "data" / "photos" / "full").glob("*.jpg"))
    out = []
    for i in range(n):
        im = Image.open(paths[i % len(paths)]).convert("RGB")
        im.thumbnail((size * 2, size * 2))
        a = np.asarray(im)
        y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        out.append(np.ascontiguousarray(a[y:y + size, x:x + size]))
    return out


def _estimate_bits(codec, images: list[np.ndarray]) -> float:
    """−Σ log2 p of y under the model (rounding likelihoods) + the exact z bits."""
    with torch.no_grad():
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
        feat = codec.vae.encode_features(x)
        out = codec.compression.eval()(feat)
        y_bits = float(-torch.log2(out.q_likelihoods).sum())
    k = codec.config.compression.codebook_size
    z_bits = len(images) * math.ceil(images[0].shape[0] / 64) * math.ceil(images[0].shape[1] / 64) * \
        math.ceil(math.log2(k))
    return y_bits + z_bits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fast", action="store_true", help="reproducible mode off")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rdeic_core import RDEICCodec
    from rdeic_core import compression as comp
    from rdeic_core.bitstream import Bitstream

    t0 = time.perf_counter()
    codec = RDEICCodec.from_config(args.config, seed=0)
    codec.reproducible = not args.fast
    build_s = time.perf_counter() - t0
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    ent = _Timer()
    ent.wrap(comp._RansSymbolEncoder, "code")
    ent.wrap(comp._RansSymbolEncoder, "flush")
    images = _images(args.size, args.batch)

    codec.encode(images)  # warm-up
    enc_times, shares = [], []
    for _ in range(args.repeats):
        ent.seconds = 0.0
        t = time.perf_counter()
        streams = codec.encode(images)
        dt = time.perf_counter() - t
        enc_times.append(dt / args.batch)
        shares.append(ent.seconds / dt)
    written_bits = 8 * sum(len(Bitstream.from_bytes(s).y_payload) + len(Bitstream.from_bytes(s).z_payload)
                           for s in streams)
    total_bits = 8 * sum(len(s) for s in streams)
    est = _estimate_bits(codec, images)

    for steps in args.steps:
        codec.decode(streams[:1], steps=steps) if args.repeats > 1 else None  # warm-up
        dec = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            codec.decode(streams, steps=steps)
            dec.append((time.perf_counter() - t) / args.batch)
        print(json.dumps({
            "config": args.config, "size": args.size, "batch": args.batch, "steps": steps,
            "reproducible": codec.reproducible, "threads": args.threads, "repeats": args.repeats,
            "build_s": round(build_s, 2),
            "encode_s_per_img": round(statistics.median(enc_times), 4),
            "decode_s_per_img": round(statistics.median(dec), 4),
            "entropy_share_of_encode": round(statistics.median(shares), 4),
            "payload_bits": written_bits, "stream_bits": total_bits, "estimated_bits": round(est, 1),
            "payload_overhead_pct": round(100 * (written_bits / est - 1), 2),
            "bpp": round(total_bits / (args.batch * args.size * args.size), 5),
            "rss_after_build_gib": round(rss_build, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        }), flush=True)


if __name__ == "__main__":
    main()
