"""`make demo`: the main job end to end on the embedded defaults.

Until the archive pipeline is wired in, the demo is a codec round trip of
real photos: encode -> bytes -> decode, with per-image bpp and PSNR, and the
reconstructions written next to the originals for a look.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def default_codec():
    """The embedded default model: the shipped `mini` when present, else the tiny random-weight codec."""
    from rdeic_core import RDEICCodec
    from rdeic_core.codec import resolve_model_path

    try:
        resolve_model_path("mini")
    except FileNotFoundError:
        print("note: no trained `mini` model is shipped yet; using the `tiny` config with random weights "
              "(the round trip is real, the reconstructions are not meaningful)")
        return RDEICCodec.from_config("tiny", seed=0), "tiny (random weights)"
    return RDEICCodec.from_pretrained("mini"), "mini"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=Path, default=REPO / "data" / "photos" / "small")
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "demo")
    args = ap.parse_args(argv)

    paths = sorted(args.images.glob("*.png"))[: args.limit]
    if not paths:
        print(f"no images in {args.images}; run `make photos` first", file=sys.stderr)
        return 2
    codec, name = default_codec()
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    t0 = time.perf_counter()
    streams = codec.encode(images, steps=args.steps)
    t1 = time.perf_counter()
    recon = codec.decode(streams)
    t2 = time.perf_counter()

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"model: {name}  fingerprint {codec.fingerprint[:4].hex()}  steps {args.steps}")
    print(f"{'image':40s} {'size':>9s} {'bytes':>6s} {'bpp':>7s} {'PSNR':>6s}")
    total_bits = total_px = 0
    for p, im, s, r in zip(paths, images, streams, recon):
        h, w = im.shape[:2]
        bpp = 8 * len(s) / (h * w)
        total_bits += 8 * len(s)
        total_px += h * w
        (args.out / f"{p.stem}.rde").write_bytes(s)
        Image.fromarray(r).save(args.out / f"{p.stem}.recon.png")
        print(f"{p.name[:40]:40s} {w:4d}x{h:<4d} {len(s):6d} {bpp:7.4f} {_psnr(im, r):6.2f}")
    n = len(images)
    print(f"{n} images, mean bpp {total_bits / total_px:.4f}, encode {(t1 - t0) / n:.2f} s/img, "
          f"decode {(t2 - t1) / n:.2f} s/img; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
